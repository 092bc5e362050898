"""Image data against hostile and careless inputs (the red-team pass of `data.kind: images`):
images that cost memory out of all proportion to their bytes, files in a data folder that
are not images (FIFOs, links to devices, names that are not UTF-8), class folders that are
links, and labels no probe could have."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from probeserve.errors import DataError
from probeserve.images.decode import preprocess
from probeserve.images.index import resolve
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


# --- the data folder: what is not an image is left out, links to class folders followed ------


def test_a_fifo_named_parquet_does_not_block_resolving(tmp_path):
    """A FIFO named like a data file blocked `plan` forever (pyarrow opened it and waited for
    a writer). It is left out, with a warning."""
    root = tmp_path / "pq"
    root.mkdir()
    for name, n in (("train-0.parquet", 8), ("validation-0.parquet", 4)):
        img = _png(Image.new("RGB", (9, 9)))
        pq.write_table(pa.table({"image": [img] * n, "label": [0, 1] * (n // 2)}), root / name)
    os.mkfifo(root / "train-1.parquet")
    code = textwrap.dedent(
        f"""
        from probeserve.images.index import resolve
        from probeserve.spec import ImagesData
        index = resolve(ImagesData(kind="images", uri={str(root)!r}, val_size=2), s3_endpoint=None)
        print(sorted(index.files))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['train-0.parquet', 'validation-0.parquet']"
    assert "train-1.parquet (not a regular file)" in proc.stderr


def test_special_files_and_names_that_are_not_utf8_are_left_out(tmp_path, caplog):
    """A FIFO or a link to a device named .png failed every checkpoint of the run at
    extraction (the frozen index kept it), and a name that is not UTF-8 gave a traceback."""
    root = _folder(tmp_path / "d")
    os.mkfifo(f"{root}/train/red/fifo.png")
    os.symlink("/dev/zero", f"{root}/train/red/zero.png")
    os.symlink(f"{root}/nowhere.png", f"{root}/train/red/dangling.png")
    with open(os.path.join(os.fsencode(root), b"train/red/\xff\xfe.png"), "wb") as f:
        f.write(_png(Image.new("RGB", (12, 14))))
    index = resolve(_spec(root), s3_endpoint=None)
    keys = {str(k) for s in index.splits.values() for k in s.keys}
    assert len(keys) == 18 and all(k.endswith(tuple(f"{i:03d}.png" for i in range(6))) for k in keys)
    warned = caplog.text
    for name in (
        "fifo.png (not a regular file)",
        "zero.png (not a regular file)",
        "dangling.png",
        "not UTF-8",
    ):
        assert name in warned, warned


def test_a_class_folder_that_is_a_link_is_followed(tmp_path, caplog):
    """`val/red -> /elsewhere/red` was not listed: the test split lost a class without a word."""
    root = _folder(tmp_path / "d")
    os.rename(f"{root}/val/red", tmp_path / "red")
    os.symlink(tmp_path / "red", f"{root}/val/red")
    os.symlink("..", f"{root}/train/blue/cycle")  # a link cycle is walked once, not forever
    index = resolve(_spec(root), s3_endpoint=None)
    assert len(index.splits["test"]) == 6
    assert sorted(set(index.splits["test"].labels.tolist())) == [0, 1]
    assert "cycle (a link to a folder that holds it)" in caplog.text


@pytest.mark.parametrize(
    ("field", "value"), [("split_column", "fold"), ("image_column", "jpg"), ("label_column", "cls")]
)
@pytest.mark.parametrize("layout", ["auto", "folder"])
def test_a_parquet_only_field_on_a_folder_is_named(tmp_path, field, value, layout):
    """A column name for a folder tree was ignored without a word; it is refused, naming the
    field, unless it is at its default."""
    root = _folder(tmp_path / "d")
    why = "data.layout is folder" if layout == "folder" else "it holds image files"
    with pytest.raises(DataError, match=rf"^data.{field}: '{value}' names a Parquet column, .*\({why}"):
        resolve(_spec(root, layout=layout, **{field: value}), s3_endpoint=None)
    default = ImagesData.model_fields[field].default
    assert len(resolve(_spec(root, layout=layout, **{field: default}), s3_endpoint=None).splits["test"]) == 6


