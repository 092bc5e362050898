"""Image data: decoding and preprocessing, the folder and Parquet layouts (local and on S3),
the frozen example index, undecodable images, synthetic images, and sweeps end to end."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from probeserve import results
from probeserve.checkpoints import save_checkpoint
from probeserve.data import load_dataset
from probeserve.errors import DataError
from probeserve.images import decode as decode_mod
from probeserve.images.decode import Undecodable, preprocess, resized_size
from probeserve.images.workers import DecodePool
from probeserve.models import build_model
from probeserve.runners.local import run_local
from probeserve.spec import IMAGENET_MEAN, IMAGENET_STD, ImagesData, SyntheticImagesData, spec_from_dict
from probeserve.storage import open_storage
from probeserve.sweep import Sweep, manifest_key

SPLITS = ("train", "val", "test")
COLOURS = {"blue": (20, 40, 200), "green": (30, 190, 40), "red": (210, 30, 30)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- helpers -------------------------------------------------------------------------------


def noisy_image(colour, rng, size=(24, 32)) -> np.ndarray:
    """An RGB image of a class colour with noise (h, w vary with `size`)."""
    return np.clip(rng.normal(colour, 40, (*size, 3)), 0, 255).astype(np.uint8)


def encode(array_or_image, fmt="JPEG", **kw) -> bytes:
    img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_folder(root, counts, *, seed=0) -> str:
    """{split}/{class}/{i}.jpg (every fifth a .png) with counts[split] images per class."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for cls, colour in COLOURS.items():
            os.makedirs(f"{root}/{split}/{cls}", exist_ok=True)
            for i in range(n):
                array = noisy_image(colour, rng, size=(20 + i % 7, 28 + i % 5))
                ext, fmt = (".png", "PNG") if i % 5 == 4 else (".jpg", "JPEG")
                with open(f"{root}/{split}/{cls}/{i:03d}{ext}", "wb") as f:
                    f.write(encode(array, fmt))
    return str(root)


def add_broken_files(root, split="train", cls="red") -> list[str]:
    """A truncated JPEG and a text file named .jpg; returns their keys."""
    good = encode(noisy_image(COLOURS[cls], np.random.default_rng(9)))
    with open(f"{root}/{split}/{cls}/cut.jpg", "wb") as f:
        f.write(good[: len(good) // 2])
    with open(f"{root}/{split}/{cls}/notes.jpg", "w") as f:
        f.write("this is not an image\n")
    with open(f"{root}/{split}/{cls}/README.txt", "w") as f:
        f.write("not an image name: ignored\n")
    return [f"{split}/{cls}/cut.jpg", f"{split}/{cls}/notes.jpg"]


HF_NAMES = ["blue", "green", "red"]


def write_hf_parquet(
    root, *, rows=(12, 12), val_rows=9, test_rows=6, row_group_size=4, size=(22, 30), seed=0
) -> str:
    """The Hugging Face export's layout: data/{split}-0000k-of-0000n.parquet, an `image`
    struct<bytes, path> and an int64 `label` with ClassLabel names; test labels are -1."""
    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/data", exist_ok=True)
    meta = {
        "info": {
            "features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": HF_NAMES}}
        }
    }

    def write(name, n, *, labelled=True):
        labels = rng.integers(0, 3, n)
        images = [
            {
                "bytes": encode(noisy_image(COLOURS[HF_NAMES[c]], rng, size=(size[0] + i % 3, size[1]))),
                "path": f"{i}.jpg",
            }
            for i, c in enumerate(labels)
        ]
        table = pa.table(
            {"image": images, "label": pa.array(labels if labelled else np.full(n, -1), pa.int64())}
        )
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, f"{root}/data/{name}", row_group_size=row_group_size)

    for i, n in enumerate(rows):
        write(f"train-{i:05d}-of-{len(rows):05d}.parquet", n)
    write("validation-00000-of-00001.parquet", val_rows)
    write("test-00000-of-00001.parquet", test_rows, labelled=False)
    return str(root)


def images(uri, **over) -> ImagesData:
    fields = {"kind": "images", "uri": str(uri), "image_size": 16, "val_size": 4, "num_workers": 0}
    return ImagesData(**{**fields, **over})


def batches_of(ds, split, batch_size=5, device="cpu"):
    xs, ys = zip(*ds.batches(split, batch_size, device=device))
    return torch.cat(xs).numpy(), np.concatenate(ys)


def reference(data: bytes, spec: ImagesData) -> np.ndarray:
    """The expected model input for some image bytes: [3, S, S] float64."""
    u8 = preprocess(data, image_size=spec.image_size, resize_size=spec.resolved_resize_size())
    mean, std = np.asarray(spec.mean)[:, None, None], np.asarray(spec.std)[:, None, None]
    return (u8.transpose(2, 0, 1) / 255.0 - mean) / std


def parquet_bytes(root, name: str) -> bytes:
    """The image bytes of an example named `file#row`."""
    key, row = name.rsplit("#", 1)
    value = pq.read_table(f"{root}/{key}").column("image")[int(row)].as_py()
    return value["bytes"] if isinstance(value, dict) else value


# --- decoding and preprocessing ------------------------------------------------------------


