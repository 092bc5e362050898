"""Image data against hostile and careless inputs (the red-team pass of `data.kind: images`):
images that cost memory out of all proportion to their bytes, files in a data folder that
are not images (FIFOs, links to devices, names that are not UTF-8), class folders that are
links, and labels no probe could have."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
from PIL import Image

from probeserve.images.decode import preprocess
from probeserve.spec import ImagesData

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, classes=("blue", "red"), splits=(("train", 6), ("val", 3))) -> str:
    rng = np.random.default_rng(0)
    for split, n in splits:
        for c in classes:
            os.makedirs(f"{root}/{split}/{c}", exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 255, (12, 14, 3), dtype=np.uint8)
                Image.fromarray(a).save(f"{root}/{split}/{c}/{i:03d}.png")
    return str(root)


def _spec(uri, **over) -> ImagesData:
    return ImagesData(
        **{"kind": "images", "uri": str(uri), "image_size": 8, "val_size": 2, "num_workers": 0, **over}
    )


# --- decoding: memory follows the crop, not the bytes -----------------------------------------


def test_a_long_thin_image_is_not_resized_whole():
    """A 1x100000 PNG is under 1 KB; resized whole to a shorter side of 256 it would be
    256x25600000 pixels (20 GB). Decoded in a process limited to 1.5 GB of address space, it
    must come out as an ordinary crop. (Without the fix: MemoryError.)"""
    code = textwrap.dedent(
        """
        import io, resource
        from PIL import Image
        from probeserve.images.decode import preprocess
        data = io.BytesIO(); Image.new("RGB", (1, 100000), (9, 9, 9)).save(data, "PNG")
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        for size in ((1, 100000), (100000, 1)):
            buf = io.BytesIO(); Image.new("RGB", size, (9, 9, 9)).save(buf, "PNG")
            out = preprocess(buf.getvalue(), image_size=224, resize_size=256)
            assert out.shape == (224, 224, 3) and (out == 9).all(), out[0, 0]
        print("ok")
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_long_image_is_cropped_as_if_resized_whole():
    """The crop of a long image equals resizing it whole and cropping, up to rounding."""
    rng = np.random.default_rng(1)
    for size in ((7, 300), (300, 7), (3, 251)):
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        w, h = size
        new = (16, int(16 * h / w)) if w <= h else (int(16 * w / h), 16)
        left, top = round((new[0] - 12) / 2.0), round((new[1] - 12) / 2.0)
        expected = np.asarray(
            img.resize(new, Image.Resampling.BILINEAR).crop((left, top, left + 12, top + 12))
        )
        got = preprocess(_png(img), image_size=12, resize_size=16)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, size


def test_16_bit_grey_is_converted_without_a_float64_copy_of_the_image():
    """A 16-bit PNG becomes 8 bits a block of rows at a time: numpy's peak is a few bytes a
    pixel (about 6 here, 3 of them the RGB output), not the 24 of float64 copies (4 GB for a
    13000x13000 PNG of 360 KB)."""
    side = 2000
    values = np.arange(side * side, dtype=np.uint32).reshape(side, side) % 65536
    data = _png(Image.fromarray(values.astype(np.uint16)))
    tracemalloc.start()
    try:
        out = preprocess(data, image_size=side, resize_size=side)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * side * side, f"{peak / (side * side):.1f} bytes a pixel"
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)  # the same values as before