def test_a_data_uri_that_is_a_device_is_not_called_missing(tmp_path):
    """`data.uri: /dev/null` said "/dev/null does not exist"."""
    os.mkfifo(tmp_path / "fifo")
    for path in ("/dev/null", str(tmp_path / "fifo")):
        with pytest.raises(DataError, match=f"^data.uri: {path} is not a folder; give the folder"):
            resolve(_spec(path), s3_endpoint=None)


# --- labels ----------------------------------------------------------------------------------


@pytest.mark.parametrize("label", [3_000_000_000, 2**40])
def test_a_label_no_probe_could_have_is_named(tmp_path, label):
    """An integer label of 3e9 in a Parquet file made num_classes 3e9: the run was killed for
    memory (a class-count array of 24 GB). It is refused when the data is resolved."""
    root = tmp_path / "pq"
    root.mkdir()
    img = _png(Image.new("RGB", (9, 9)))
    pq.write_table(pa.table({"image": [img] * 8, "label": [0, 1] * 3 + [1, label]}), root / "train-0.parquet")
    pq.write_table(pa.table({"image": [img] * 4, "label": [0, 1] * 2}), root / "validation-0.parquet")
    with pytest.raises(DataError, match=rf"^data.label_column: label {label} in .*train-0.parquet"):
        resolve(_spec(root), s3_endpoint=None)


def test_a_label_no_probe_could_have_is_named_in_parquet_data(tmp_path):
    """The same for `data.kind: parquet`: every per-class array of the probe would have had
    3e9 entries. Refused when the data is loaded, naming the label and the split."""
    from probeserve.data import load_dataset
    from probeserve.spec import ParquetData

    path = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"x": [[0.0, 1.0]] * 20, "label": [0, 1] * 9 + [1, 3_000_000_000]}), path)
    with pytest.raises(
        DataError, match=r"label 3000000000 in the \w+ split; labels must be class indices below"
    ):
        load_dataset(ParquetData(kind="parquet", uri=path, val_size=2))


def _only_scan(monkeypatch, *allowed) -> list[str]:
    """Make listing a folder outside `allowed` (by real path) fail the test at once, rather
    than walk the machine; return the folders listed."""
    scanned: list[str] = []
    real_scandir = os.scandir
    allowed_real = [os.path.realpath(a) for a in allowed]

    def scandir(path="."):
        real = os.path.realpath(path)
        if not any(real == a or real.startswith(a + os.sep) for a in allowed_real):
            raise AssertionError(f"listed {path} ({real}), outside the data")
        scanned.append(str(path))
        if len(scanned) > 1000:
            raise AssertionError(f"listed more than 1000 folders: {scanned[-3:]}")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return scanned


def test_a_link_to_a_folder_that_holds_the_data_is_not_walked(tmp_path, monkeypatch, caplog):
    """A link to `/` in an image folder made the index walk the whole machine, and a link to
    the data folder's parent walked everything beside it (here, another data set's images).
    Such a link is left out with a warning naming it; a link to a class folder elsewhere is
    still followed."""
    root = _folder(tmp_path / "data" / "d")
    _folder(tmp_path / "data" / "other", classes=("green",))  # beside the data: not wanted
    os.rename(f"{root}/val/red", tmp_path / "red")
    os.symlink(tmp_path / "red", f"{root}/val/red")  # elsewhere, and wanted
    os.symlink("/", f"{root}/train/red/root")
    os.symlink(tmp_path / "data", f"{root}/train/up")
    os.symlink(root, f"{root}/val/itself")
    scanned = _only_scan(monkeypatch, root, tmp_path / "red")
    index = resolve(_spec(root), s3_endpoint=None)
    assert index.classes == ["blue", "red"]
    keys = sorted(str(k) for s in index.splits.values() for k in s.keys)
    assert len(keys) == 18 and not any("green" in k or "/root/" in k or "/up/" in k for k in keys)
    assert len(scanned) == 7, scanned  # d, train, val, their classes (one of them the linked red)
    for link in ("train/red/root", "train/up", "val/itself"):
        assert f"{root}/{link} (a link to a folder that holds it)" in caplog.text, caplog.text