def test_resize_and_centre_crop_follow_torchvision():
    # torchvision's Resize(256): the shorter side becomes 256, the longer int(256 * long / short)
    assert resized_size(500, 375, 256) == (341, 256)
    assert resized_size(375, 500, 256) == (256, 341)
    assert resized_size(300, 300, 256) == (256, 256)
    # A 64x32 image whose red channel is 4x its column and green 4x its row: resized to 32
    # on the short side it keeps its size, and the centre crop keeps columns 16..47, rows 0..31.
    x = np.arange(64)[None, :].repeat(32, 0)
    y = np.arange(32)[:, None].repeat(64, 1)
    array = np.stack([x * 4, y * 4, np.zeros_like(x)], axis=-1).astype(np.uint8)
    out = preprocess(encode(array, "PNG"), image_size=32, resize_size=32)
    np.testing.assert_array_equal(out[..., 0], array[:, 16:48, 0])
    np.testing.assert_array_equal(out[..., 1], array[:, 16:48, 1])
    portrait = preprocess(encode(array.transpose(1, 0, 2).copy(), "PNG"), image_size=32, resize_size=32)
    np.testing.assert_array_equal(portrait, array.transpose(1, 0, 2)[16:48])
    # A resize before the crop: compare with Pillow doing torchvision's steps itself.
    img = Image.fromarray(noisy_image((100, 150, 200), np.random.default_rng(0), size=(45, 70)))
    out = preprocess(encode(img, "PNG"), image_size=20, resize_size=24)
    expected = img.resize((37, 24), Image.Resampling.BILINEAR).crop((8, 2, 28, 22))  # round(17/2) = 8
    np.testing.assert_array_equal(out, np.asarray(expected))


@pytest.mark.parametrize(
    ("name", "make", "fmt"),
    [
        ("grey JPEG", lambda: Image.new("L", (40, 30), 120), "JPEG"),
        ("palette PNG", lambda: Image.new("RGB", (40, 30), (200, 40, 10)).quantize(8), "PNG"),
        ("RGBA PNG", lambda: Image.new("RGBA", (40, 30), (10, 200, 40, 90)), "PNG"),
        ("CMYK JPEG", lambda: Image.new("CMYK", (40, 30), (10, 200, 40, 30)), "JPEG"),
        ("grey+alpha PNG", lambda: Image.new("LA", (40, 30), (77, 200)), "PNG"),
        ("1-bit PNG", lambda: Image.new("1", (40, 30), 1), "PNG"),
    ],
)
def test_every_mode_becomes_rgb(name, make, fmt):
    img = make()
    expected = np.asarray(img.convert("RGB"))[0, 0].astype(int)
    out = preprocess(encode(img, fmt), image_size=16, resize_size=20)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8, name
    tolerance = 6 if fmt == "JPEG" else 0  # JPEG is lossy, even on a flat colour
    assert np.abs(out.astype(int) - expected).max() <= tolerance, (name, out[0, 0], expected)


def test_16_bit_grey_is_scaled_not_clipped():
    img = Image.fromarray(np.full((30, 40), 30000, dtype=np.uint16))
    out = preprocess(encode(img, "PNG"), image_size=16, resize_size=16)
    assert np.all(out == round(30000 / 257))  # 117; converting would clip it to 255


def test_bytes_that_are_no_image_are_undecodable():
    good = encode(noisy_image((1, 2, 3), np.random.default_rng(0)))
    for data in (good[: len(good) // 2], b"hello, I am text", b"", encode(Image.new("RGB", (8, 8)), "PDF")):
        with pytest.raises(Undecodable):
            preprocess(data, image_size=8, resize_size=8)
    preprocess(good, image_size=8, resize_size=8)  # and the whole file decodes


def test_decode_workers_do_not_import_torch():
    code = (
        "import sys; import probeserve.images.workers, probeserve.images.decode, probeserve.storage; "
        "print(sorted(m for m in ('torch', 'pydantic', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# --- the folder layout ---------------------------------------------------------------------


def test_folder_classes_labels_and_split_mapping(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 6, "val": 3})
    ds = load_dataset(images(root))
    assert ds.class_names == ("blue", "green", "red") and ds.num_classes == 3
    assert ds.input_shape == (3, 16, 16)
    # no test/: test comes from val/, and val is carved from train/
    assert {
        s: (d["source"], d["examples"], d["carved_from_train"]) for s, d in ds.describe()["splits"].items()
    } == {
        "train": ("train", 14, False),
        "val": ("train", 4, True),
        "test": ("val", 9, False),
    }
    for split in SPLITS:
        index = ds.index.splits[split]
        names = [index.name(i) for i in range(len(index))]
        source = ds.describe()["splits"][split]["source"]
        assert all(n.startswith(f"{source}/") for n in names)
        # a label is the sorted position of its class folder
        assert [ds.class_names[label] for label in ds.labels(split)] == [n.split("/")[1] for n in names]
    train = [ds.index.splits["train"].name(i) for i in range(14)]
    val = [ds.index.splits["val"].name(i) for i in range(4)]
    assert not set(train) & set(val) and len(set(train)) == 14
    assert len(set(ds.labels("train")[:6])) > 1  # shuffled, not sorted by class

    # with a test/ folder: val from val/, test from test/
    write_folder(tmp_path / "d", {"test": 2}, seed=1)
    ds = load_dataset(images(root, val_size=100))
    assert {s: d["source"] for s, d in ds.describe()["splits"].items()} == {
        "train": "train",
        "val": "val",
        "test": "test",
    }
    assert [ds.size(s) for s in SPLITS] == [18, 9, 6]  # val_size is an upper bound for a val/ folder

    # explicit mapping: test from val/, val carved from train
    ds = load_dataset(images(root, splits={"train": "train", "val": None, "test": "val"}, val_size=3))
    assert {s: d["source"] for s, d in ds.describe()["splits"].items()} == {
        "train": "train",
        "val": "train",
        "test": "val",
    }
    assert [ds.size(s) for s in SPLITS] == [15, 3, 9]


def test_folder_batches_are_the_preprocessed_images_in_a_fixed_order(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 5, "val": 2})
    spec = images(root, val_size=3, num_workers=2)
    ds = load_dataset(spec)
    x, y = batches_of(ds, "train", batch_size=4)
    index = ds.index.splits["train"]
    assert x.shape == (12, 3, 16, 16) and x.dtype == np.float32
    np.testing.assert_array_equal(y, ds.labels("train"))
    for i in range(len(index)):
        with open(f"{root}/{index.name(i)}", "rb") as f:
            np.testing.assert_allclose(x[i], reference(f.read(), spec), atol=1e-5)

    # the same examples in the same order: in-process, other batch sizes, a spec re-parsed
    again = load_dataset(
        ImagesData.model_validate_json(spec.model_copy(update={"num_workers": 0}).model_dump_json())
    )
    x2, y2 = batches_of(again, "train", batch_size=7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    x3, _ = batches_of(ds, "train", batch_size=100)
    np.testing.assert_array_equal(x, x3)
    # two passes at once (the second gets workers of its own): the same batches
    together = list(zip(ds.batches("train", 4), ds.batches("test", 4)))
    np.testing.assert_array_equal(torch.cat([a for (a, _), _ in together]).numpy(), x[: 4 * len(together)])
    np.testing.assert_array_equal(
        torch.cat([b for _, (b, _) in together]).numpy(), batches_of(ds, "test", 4)[0]
    )

    # another seed draws other subsets and another order
    other = load_dataset(images(root, val_size=3, seed=1))
    assert [other.index.splits["val"].name(i) for i in range(3)] != [
        ds.index.splits["val"].name(i) for i in range(3)
    ]
    ds.close()


def test_normalisation_uses_the_spec_mean_and_std(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 3, "val": 1})
    plain = load_dataset(images(root, mean=[0, 0, 0], std=[1, 1, 1], val_size=1))
    imagenet = load_dataset(images(root, val_size=1))
    x01, _ = batches_of(plain, "test")
    x, _ = batches_of(imagenet, "test")
    assert 0 <= x01.min() and x01.max() <= 1
    mean, std = np.asarray(IMAGENET_MEAN)[:, None, None], np.asarray(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(x, (x01 - mean) / std, atol=1e-5)


def test_undecodable_images_are_skipped_and_named(tmp_path, caplog):
    root = write_folder(tmp_path / "d", {"train": 4, "val": 2})
    broken = add_broken_files(root)
    ds = load_dataset(images(root, val_size=2, num_workers=2))
    n_index = len(ds.index.splits["train"]) + len(ds.index.splits["val"])
    assert n_index == 14  # 12 images + 2 broken ones; README.txt is not an image name
    seen = []
    for split in ("train", "val"):
        x, y = batches_of(ds, split, batch_size=3)
        assert len(x) == len(y) == ds.size(split)
        np.testing.assert_array_equal(y, ds.labels(split))
        seen += ds.skipped(split)
    assert sorted(seen) == sorted(broken)
    assert ds.size("train") + ds.size("val") == 12
    assert all(any(b in r.message for r in caplog.records) for b in broken)
    # the labels kept are those of the images kept
    index = ds.index.splits["train"]
    names = [index.name(i) for i in range(len(index)) if index.name(i) not in broken]
    assert [ds.class_names[label] for label in ds.labels("train")] == [n.split("/")[1] for n in names]


def test_missing_empty_and_ambiguous_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data.uri: .*nothing-here does not exist"):
        load_dataset(images(tmp_path / "nothing-here"))
    os.makedirs(tmp_path / "empty" / "train" / "cat")
    with pytest.raises(DataError, match="data.uri: no images under"):
        load_dataset(images(tmp_path / "empty"))
    root = write_folder(tmp_path / "d", {"train": 3})
    with pytest.raises(DataError, match=r"data.uri: no test split .* found 'train' \(9\)"):
        load_dataset(images(root))
    write_folder(tmp_path / "d", {"val": 1})
    with pytest.raises(
        DataError, match=r"data.splits.test: no 'testing' among .*found 'train' \(9\), 'val' \(3\)"
    ):
        load_dataset(images(root, splits={"train": "train", "test": "testing"}))
    with pytest.raises(DataError, match=r"data.val_size: 10 is more than the 9 examples in train/"):
        load_dataset(images(root, val_size=10))
    with pytest.raises(DataError, match=r"data.uri: the train split is empty"):
        load_dataset(images(root, val_size=9))
    with pytest.raises(DataError, match=r"data.test_size: 4 is more than the 3 examples in val/"):
        load_dataset(images(root, val_size=2, test_size=4))
    os.makedirs(tmp_path / "d" / "val" / "yak")
    with open(tmp_path / "d" / "val" / "yak" / "0.png", "wb") as f:
        f.write(encode(Image.new("RGB", (9, 9)), "PNG"))
    with pytest.raises(DataError, match=r"val/yak/ is a class that train/ does not have"):
        load_dataset(images(root, val_size=2))


# --- the Parquet layout --------------------------------------------------------------------


def test_parquet_hugging_face_layout(tmp_path):
    root = write_hf_parquet(tmp_path / "hf")
    spec = images(f"{root}/data", val_size=5, num_workers=2)
    ds = load_dataset(spec)
    assert ds.class_names == tuple(HF_NAMES) and ds.num_classes == 3
    # the test file is unlabelled (-1): test comes from validation, val is carved from train
    assert {s: (d["source"], d["examples"]) for s, d in ds.describe()["splits"].items()} == {
        "train": ("train", 19),
        "val": ("train", 5),
        "test": ("validation", 9),
    }
    for split in SPLITS:
        x, y = batches_of(ds, split, batch_size=4)
        index = ds.index.splits[split]
        assert len(x) == len(index)
        for i in range(len(index)):
            np.testing.assert_allclose(
                x[i], reference(parquet_bytes(spec.uri, index.name(i)), spec), atol=1e-5
            )
            key, row = index.name(i).rsplit("#", 1)
            assert y[i] == pq.read_table(f"{spec.uri}/{key}").column("label")[int(row)].as_py()
    # rows of one row group stay together (each is read once), in a seeded order of row groups
    train = ds.index.splits["train"]
    units = [(train.keys[i], int(train.row_group[i])) for i in range(len(train))]
    assert len([u for j, u in enumerate(units) if j == 0 or u != units[j - 1]]) == len(set(units))
    assert units != sorted(units)
    ds.close()


def test_parquet_raw_bytes_string_labels_and_a_split_column(tmp_path):
    rng = np.random.default_rng(3)
    names = ["green", "red", "blue"] * 8
    split = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    table = pa.table(
        {
            "jpeg": [encode(noisy_image(COLOURS[c], rng)) for c in names],
            "animal": names,
            "part": pa.array(split).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "all.parquet", row_group_size=5)
    spec = images(
        tmp_path / "all.parquet", image_column="jpeg", label_column="animal", split_column="part", val_size=10
    )
    ds = load_dataset(spec)
    assert ds.class_names == ("blue", "green", "red")
    assert [ds.size(s) for s in SPLITS] == [16, 4, 4]
    x, y = batches_of(ds, "test")
    index = ds.index.splits["test"]
    assert index.name(0).startswith("all.parquet#")
    for i in range(4):
        row = int(index.name(i).rsplit("#", 1)[1])
        assert 20 <= row < 24 and ds.class_names[y[i]] == names[row]
        np.testing.assert_allclose(x[i], reference(table.column("jpeg")[row].as_py(), spec), atol=1e-5)
    with pytest.raises(DataError, match="data.split_column: .*single Parquet file"):
        load_dataset(images(tmp_path / "all.parquet", image_column="jpeg", label_column="animal"))


def test_parquet_reads_only_the_row_groups_it_needs(tmp_path):
    """A damaged row group fails only the split that reads it, naming the file: the others
    never read it (a worker reads one row group's image column, not the file)."""
    rng = np.random.default_rng(0)
    n = 24
    split = ["train"] * 6 + ["validation"] * 6 + ["test"] * 6 + ["train"] * 6
    labels = np.arange(n) % 3
    table = pa.table(
        {
            "image": [encode(noisy_image(COLOURS[HF_NAMES[c]], rng)) for c in labels],
            "label": labels,
            "split": split,
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=6, compression="zstd")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset
    data[start : start + 24] = b"\xff" * 24  # the page header of row group 0's images
    path.write_bytes(bytes(data))

    ds = load_dataset(images(path, split_column="split", val_size=10))
    assert [ds.size(s) for s in SPLITS] == [12, 6, 6]
    assert len(batches_of(ds, "val")[0]) == 6 and len(batches_of(ds, "test")[0]) == 6
    with pytest.raises(DataError, match=r"d.parquet: cannot read row group 0 of column 'image'"):
        batches_of(ds, "train")


@pytest.mark.parametrize(
    ("over", "columns", "message"),
    [
        (
            {"label_column": "target"},
            None,
            r"data.label_column: no column 'target' in .*columns: image, label",
        ),
        ({"image_column": "img"}, None, r"data.image_column: no column 'img'"),
        ({}, {"label": pa.array([0.5, 1.5] * 4)}, r"data.label_column: column 'label' .* type double"),
        ({}, {"image": pa.array(list(range(8)))}, r"data.image_column: column 'image' .* type int64"),
        (
            {},
            {"label": pa.array([0, 1] * 3 + [-1, 1])},
            r"data.label_column: 1 of the '(test|train)' rows have negative",
        ),
    ],
)
def test_parquet_column_errors_are_named(tmp_path, over, columns, message):
    cols = {"image": [encode(Image.new("RGB", (9, 9)), "PNG")] * 8, "label": pa.array([0, 1] * 4)}
    cols.update(columns or {})
    os.makedirs(tmp_path / "p")
    for name in ("train-0.parquet", "test-0.parquet"):
        pq.write_table(pa.table(cols), tmp_path / "p" / name)
    with pytest.raises(DataError, match=message):
        load_dataset(images(tmp_path / "p", val_size=2, **over))


def test_layout_is_detected_and_can_be_forced(tmp_path):
    root = write_hf_parquet(tmp_path / "d")
    write_folder(tmp_path / "d", {"train": 2, "val": 1})  # now both kinds of files
    with pytest.raises(DataError, match="both image files and .parquet files; set data.layout"):
        load_dataset(images(root))
    assert load_dataset(images(root, layout="folder", val_size=2)).index.layout == "folder"
    assert load_dataset(images(f"{root}", layout="parquet", val_size=2)).index.layout == "parquet"


# --- the frozen index ----------------------------------------------------------------------


def test_a_frozen_index_keeps_the_examples_when_the_data_changes(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 4, "val": 2})
    out = open_storage(str(tmp_path / "out"))
    key = "runs/r/data/index.parquet"
    spec = images(root, val_size=2)
    ds = load_dataset(spec, frozen=(out, key))
    ds.freeze(out, key)

    write_folder(tmp_path / "d", {"train": 6, "val": 3}, seed=5)  # replaced and added images
    add_broken_files(root)
    assert load_dataset(spec).size("train") == 18 + 2 - 2  # a fresh listing sees them ...
    again = load_dataset(spec, frozen=(out, key))  # ... the frozen index does not
    assert [again.index.splits["train"].name(i) for i in range(10)] == [
        ds.index.splits["train"].name(i) for i in range(10)
    ]
    assert again.describe() == ds.describe()
    # a driver that listed later adopts the index frozen first
    late = load_dataset(spec)
    late.freeze(out, key)
    assert late.size("train") == 10

    with pytest.raises(DataError, match="frozen for other data settings"):
        load_dataset(images(root, val_size=3), frozen=(out, key))
    out.publish_bytes(key, b"PAR1 cut short")
    with pytest.raises(DataError, match="damaged image index"):
        load_dataset(spec, frozen=(out, key))


# --- the pool ------------------------------------------------------------------------------


def test_a_decode_worker_that_dies_is_replaced_and_its_tasks_redone(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 4})
    keys = sorted(str(p.relative_to(root)) for p in (tmp_path / "d").rglob("*.*"))
    settings = {"uri": root, "s3_endpoint": None, "image_size": 8, "resize_size": 8}
    tasks = [{"kind": "files", "keys": keys[i : i + 2]} for i in range(0, len(keys), 2)]
    expected = [decode_mod.Decoder(**settings).run(t)[0] for t in tasks]
    pool = DecodePool(settings, 2)

    def check(got):
        assert [len(failed) for _, failed in got] == [0] * len(tasks)
        for (a, _), b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)

    try:
        check(list(pool.map(tasks)))
        dead = pool._procs[0]
        dead.kill()  # the next map finds it dead when it sends it tasks
        dead.wait()
        check(list(pool.map(tasks)))
        assert pool._procs[0] is not dead and pool._procs[0].poll() is None  # replaced
        # a consumer that stops early leaves nothing running, and the pool starts again
        first = next(iter(pool.map(tasks)))
        np.testing.assert_array_equal(first[0], expected[0])
        assert len(list(pool.map(tasks))) == len(tasks)
    finally:
        pool.close()


# --- synthetic images ------------------------------------------------------------------------


def test_synthetic_images_are_seeded_per_example():
    spec = SyntheticImagesData(
        kind="synthetic_images", shape=[3, 12, 10], num_classes=5, train_size=300, seed=4
    )
    ds = load_dataset(spec)
    assert ds.input_shape == (3, 12, 10) and ds.num_classes == 5 and ds.skipped("train") == []
    x, y = batches_of(ds, "train", batch_size=256)
    x2, y2 = batches_of(load_dataset(spec), "train", batch_size=7)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(y, ds.labels("train"))
    assert x.shape == (300, 3, 12, 10) and 0.8 < x.std() < 2
    assert not np.array_equal(batches_of(ds, "val")[0][:5], x[:5])
    other = load_dataset(spec.model_copy(update={"seed": 5}))
    assert not np.array_equal(batches_of(other, "train")[0], x)


def test_every_dataset_puts_batches_on_the_device(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 3, "val": 1})
    # "meta": a device that is not the CPU, on any machine (synthetic images need a real
    # one for their random generator: see the CUDA test)
    for spec in (
        images(root, val_size=2),
        spec_from_dict(_sweep_fields(tmp_path, {"kind": "gaussian"})).data,
    ):
        x, y = next(load_dataset(spec).batches("train", 2, device="meta"))
        assert x.device.type == "meta" and x.dtype == torch.float32 and y.dtype == np.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned, asynchronous copies)")