def test_a_folder_reached_by_two_paths_is_listed_once(tmp_path, monkeypatch, caplog):
    """Two paths to one folder listed its images twice: `everything -> train` came before
    `train` and made a second copy of the training data, and `val/red -> ../train/red` put
    train's images in the test split. Each folder is listed once, under its own path in the
    data folder; the other path is named in a warning."""
    root = _folder(tmp_path / "d")
    os.symlink("train", f"{root}/everything")
    shutil.rmtree(f"{root}/val/red")
    os.symlink("../train/red", f"{root}/val/red")
    scanned = _only_scan(monkeypatch, root)
    index = resolve(_spec(root, splits={"train": "train", "test": "val"}), s3_endpoint=None)
    assert len(scanned) == 6, scanned  # d, train, val, train/blue, train/red, val/blue
    train_keys = [str(k) for s in ("train", "val") for k in index.splits[s].keys]
    assert len(train_keys) == 12 and all(k.startswith("train/") for k in train_keys)
    assert sorted(str(k) for k in index.splits["test"].keys) == [f"val/blue/{i:03d}.png" for i in range(3)]
    assert f"{root}/everything (the folder {root}/train again; listed once)" in caplog.text
    assert f"{root}/val/red (the folder {root}/train/red again; listed once)" in caplog.text


def test_a_lattice_of_links_is_listed_in_linear_time(tmp_path, monkeypatch):
    """Two links to the next folder, twenty deep: 2**20 paths to the last folder, and as many
    listings (the walk followed every path). Each folder is listed once."""
    root = _folder(tmp_path / "d")
    deep = tmp_path / "d" / "train" / "blue" / "deep"
    for i in range(20):
        (deep / str(i)).mkdir(parents=True)
        for link in ("a", "b"):
            os.symlink(f"../{i + 1}", deep / str(i) / link)
    (deep / "20").mkdir()
    Image.new("RGB", (12, 14)).save(deep / "20" / "x.png")
    scanned = _only_scan(monkeypatch, root)
    index = resolve(_spec(root), s3_endpoint=None)
    assert len(scanned) == 7 + 22, scanned  # the folders of _folder, deep, and 0 to 20
    keys = [str(k) for s in index.splits.values() for k in s.keys]
    assert keys.count("train/blue/deep/20/x.png") == 1 and len(keys) == 19


# --- careless data: what the data says must be what the probe uses ---------------------------


def _parquet_dir(root, files: dict[str, pa.Table]) -> str:
    os.makedirs(root, exist_ok=True)
    for name, table in files.items():
        pq.write_table(table, f"{root}/{name}")
    return str(root)


def _rows(labels, **meta) -> pa.Table:
    img = _png(Image.new("RGB", (9, 9)))
    table = pa.table({"image": [img] * len(labels), "label": labels})
    return table.replace_schema_metadata(meta) if meta else table


def _class_label(names) -> bytes:
    features = {"label": {"_type": "ClassLabel", "names": names}}
    return json.dumps({"info": {"features": features}}).encode()


def test_files_that_name_their_classes_differently_are_refused(tmp_path):
    """Two Hugging Face exports whose ClassLabels list the classes in another order: label 0
    was 'cat' in train and 'dog' in test, the class names were dropped and the probe scored
    the one against the other without a word."""
    root = _parquet_dir(
        tmp_path / "pq",
        {
            "train-0.parquet": _rows([0, 1] * 4, huggingface=_class_label(["cat", "dog"])),
            "validation-0.parquet": _rows([0, 1] * 2, huggingface=_class_label(["dog", "cat"])),
        },
    )
    with pytest.raises(
        DataError,
        match=r"^data.label_column: the files name different classes for 'label' \(label 0 is 'cat' in "
        r"train-0.parquet, 'dog' in validation-0.parquet\)",
    ):
        resolve(_spec(root), s3_endpoint=None)


@pytest.mark.parametrize("where", ["train", "validation"])
def test_an_unsigned_label_beyond_int64_is_named(tmp_path, where):
    """A uint64 label of 2**64-1 became -1 when cast: among others it was called negative,
    and a split made only of them was taken for an unlabelled one and dropped silently."""
    huge = pa.array([2**64 - 1] * 4, pa.uint64())
    files = {"train-0.parquet": _rows([0, 1] * 4), "validation-0.parquet": _rows([0, 1] * 2)}
    files["test-0.parquet"] = _rows([0, 1] * 2)
    files[f"{where}-0.parquet"] = files[f"{where}-0.parquet"].set_column(
        1,
        "label",
        huge if where == "validation" else pa.concat_arrays([huge, pa.array([0, 1] * 2, pa.uint64())]),
    )
    root = _parquet_dir(tmp_path / "pq", files)
    with pytest.raises(DataError, match=rf"^data.label_column: label {2**64 - 1} in .*{where}-0.parquet"):
        resolve(_spec(root), s3_endpoint=None)


@pytest.mark.parametrize(
    ("labels", "named", "meta"),
    [
        ([0, 5], "5", {}),
        (["a", "zzz"], r"2 \('zzz'\)", {}),
        ([0, 2], r"2 \('bird'\)", {"huggingface": _class_label(["cat", "dog", "bird"])}),
        ([0, 7], "7", {"huggingface": _class_label(["cat", "dog", "bird"])}),  # and not a class at all
    ],
)
def test_a_class_that_only_the_test_rows_have_is_refused(tmp_path, labels, named, meta):
    """A class in the test rows that no train row has: the probe could never predict it, and
    every such example counted as an error (the folder layout already refused this)."""
    train = ["a", "b"] if isinstance(labels[0], str) else [0, 1]
    root = _parquet_dir(
        tmp_path / "pq",
        {"train-0.parquet": _rows(train * 4, **meta), "validation-0.parquet": _rows(labels * 2, **meta)},
    )
    with pytest.raises(
        DataError,
        match=rf"^data.label_column: label {named} is in the 'validation' rows \(test\) but in none",
    ):
        resolve(_spec(root), s3_endpoint=None)


def test_a_labelled_source_the_default_leaves_out_is_named(tmp_path, caplog):
    """`train/ valid/ test/`: the default mapping carves val from train and drops `valid/`,
    which its user may well have meant as val; it did so without a word."""
    root = _folder(tmp_path / "d", splits=(("train", 6), ("valid", 2), ("test", 3)))
    index = resolve(_spec(root), s3_endpoint=None)
    assert index.sources["val"]["carved_from_train"] and index.sources["test"]["source"] == "test"
    assert "data.uri: 'valid' (4) among the folders of" in caplog.text
    assert "set data.splits to use it" in caplog.text
    caplog.clear()
    resolve(_spec(root, splits={"train": "train", "val": "valid", "test": "test"}), s3_endpoint=None)
    assert "not used" not in caplog.text


def test_an_image_file_larger_than_any_image_is_left_out_unread(tmp_path, caplog, monkeypatch):
    """A 40 GB disk image named .png was in the index: a decode worker read it whole and was
    killed for memory, on every pass. A file over MAX_IMAGE_BYTES is left out, named."""
    from probeserve.images import index as index_mod

    root = _folder(tmp_path / "d")
    big = f"{root}/train/red/disk.png"
    with open(big, "wb") as f:
        f.truncate(index_mod.MAX_IMAGE_BYTES + 1)  # sparse: no space taken
    index = resolve(_spec(root), s3_endpoint=None)
    keys = {str(k) for s in index.splits.values() for k in s.keys}
    assert len(keys) == 18 and "train/red/disk.png" not in keys
    assert "train/red/disk.png (2.0 GiB)" in caplog.text