def test_images_on_cuda_equal_images_on_cpu(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 6, "val": 2})
    ds = load_dataset(images(root, val_size=2, num_workers=2))
    x_cpu, y_cpu = batches_of(ds, "train", batch_size=4)
    xs = [(x, y) for x, y in ds.batches("train", 4, device="cuda")]
    assert all(x.is_cuda and x.dtype == torch.float32 and x.is_contiguous() for x, _ in xs)
    np.testing.assert_allclose(torch.cat([x for x, _ in xs]).cpu().numpy(), x_cpu, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([y for _, y in xs]), y_cpu)
    synthetic = load_dataset(SyntheticImagesData(kind="synthetic_images", shape=[3, 32, 32], num_classes=4))
    a = torch.cat([x for x, _ in synthetic.batches("train", 300, device="cuda")])
    b = torch.cat([x for x, _ in synthetic.batches("train", 256, device="cuda")])
    assert a.is_cuda and torch.equal(a, b)


# --- sweeps end to end -----------------------------------------------------------------------

MODEL = {"factory": "mnist_convnet", "kwargs": {"num_classes": 3, "in_channels": 3, "image_size": 16}}


def _sweep_fields(tmp_path, data, **over):
    fields = {
        "run": "img",
        "checkpoints": {"uri": str(tmp_path / "ckpts")},
        "model": MODEL,
        "layers": {"include": ["input", "pool1", "fc1"]},
        "reducer": {"kind": "avgpool", "max_features": 256},
        "data": data,
        "probe": {"max_epochs": 40},
        "resources": {"device": "cpu", "extract_batch_size": 16},
        "output": {"uri": str(tmp_path / "out")},
    }
    return {**fields, **over}


def write_checkpoint(spec, step):
    torch.manual_seed(step)
    save_checkpoint(build_model(spec.model), spec.checkpoints.uri, step)


def test_sweep_on_an_image_folder(tmp_path):
    root = write_folder(tmp_path / "d", {"train": 12, "val": 4})
    broken = add_broken_files(root)
    data = {"kind": "images", "uri": root, "image_size": 16, "val_size": 6, "num_workers": 2}
    spec = spec_from_dict(_sweep_fields(tmp_path, data))
    write_checkpoint(spec, 0)
    assert run_local(spec).exit_code == 0
    rows = results.load(spec.output.uri).to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    for r in rows:
        assert r["n_train"] + r["n_val"] == 36 and r["n_test"] == 12
        assert r["n_skipped"] == 2 and sorted(r["skipped"]) == sorted(broken)
        assert r["num_classes"] == 3
    assert min(r["test_error"] for r in rows) < 0.2  # colours: the input layer separates them
    out = tmp_path / "out"
    assert json.loads((out / "runs/img/classes.json").read_text()) == ["blue", "green", "red"]
    ckpt = Sweep(spec).discover().complete[0]
    manifest = json.loads((out / manifest_key("img", ckpt, "pool1")).read_text())
    assert manifest["class_names"] == ["blue", "green", "red"] and manifest["n_skipped"] == 2
    assert manifest["data"]["splits"]["test"]["source"] == "val"
    assert (out / "runs/img/data/index.parquet").exists()

    # images added later are not in the run: the next checkpoint sees the same examples
    write_folder(tmp_path / "d", {"train": 14}, seed=7)
    write_checkpoint(spec, 10)
    assert run_local(spec).exit_code == 0
    rows = results.load(spec.output.uri).to_pylist()
    counts = {(r["n_train"], r["n_val"], r["n_test"], r["n_skipped"]) for r in rows}
    assert len(rows) == 6 and len(counts) == 1

    # the same spec into another output: the same examples, so the same answers
    shutil.rmtree(tmp_path / "d")
    root = write_folder(tmp_path / "d", {"train": 12, "val": 4})
    add_broken_files(root)
    other = spec_from_dict(_sweep_fields(tmp_path, data, output={"uri": str(tmp_path / "out2")}))
    assert run_local(other).exit_code == 0
    first = {(r["step"], r["layer"]): r["test_error"] for r in rows if r["step"] == 0}
    second = {(r["step"], r["layer"]): r["test_error"] for r in results.load(other.output.uri).to_pylist()}
    assert first == {k: v for k, v in second.items() if k[0] == 0}