def test_an_empty_class_folder_in_train_is_named(tmp_path):
    """`train/red/` empty and `val/red/` full was reported as "val/red/ is a class that train/
    does not have", which sent users looking at a folder that is there."""
    root = _folder(tmp_path / "d")
    for name in os.listdir(f"{root}/train/red"):
        os.remove(f"{root}/train/red/{name}")
    with pytest.raises(DataError, match=r"^data.uri: .*/train/red/ has no image files, but .*/val/red/ has"):
        resolve(_spec(root), s3_endpoint=None)


def test_a_split_of_which_no_image_decodes_is_named(tmp_path):
    """Zero-byte files for a whole split: every probe failed with "test split is empty", which
    said nothing of why. The pass names the split, the first image and the reason."""
    from probeserve.data import load_dataset

    root = _folder(tmp_path / "d")
    for dirpath, _, names in os.walk(f"{root}/val"):
        for name in names:
            open(os.path.join(dirpath, name), "wb").close()
    ds = load_dataset(_spec(root))
    assert sum(len(y) for _, y in ds.batches("train", 4)) == 10  # train decodes
    with pytest.raises(
        DataError,
        match=r"^data.uri: none of the 6 images of the test split could be decoded \(the first, "
        r"val/\w+/00\d.png: 0 bytes \(an empty file or cell\)\)",
    ):
        list(ds.batches("test", 4))


@pytest.mark.parametrize("deeper", ["train", "train/red"])
def test_a_data_uri_one_level_too_deep_is_named(tmp_path, caplog, deeper):
    """`uri: .../imagenet/train` logged a warning per class folder (a thousand for ImageNet),
    then asked for data.splits, which could not help. One error that says what to give
    instead, and no warning that says the same before it."""
    root = _folder(tmp_path / "d", classes=("blue", "green", "red", "white"))
    with pytest.raises(
        DataError,
        match=rf"^data.uri: no {{split}}/{{class}}/{{file}} images under .*/d/{deeper}, but .* is it a split",
    ):
        resolve(_spec(f"{root}/{deeper}"), s3_endpoint=None)
    warnings = [r.getMessage() for r in caplog.records if "not in a class folder" in r.getMessage()]
    assert warnings == []


def test_images_outside_class_folders_beside_a_good_tree_are_one_warning(tmp_path, caplog):
    """A stray image in train/ and one at the top are left out, in one line naming both
    folders; the tree is indexed as it would be without them."""
    root = _folder(tmp_path / "d")
    Image.new("RGB", (9, 9)).save(f"{root}/train/stray.png")
    Image.new("RGB", (9, 9)).save(f"{root}/cover.png")
    index = resolve(_spec(root), s3_endpoint=None)
    assert index.classes == ["blue", "red"] and sum(len(s.labels) for s in index.splits.values()) == 18
    warnings = [r.getMessage() for r in caplog.records if "not in a class folder" in r.getMessage()]
    assert len(warnings) == 1 and "2 image(s)" in warnings[0], warnings
    assert f"{root}/, {root}/train/ are not" in warnings[0], warnings


def test_a_class_whose_train_images_all_fail_to_decode_is_named(tmp_path, caplog):
    """Every train image of `red` a zero-byte file: the probe never saw the class and scored
    every red test image as an error; only a count of undecodable images was logged."""
    from probeserve.data import load_dataset

    root = _folder(tmp_path / "d")
    for name in os.listdir(f"{root}/train/red"):
        open(f"{root}/train/red/{name}", "wb").close()
    ds = load_dataset(_spec(root))
    kept = np.concatenate([y for _, y in ds.batches("train", 4)])
    assert (kept == 0).all() and len(kept) == (ds.index.splits["train"].labels == 0).sum()  # blue only
    assert "no train image of class 'red' could be decoded" in caplog.text
    caplog.clear()
    list(ds.batches("test", 4))  # test keeps its red images: no such warning for it
    assert "could be decoded" not in caplog.text