def test_probes_on_synthetic_images_beat_chance_by_far(tmp_path):
    data = {"kind": "synthetic_images", "shape": [3, 16, 16], "num_classes": 10}
    data |= {"train_size": 600, "val_size": 200, "test_size": 200}
    spec = spec_from_dict(
        _sweep_fields(
            tmp_path,
            data,
            model={**MODEL, "kwargs": {**MODEL["kwargs"], "num_classes": 10}},
            layers={"include": ["input", "pool2"]},
        )
    )
    write_checkpoint(spec, 0)
    assert run_local(spec).exit_code == 0
    rows = results.load(spec.output.uri).to_pylist()
    assert {r["chance_error"] > 0.8 for r in rows} == {True}
    assert max(r["test_error"] for r in rows) < 0.3, [(r["layer"], r["test_error"]) for r in rows]
    assert {r["n_skipped"] for r in rows} == {0} and {len(r["skipped"]) for r in rows} == {0}


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "probeserve", *args], capture_output=True, text=True, cwd=cwd
    )


def _bad_parquet(tmp_path):
    os.makedirs(tmp_path / "p", exist_ok=True)
    for name in ("train-0.parquet", "validation-0.parquet"):
        table = pa.table({"image": [encode(Image.new("RGB", (9, 9)), "PNG")] * 8, "label": [0.5, 1.5] * 4})
        pq.write_table(table, tmp_path / "p" / name)
    return str(tmp_path / "p")


@pytest.mark.parametrize(
    ("command", "data", "field"),
    [
        ("plan", lambda t: {"uri": str(t / "missing")}, "error: data.uri: "),
        ("plan", lambda t: {"uri": write_folder(t / "d", {"train": 2})}, "error: data.uri: no test split"),
        (
            "plan",
            lambda t: {
                "uri": write_folder(t / "d", {"train": 2}),
                "splits": {"train": "train", "test": "tset"},
            },
            "error: data.splits.test: no 'tset'",
        ),
        (
            "plan",
            lambda t: {"uri": _bad_parquet(t), "val_size": 2},
            "error: data.label_column: column 'label'",
        ),
        (
            "plan",
            lambda t: {"uri": _bad_parquet(t), "image_column": "jpg"},
            "error: data.image_column: no column 'jpg'",
        ),
        (
            "validate",
            lambda t: {"uri": "x", "image_size": 224, "resize_size": 200},
            "data.resize_size: ",
        ),
        ("validate", lambda t: {"uri": "x", "layout": "zip"}, "data.layout: "),
        ("validate", lambda t: {"uri": "x", "num_workers": 80000}, "data.num_workers: "),
    ],
)
def test_cli_names_the_data_field_and_exits_2(tmp_path, command, data, field):
    spec = spec_from_dict(_sweep_fields(tmp_path, {"kind": "gaussian", "dim": 4}))
    write_checkpoint(spec, 0)
    fields = _sweep_fields(tmp_path, {"kind": "images", "image_size": 16, "val_size": 2, **data(tmp_path)})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(fields))
    proc = _cli(command, str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    if command == "plan":
        assert len(lines) == 1 and lines[0].startswith(field), proc.stderr
    else:
        # one error is one line, `error: SPEC: field: message`; several are listed one a line
        assert any(line.strip().startswith(field) or f": {field}" in line for line in lines), proc.stderr


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_parquet_only_field_on_a_folder_exits_2_and_binds_nothing(tmp_path, command):
    """`data.split_column` (or another Parquet column) set for a folder tree was ignored without
    a word: the probe used the folders' splits, not the ones the user asked for. `plan` and
    `run` name the field, exit 2, and the run name stays free: no spec, no index is written."""
    spec = spec_from_dict(_sweep_fields(tmp_path, {"kind": "gaussian", "dim": 4}))
    write_checkpoint(spec, 0)
    root = write_folder(tmp_path / "d", {"train": 3, "val": 1})
    data = {"kind": "images", "uri": root, "image_size": 16, "val_size": 2, "split_column": "fold"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_sweep_fields(tmp_path, data)))
    proc = _cli(command, str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "error: data.split_column: 'fold' names a Parquet column"
    ), proc.stderr
    assert not (tmp_path / "out" / "runs").exists()
    # at its default the field is no error: the same spec without it runs
    data.pop("split_column")
    path.write_text(yaml.safe_dump(_sweep_fields(tmp_path, data, layers={"include": ["input"]})))
    proc = _cli(command, str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# --- S3 --------------------------------------------------------------------------------------


def _upload(s3_server, bucket, root, prefix):
    client = s3_server.client()
    for path in sorted(p for p in __import__("pathlib").Path(root).rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


@pytest.mark.integration
def test_folder_and_parquet_layouts_on_s3_equal_local(s3_server, s3_bucket, tmp_path):
    folder = write_folder(tmp_path / "f", {"train": 4, "val": 2})
    add_broken_files(folder)
    hf = write_hf_parquet(tmp_path / "h")
    _upload(s3_server, s3_bucket, folder, "imagenet")
    _upload(s3_server, s3_bucket, hf, "hf")
    for local, remote in ((folder, "imagenet"), (f"{hf}/data", "hf/data")):
        a = load_dataset(images(local, val_size=3, num_workers=2))
        b = load_dataset(
            images(f"s3://{s3_bucket}/{remote}", val_size=3, num_workers=2), s3_endpoint=s3_server.endpoint
        )
        assert a.describe()["splits"] == b.describe()["splits"] and a.class_names == b.class_names
        for split in SPLITS:
            xa, ya = batches_of(a, split)
            xb, yb = batches_of(b, split)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
            assert a.skipped(split) == b.skipped(split)
        a.close()
        b.close()
    missing = images(f"s3://{s3_bucket}-nope/x")
    with pytest.raises(DataError, match="data.uri: .*does not exist"):
        load_dataset(missing, s3_endpoint=s3_server.endpoint)
    with pytest.raises(DataError, match="data.uri: no images under"):
        load_dataset(images(f"s3://{s3_bucket}/nothing"), s3_endpoint=s3_server.endpoint)


@pytest.mark.integration
def test_one_parquet_file_on_s3(s3_server, s3_bucket, tmp_path):
    rng = np.random.default_rng(1)
    labels = np.arange(12) % 2
    table = pa.table(
        {
            "image": [encode(noisy_image(COLOURS[HF_NAMES[c]], rng)) for c in labels],
            "label": labels,
            "split": ["train"] * 8 + ["test"] * 4,
        }
    )
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=5)
    s3_server.client().upload_file(str(tmp_path / "one.parquet"), s3_bucket, "sets/one.parquet")
    local = load_dataset(images(tmp_path / "one.parquet", split_column="split", val_size=2))
    remote = load_dataset(
        images(f"s3://{s3_bucket}/sets/one.parquet", split_column="split", val_size=2),
        s3_endpoint=s3_server.endpoint,
    )
    for split in SPLITS:
        names = [remote.index.splits[split].name(i) for i in range(remote.size(split))]
        assert names == [local.index.splits[split].name(i) for i in range(local.size(split))]
        assert all(n.startswith("one.parquet#") for n in names)
        np.testing.assert_array_equal(batches_of(local, split)[0], batches_of(remote, split)[0])


@pytest.mark.integration
def test_parquet_on_s3_is_read_by_row_group_ranges(s3_server, s3_bucket, tmp_path, monkeypatch):
    hf = write_hf_parquet(tmp_path / "h", rows=(30,), row_group_size=3, size=(150, 200))
    _upload(s3_server, s3_bucket, hf, "hf")
    ds = load_dataset(images(f"s3://{s3_bucket}/hf/data", val_size=2), s3_endpoint=s3_server.endpoint)
    read = []
    real = decode_mod.read_range
    monkeypatch.setattr(
        decode_mod, "read_range", lambda s, k, start, n: read.append(n) or real(s, k, start, n)
    )
    x, _ = batches_of(ds, "val")  # 2 rows of a 30-row file: at most 2 of its 10 row groups
    size = os.path.getsize(f"{hf}/data/train-00000-of-00001.parquet")
    assert len(x) == 2 and 0 < sum(read) < 0.5 * size, (sum(read), size)


@pytest.mark.integration
def test_the_images_of_a_task_are_fetched_from_s3_concurrently(s3_server, s3_bucket, tmp_path, monkeypatch):
    from probeserve.storage import S3Storage

    root = write_folder(tmp_path / "f", {"train": 6, "val": 1})
    _upload(s3_server, s3_bucket, root, "imagenet")
    ds = load_dataset(images(f"s3://{s3_bucket}/imagenet", val_size=2), s3_endpoint=s3_server.endpoint)
    running, most = [0], [0]
    real = S3Storage.read_bytes

    def slow_read(self, key, **kw):  # a GET with S3's latency: requests overlap or queue
        running[0] += 1
        most[0] = max(most[0], running[0])
        try:
            import time

            time.sleep(0.05)
            return real(self, key, **kw)
        finally:
            running[0] -= 1

    monkeypatch.setattr(S3Storage, "read_bytes", slow_read)
    x, _ = batches_of(ds, "train")
    assert len(x) == 16 and most[0] > 4, most


@pytest.mark.integration
def test_sweep_on_parquet_images_in_s3(s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBESERVE_S3_ENDPOINT", s3_server.endpoint)
    hf = write_hf_parquet(tmp_path / "h", rows=(18, 18), val_rows=12)
    # one row's bytes are a cut JPEG: it is skipped and named file#row
    table = pq.read_table(f"{hf}/data/validation-00000-of-00001.parquet")
    cells = table.column("image").to_pylist()
    cells[3] = {"bytes": cells[3]["bytes"][:100], "path": "cut.jpg"}
    table = table.set_column(0, "image", pa.array(cells, table.schema.field("image").type))
    pq.write_table(table, f"{hf}/data/validation-00000-of-00001.parquet", row_group_size=4)
    _upload(s3_server, s3_bucket, hf, "hf")
    data = {
        "kind": "images",
        "uri": f"s3://{s3_bucket}/hf/data",
        "image_size": 16,
        "val_size": 6,
        "num_workers": 2,
    }
    spec = spec_from_dict(
        _sweep_fields(
            tmp_path,
            data,
            output={"uri": f"s3://{s3_bucket}/probes"},
            checkpoints={"uri": f"s3://{s3_bucket}/ckpts"},
        )
    )
    write_checkpoint(spec, 0)
    assert run_local(spec).exit_code == 0
    rows = results.load(spec.output.uri).to_pylist()
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert {(r["n_train"], r["n_val"], r["n_test"]) for r in rows} == {(30, 6, 11)}
    assert {tuple(r["skipped"]) for r in rows} == {("validation-00000-of-00001.parquet#3",)}
    out = open_storage(spec.output.uri)
    assert json.loads(out.read_bytes("runs/img/classes.json")) == HF_NAMES
    assert out.stat("runs/img/data/index.parquet") is not None


@pytest.mark.integration
def test_ray_workers_see_the_driver_s_examples(tmp_path):
    ray = pytest.importorskip("ray")
    from probeserve.runners.ray import run_ray

    root = write_folder(tmp_path / "d", {"train": 8, "val": 3})
    add_broken_files(root)
    data = {"kind": "images", "uri": root, "image_size": 16, "val_size": 4, "num_workers": 1}
    spec = spec_from_dict(_sweep_fields(tmp_path, data, layers={"include": ["input", "fc1"]}))
    write_checkpoint(spec, 0)
    local = spec_from_dict(
        _sweep_fields(
            tmp_path, data, layers={"include": ["input", "fc1"]}, output={"uri": str(tmp_path / "o2")}
        )
    )
    assert run_local(local).exit_code == 0
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        assert run_ray(spec).exit_code == 0
    finally:
        ray.shutdown()
    a = {r["layer"]: r for r in results.load(spec.output.uri).to_pylist()}
    b = {r["layer"]: r for r in results.load(local.output.uri).to_pylist()}
    for layer in ("input", "fc1"):
        assert a[layer]["skipped"] == b[layer]["skipped"] and a[layer]["n_skipped"] == 2
        assert (a[layer]["n_train"], a[layer]["n_test"]) == (b[layer]["n_train"], b[layer]["n_test"])
        assert a[layer]["test_error"] == pytest.approx(b[layer]["test_error"], abs=0.02)
