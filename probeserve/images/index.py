"""The example index of `data.kind: images`: which images, with which labels, in which order.

Resolving an index lists the data once: the keys of a folder tree `{split}/{class}/{file}`,
or the footers and label columns of Parquet files (never their images). The source's
splits ("train", "val", "test" folders; files named `train-*.parquet`, `validation-*`;
values of a split column) are mapped to the probe's train/val/test (`data.splits`, or the
rule in `ImagesData`), seeded subsets are drawn (`train_size`, `val_size`, `test_size`), and
each split is put in a fixed order:

- folder: a seeded permutation, so the classes are mixed (a probe trained with Adam on a
  stream sorted by class would learn one class per chunk);
- Parquet: the row groups in a seeded permutation, rows in file order inside each, so that
  each row group is read once per pass and consecutive examples still mix classes when
  files are sorted by class.

Listing 1.28M keys on S3 takes minutes, and a bucket can change while a run goes on, so a
run freezes its index: `freeze` publishes it (create-only) as one Parquet file under
`{output}/runs/{run}/data/`, and later processes and checkpoints of the run load it instead
of listing again. The same spec therefore means the same examples, in the same order, in
every process and for every checkpoint, even after images are added to the bucket.

Every problem with the data (no such folder, no train split, an empty split, a missing or
mistyped column) is a `DataError` naming the spec field, raised here, when the dataset is
resolved: `probeserve plan` reports it before anything runs.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from probeserve.errors import DataError, StorageError
from probeserve.images.decode import IMAGE_EXTENSIONS
from probeserve.results import read_parquet_bytes
from probeserve.spec import ImagesData
from probeserve.storage import Storage, open_storage, redact

if TYPE_CHECKING:  # for annotations only: these modules load lazily, where used
    import pyarrow as pa

log = logging.getLogger("probeserve")

SPLITS = ("train", "val", "test")
INDEX_FILE = "index.parquet"
_META_KEY = b"probeserve.image_index"
_FORMAT = 1
_BIG_ROW_GROUP_ROWS = 4096  # larger row groups are read in pieces many times: warn about them
# An image file larger than this is left out of the index, unread. Pillow refuses images of
# more than 2 * Image.MAX_IMAGE_PIXELS (179M) pixels as decompression bombs, which even at 6
# bytes a pixel uncompressed (16-bit RGB PPM) is 1.07 GB; a worker reads a file whole, so a
# 40 GB disk image named .png (or a link to one) would get it killed for memory, every pass.
MAX_IMAGE_BYTES = 2 << 30


@dataclass
class SplitIndex:
    """One probe split, in order. `keys` are image keys (folder) or file keys (Parquet), both
    relative to `data.uri`; Parquet examples also have their row group, their row in it and
    their row in the file."""

    labels: np.ndarray  # int64
    keys: np.ndarray  # object (str)
    row_group: np.ndarray | None = None  # int32
    group_row: np.ndarray | None = None  # int64
    row: np.ndarray | None = None  # int64

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        """How an example is named in logs and result rows: its key, or `file#row`."""
        if self.row is None:
            return str(self.keys[i])
        return f"{self.keys[i]}#{int(self.row[i])}"


@dataclass
class ImageIndex:
    layout: str  # "folder" | "parquet"
    uri: str  # data.uri
    root: str  # what keys are relative to: data.uri, or its folder when it is one Parquet file
    identity: str  # the spec fields that decide the index, as JSON
    classes: list[str] | None
    sources: dict[str, dict[str, Any]]  # probe split -> where its examples come from
    splits: dict[str, SplitIndex]
    files: dict[str, int] = field(default_factory=dict)  # parquet: file key -> bytes

    def num_classes(self) -> int:
        if self.classes is not None:
            return len(self.classes)
        return max(int(s.labels.max()) for s in self.splits.values()) + 1

    def describe(self) -> dict[str, Any]:
        """What goes in the manifest and the log: layout, uri and each split's source."""
        return {"layout": self.layout, "uri": redact(self.uri), "splits": self.sources}

    def to_table(self) -> pa.Table:
        import pyarrow as pa

        columns: dict[str, list[Any]] = {
            k: [] for k in ("split", "key", "row_group", "group_row", "row", "label")
        }
        for split, s in self.splits.items():
            n = len(s)
            columns["split"].append(np.full(n, split, dtype=object))
            columns["key"].append(s.keys)
            for name in ("row_group", "group_row", "row"):
                values = getattr(s, name)
                columns[name].append(values if values is not None else np.full(n, -1))
            columns["label"].append(s.labels)
        meta = {
            "format": _FORMAT,
            "layout": self.layout,
            "uri": self.uri,
            "root": self.root,
            "identity": self.identity,
            "classes": self.classes,
            "sources": self.sources,
            "files": self.files,
        }
        return pa.table(
            {
                "split": pa.array(np.concatenate(columns["split"]), pa.string()).dictionary_encode(),
                "key": pa.array(np.concatenate(columns["key"]), pa.string()),
                "row_group": pa.array(np.concatenate(columns["row_group"]).astype(np.int32)),
                "group_row": pa.array(np.concatenate(columns["group_row"]).astype(np.int64)),
                "row": pa.array(np.concatenate(columns["row"]).astype(np.int64)),
                "label": pa.array(np.concatenate(columns["label"]).astype(np.int64)),
            }
        ).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})


def identity(spec: ImagesData) -> str:
    """The fields that decide which examples a split holds, and in which order."""
    keep: tuple[str, ...] = ("uri", "layout", "splits", "image_column", "label_column", "split_column")
    keep += ("train_size", "val_size", "test_size", "seed")
    return json.dumps({k: getattr(spec, k) for k in keep}, sort_keys=True)


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed % 2**64, zlib.crc32(stream.encode())])


# --- frozen indexes ------------------------------------------------------------------------


def freeze(index: ImageIndex, storage: Storage, key: str) -> ImageIndex:
    """Publish the index at `key` unless one is there already; return the one that stands.

    Two drivers that list at different times can find different images: the first to
    publish wins, and the other adopts its index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(index.to_table(), buf, compression="zstd")
    if storage.create_only(key, buf.getvalue().to_pybytes()):
        log.info("froze the image index of %s at %s", redact(index.uri), storage.uri_for(key))
        return index
    stored = load_frozen(storage, key, index.identity)
    assert stored is not None  # it was there a moment ago, and indexes are never deleted
    return stored


def load_frozen(storage: Storage, key: str, expected_identity: str) -> ImageIndex | None:
    """The index frozen at `key`, or None if there is none."""
    import pyarrow as pa

    if storage.stat(key) is None:
        return None
    where = storage.uri_for(key)
    try:
        table = read_parquet_bytes(storage.read_bytes(key))
        meta = json.loads(table.schema.metadata[_META_KEY])
    except (pa.ArrowException, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{where}: damaged image index ({e}); delete it to list the data again") from None
    if meta.get("format") != _FORMAT:
        raise DataError(f"{where}: image index format {meta.get('format')}, this version reads {_FORMAT}")
    if meta["identity"] != expected_identity:
        raise DataError(
            f"{where}: this run's image index was frozen for other data settings ({meta['identity']}); "
            "use another run name, or delete the index to list the data again"
        )
    splits = {}
    parquet = meta["layout"] == "parquet"
    split_col = table.column("split").to_numpy(zero_copy_only=False).astype(str)
    for split in SPLITS:
        rows = np.flatnonzero(split_col == split)
        sub = table.take(pa.array(rows))
        splits[split] = SplitIndex(
            labels=sub.column("label").to_numpy(),
            keys=np.asarray(sub.column("key").to_pylist(), dtype=object),
            row_group=sub.column("row_group").to_numpy() if parquet else None,
            group_row=sub.column("group_row").to_numpy() if parquet else None,
            row=sub.column("row").to_numpy() if parquet else None,
        )
    return ImageIndex(
        layout=meta["layout"],
        uri=meta["uri"],
        root=meta["root"],
        identity=meta["identity"],
        classes=meta["classes"],
        sources=meta["sources"],
        splits=splits,
        files={k: int(v) for k, v in meta["files"].items()},
    )


# --- resolving -----------------------------------------------------------------------------


@dataclass
class _Group:
    """The examples of one source split, in listing order."""

    labels: np.ndarray
    keys: np.ndarray
    row_group: np.ndarray | None = None
    group_row: np.ndarray | None = None
    row: np.ndarray | None = None
    unit: np.ndarray | None = None  # parquet: a number per (file, row group), for the order

    def take(self, positions: np.ndarray) -> SplitIndex:
        def pick(a):
            return None if a is None else a[positions]

        return SplitIndex(
            labels=self.labels[positions],
            keys=self.keys[positions],
            row_group=pick(self.row_group),
            group_row=pick(self.group_row),
            row=pick(self.row),
        )


def resolve(spec: ImagesData, *, s3_endpoint: str | None) -> ImageIndex:
    """List the data a spec names and build its index (see the module docstring)."""
    uri = spec.uri
    try:
        storage = open_storage(uri, s3_endpoint=s3_endpoint)
        root = getattr(storage, "root", None)
        if root is not None and not storage.root_exists():
            import os

            if os.path.isfile(root):
                if root.endswith(".parquet") and spec.layout != "folder":
                    parent = open_storage(os.path.dirname(root))
                    return _resolve_parquet(
                        spec, parent, [(os.path.basename(root), os.path.getsize(root))], single=True
                    )
                raise DataError(f"data.uri: {root} is a file; give the folder that holds the images")
            if os.path.exists(root):  # a device, a FIFO: "does not exist" sent users looking for a typo
                raise DataError(f"data.uri: {root} is not a folder; give the folder that holds the images")
            raise DataError(f"data.uri: {root} does not exist")
        images: list[str] = []
        parquets: list[tuple[str, int]] = []
        too_big: list[str] = []
        listing = _local_files(root) if root is not None else ((o.key, o.size) for o in storage.list(""))
        for key, size in listing:
            if any(part.startswith(".") for part in key.split("/")):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints)
            low = key.lower()
            if low.endswith(".parquet"):
                parquets.append((key, size))
            elif low.endswith(IMAGE_EXTENSIONS):
                if size > MAX_IMAGE_BYTES:
                    too_big.append(f"{key} ({size / 2**30:.1f} GiB)")
                else:
                    images.append(key)
        if not images and not parquets and root is None and uri.endswith(".parquet"):
            single = storage.stat("")
            if single is not None:  # one object: keys relative to its "folder", named by file
                folder, name = uri.rstrip("/").rsplit("/", 1)
                parent = open_storage(folder, s3_endpoint=s3_endpoint)
                return _resolve_parquet(spec, parent, [(name, single.size)], single=True)
    except StorageError as e:
        raise DataError(f"data.uri: {e}") from None
    if too_big:
        log.warning(
            "data.uri: %d image file(s) under %s of more than %d GiB left out (no image Pillow decodes "
            "is that large; reading one whole would cost a decode worker as much memory): %s%s",
            len(too_big),
            redact(storage.uri),
            MAX_IMAGE_BYTES >> 30,
            "; ".join(too_big[:5]),
            " ..." if len(too_big) > 5 else "",
        )
    layout = spec.layout
    if layout == "auto":
        if images and parquets:
            raise DataError(
                f"data.uri: {redact(storage.uri)} holds both image files and .parquet files; "
                "set data.layout to folder or parquet"
            )
        layout = "parquet" if parquets else "folder"
    if layout == "parquet":
        if not parquets:
            raise DataError(f"data.uri: no .parquet files under {redact(storage.uri)}")
        return _resolve_parquet(spec, storage, parquets, single=False)
    if not images:
        raise DataError(
            f"data.uri: no images under {redact(storage.uri)} (expected {{split}}/{{class}}/{{file}} "
            f"with one of {', '.join(IMAGE_EXTENSIONS)})"
        )
    return _resolve_folder(spec, storage, images)


def _local_files(root: str) -> list[tuple[str, int]]:
    """(key, size) of the regular files under a local data folder, sorted by key.

    Unlike `LocalStorage.list`, which guards checkpoints, this follows links to folders: a
    class folder that is a link (`train/n01440764 -> /mnt/imagenet/...`, common where ImageNet
    is shared) would otherwise vanish from the data without a word, and with it a class.

    The walk is bounded by the folders the data is made of, whatever the links say:

    - a link to a folder that holds it (`..`, the data folder, one of its ancestors, `/`) is
      not followed: it is a cycle at best, and at worst a walk of the whole machine;
    - each real folder is listed once. Two paths to one folder (a link to a sibling, two links
      to one place, a lattice of links that doubles the paths at every level) would list the
      same images twice, under two labels or in train and test. The path with the fewest
      links wins (a folder's own path inside the data folder has none), then the first in
      sorted order, so a link never displaces a real folder, and the listing does not depend
      on the order the file system returns names in.

    What cannot be an example is left out with a warning that names it: a FIFO (reading it
    would block a decode worker or the index forever), a socket, a device, a link to nothing,
    and a name that is not UTF-8 (the index and the result rows hold names as text)."""
    import heapq
    import os
    import stat

    found: list[tuple[str, int]] = []
    left_out: list[str] = []  # files
    not_followed: list[str] = []  # folders
    listed: dict[tuple[int, int], str] = {}  # (device, inode) of a folder -> the path listed
    # folders to list: (links on the path, key prefix, path); fewest links first, then by key
    pending: list[tuple[int, str, str]] = [(0, "", root)]
    while pending:
        links, prefix, folder = heapq.heappop(pending)
        try:
            st = os.stat(folder)
            ident = (st.st_dev, st.st_ino)
            if ident in listed:
                not_followed.append(f"{folder} (the folder {listed[ident]} again; listed once)")
                continue
            listed[ident] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            not_followed.append(f"{folder} ({e.strerror or e})")
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints): never data
            path = os.path.join(folder, name)
            key = prefix + name
            try:
                is_folder = entry.is_dir()  # follows a link
            except OSError:
                is_folder = False
            if is_folder:
                is_link = entry.is_symlink()
                if is_link:
                    target, here = os.path.realpath(path), os.path.realpath(folder)
                    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
                        not_followed.append(f"{path} (a link to a folder that holds it)")
                        continue
                heapq.heappush(pending, (links + is_link, key + "/", path))
                continue
            if not key.lower().endswith((".parquet", *IMAGE_EXTENSIONS)):
                continue  # not data: skipped without a word, as before
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                left_out.append(f"{path.encode('utf-8', 'surrogateescape')!r} (a name that is not UTF-8)")
                continue
            try:
                st = os.stat(path)
            except OSError as e:
                left_out.append(f"{path} ({e.strerror or e})")
                continue
            if not stat.S_ISREG(st.st_mode):
                left_out.append(f"{path} (not a regular file)")
                continue
            found.append((key, st.st_size))
    for what, names in (("folder(s)", not_followed), ("file(s)", left_out)):
        if names:
            log.warning(
                "data.uri: %d %s under %s left out: %s%s",
                len(names),
                what,
                root,
                "; ".join(names[:5]),
                " ..." if len(names) > 5 else "",
            )
    return sorted(found)


# fields that only the Parquet layout reads: set for a folder tree, they would be ignored
PARQUET_ONLY = ("image_column", "label_column", "split_column")


def _check_folder_fields(spec: ImagesData, where: str) -> None:
    """Refuse a Parquet-only field set away from its default on a folder tree: a user who set
    `split_column: fold` meant it to decide something, and ignoring it would probe other
    splits than the ones they asked for, without a word."""
    why = "data.layout is folder" if spec.layout == "folder" else "it holds image files, no .parquet files"
    for name in PARQUET_ONLY:
        value = getattr(spec, name)
        if value != ImagesData.model_fields[name].default:
            raise DataError(
                f"data.{name}: {value!r} names a Parquet column, but {where} is an image folder tree "
                f"({why}), where the folders give the labels and splits (data.splits maps them); "
                f"remove data.{name}"
            )


def _resolve_folder(spec: ImagesData, storage: Storage, keys: list[str]) -> ImageIndex:
    where = redact(storage.uri)
    _check_folder_fields(spec, where)
    by_group: dict[str, dict[str, list[str]]] = {}
    loose: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) < 3:
            folder = parts[0] if len(parts) == 2 else "."
            loose[folder] = loose.get(folder, 0) + 1
            continue
        by_group.setdefault(parts[0], {}).setdefault(parts[1], []).append(key)
    if loose:
        # one line, not one per folder: a data.uri one level too deep (ImageNet's train/) has
        # a thousand such folders
        shown = [f"{where}/{f}/" if f != "." else f"{where}/" for f in sorted(loose)]
        count = sum(loose.values())
        if not by_group:
            raise DataError(
                f"data.uri: no {{split}}/{{class}}/{{file}} images under {where}, but {count} image(s) "
                f"directly in {shown[0]}{' and others' if len(shown) > 1 else ''}: is it a split or a "
                "class folder? Give the folder that holds the split folders (train/, val/)"
            )
        log.warning(
            "data.uri: %d image(s) directly in %s are not in a class folder ({split}/{class}/{file}); ignored",
            count,
            ", ".join(shown[:3]) + (f" and {len(shown) - 3} more folder(s)" if len(shown) > 3 else ""),
        )
    what = f"the folders of {where}"
    found = {g: sum(len(v) for v in classes.values()) for g, classes in by_group.items()}
    sources = _map_sources(spec, found, set(found), what)
    train_source = sources["train"]
    assert train_source is not None
    classes = sorted(by_group[train_source])
    class_id = {c: i for i, c in enumerate(classes)}
    groups: dict[str, _Group] = {}
    for g in {s for s in sources.values() if s is not None}:
        unknown = sorted(set(by_group[g]) - set(class_id))
        root = getattr(storage, "root", None)
        if unknown and root is not None:
            import os

            empty = [c for c in unknown if os.path.isdir(os.path.join(root, train_source, c))]
            if empty:  # "a class that train/ does not have" sent users looking at a folder that is there
                raise DataError(
                    f"data.uri: {where}/{train_source}/{empty[0]}/ has no image files, but {where}/{g}/{empty[0]}/ "
                    f"has ({len(empty)} such class(es)); a probe cannot learn a class it never sees"
                )
        if unknown:
            raise DataError(
                f"data.uri: {where}/{g}/{unknown[0]}/ is a class that {train_source}/ does not have "
                f"({len(unknown)} such); class ids come from the folders of {train_source}/"
            )
        keys_g = [k for c in sorted(by_group[g]) for k in by_group[g][c]]
        labels = [class_id[c] for c in sorted(by_group[g]) for _ in by_group[g][c]]
        groups[g] = _Group(labels=np.asarray(labels, dtype=np.int64), keys=np.asarray(keys_g, dtype=object))
    splits, described = _draw(spec, sources, groups, what, suffix="/")
    return ImageIndex(
        layout="folder",
        uri=spec.uri,
        root=storage.uri,
        identity=identity(spec),
        classes=classes,
        sources=described,
        splits=splits,
    )


def _file_group(key: str) -> str:
    """The split a Parquet file is named after: the leading letters of its name
    (`train-00000-of-00257.parquet`: train), or of its folder's (`validation/0000.parquet`)."""
    for part in reversed(key.split("/")):
        m = re.match(r"[A-Za-z]+", part)
        if m:
            return m.group(0).lower()
    return ""


def _resolve_parquet(
    spec: ImagesData, storage: Storage, files: list[tuple[str, int]], *, single: bool
) -> ImageIndex:
    where = redact(storage.uri)
    files = sorted(files)
    with ThreadPoolExecutor(max_workers=8 if getattr(storage, "root", None) is None else 2) as pool:
        read = list(pool.map(lambda f: _read_parquet_file(spec, storage, *f), files))

    # class names: Hugging Face ClassLabel names, string labels, or none (integer ids)
    names = {tuple(r["names"]) for r in read if r["names"] is not None}
    string_labels = {r["string"] for r in read}
    if len(string_labels) > 1:
        raise DataError(
            f"data.label_column: {spec.label_column!r} holds strings in some files, integers in others"
        )
    classes: list[str] | None = None
    if True in string_labels:
        classes = sorted({v for r in read for v in r["labels"].tolist()})
        ids = {c: i for i, c in enumerate(classes)}
        for r in read:
            r["labels"] = np.asarray([ids[v] for v in r["labels"].tolist()], dtype=np.int64)
    elif len(names) == 1:
        classes = list(next(iter(names)))
    elif len(names) > 1:
        # label 0 is one class in some files and another in others: probing across them
        # would mix classes up without a word
        (key_a, a), (key_b, b) = [
            next((k, r["names"]) for (k, _), r in zip(files, read) if tuple(r["names"] or ()) == n)
            for n in sorted(names)[:2]
        ]
        diff = next(i for i in range(max(len(a), len(b))) if a[i : i + 1] != b[i : i + 1])
        raise DataError(
            f"data.label_column: the files name different classes for {spec.label_column!r} "
            f"(label {diff} is {_name_at(a, diff)} in {key_a}, {_name_at(b, diff)} in {key_b}); "
            "labels must mean the same class in every file"
        )

    # source splits: values of split_column, or the split each file is named after
    if spec.split_column is not None:
        what = f"values of data.split_column {spec.split_column!r}"
        group_of = [r["split"] for r in read]
    else:
        what = f"the Parquet files of {where} (by name: train-*.parquet, validation-*, test-*)"
        if single:
            raise DataError(
                f"data.split_column: {where} is a single Parquet file; name the column that says "
                "each row's split (train/val/test), or give a folder of files named train-*, validation-*, test-*"
            )
        group_of = [
            np.full(len(r["labels"]), _file_group(key), dtype=object) for (key, _), r in zip(files, read)
        ]

    labels = np.concatenate([r["labels"] for r in read])
    groups_all = np.concatenate(group_of).astype(str) if labels.size else np.zeros(0, dtype=str)
    file_id = np.concatenate([np.full(len(r["labels"]), i, dtype=np.int32) for i, r in enumerate(read)])
    row_group = np.concatenate([r["row_group"] for r in read])
    group_row = np.concatenate([r["group_row"] for r in read])
    row = np.concatenate([r["row"] for r in read])
    unit_offset = np.cumsum([0] + [r["num_row_groups"] for r in read])[:-1]
    unit = unit_offset[file_id] + row_group
    file_keys = np.asarray([k for k, _ in files], dtype=object)

    found: dict[str, int] = {}
    labelled: set[str] = set()
    for g in np.unique(groups_all):
        mask = groups_all == g
        found[str(g)] = int(mask.sum())
        lab = labels[mask]
        if (lab >= 0).all():
            labelled.add(str(g))
        elif (lab < 0).all():
            log.info("data.uri: the %r rows have no labels (all negative); not used for probing", str(g))
        else:
            raise DataError(
                f"data.label_column: {int((lab < 0).sum())} of the {str(g)!r} rows have negative labels; "
                "labels must be class indices >= 0"
            )
    sources = _map_sources(spec, found, labelled, what)
    train_source = sources["train"]
    assert train_source is not None
    train_labels = set(np.unique(labels[groups_all == train_source]).tolist())
    for split, g in sources.items():
        if g is None or g == train_source:
            continue
        unknown = sorted(set(np.unique(labels[groups_all == g]).tolist()) - train_labels)
        if unknown:
            named = classes is not None and unknown[0] < len(classes)  # not so: an error below
            label = f"{unknown[0]} ({classes[unknown[0]]!r})" if classes is not None and named else unknown[0]
            raise DataError(
                f"data.label_column: label {label} is in the {g!r} rows ({split}) but in none of the "
                f"{train_source!r} rows (train), {len(unknown)} such; a probe cannot learn a class "
                "it never sees (the folder layout refuses the same)"
            )
    groups = {}
    for g in {s for s in sources.values() if s is not None}:
        rows = np.flatnonzero(groups_all == g)
        groups[g] = _Group(
            labels=labels[rows],
            keys=file_keys[file_id[rows]],
            row_group=row_group[rows],
            group_row=group_row[rows],
            row=row[rows],
            unit=unit[rows],
        )
    if classes is not None:
        top = max(int(g.labels.max()) for g in groups.values())
        if top >= len(classes):
            raise DataError(
                f"data.label_column: label {top} but the files name {len(classes)} classes; labels must be below it"
            )
    splits, described = _draw(spec, sources, groups, what, suffix="")
    big = [
        f"{k} ({n} rows)"
        for k, n in ((k, r["max_group_rows"]) for (k, _), r in zip(files, read))
        if n > _BIG_ROW_GROUP_ROWS
    ]
    if big:
        log.warning(
            "data.uri: %d file(s) have row groups of more than %d rows (%s); a row group is decoded in "
            "pieces that each read it from its start, so rewrite them with row_group_size around 100-1000 "
            "for speed",
            len(big),
            _BIG_ROW_GROUP_ROWS,
            big[0],
        )
    return ImageIndex(
        layout="parquet",
        uri=spec.uri,
        root=storage.uri,
        identity=identity(spec),
        classes=classes,
        sources=described,
        splits=splits,
        files=dict(files),
    )


def _read_parquet_file(spec: ImagesData, storage: Storage, key: str, size: int) -> dict[str, Any]:
    """A Parquet file's columns checked, and its labels (and split values) read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from probeserve.images.decode import _RangeReader

    where = redact(storage.uri_for(key))
    try:
        if getattr(storage, "root", None) is not None:
            pf = pq.ParquetFile(storage.uri_for(key))
        else:
            # a Python file object: read on this thread only (see results.arrow_owned)
            pf = pq.ParquetFile(pa.PythonFile(_RangeReader(storage, key, size), mode="r"), pre_buffer=False)
        schema = pf.schema_arrow
        names = schema.names
        for fld, column in (
            ("image_column", spec.image_column),
            ("label_column", spec.label_column),
            ("split_column", spec.split_column),
        ):
            if column is not None and column not in names:
                raise DataError(
                    f"data.{fld}: no column {column!r} in {where}; its columns: {', '.join(names)}"
                )
        image_type = schema.field(spec.image_column).type
        if not _is_image_type(image_type):
            raise DataError(
                f"data.image_column: column {spec.image_column!r} of {where} has type {image_type}; expected "
                "encoded image bytes (binary) or a struct with a binary 'bytes' field"
            )
        columns = [spec.label_column] + ([spec.split_column] if spec.split_column else [])
        table = pf.read(columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"data.uri: {where} is not a readable Parquet file ({e})") from None
    label_col = table.column(spec.label_column).combine_chunks()
    if pa.types.is_dictionary(label_col.type):
        label_col = label_col.dictionary_decode()
    if label_col.null_count:
        raise DataError(
            f"data.label_column: column {spec.label_column!r} of {where} has {label_col.null_count} null(s)"
        )
    t = label_col.type
    if pa.types.is_integer(t):
        from probeserve.data import MAX_CLASSES

        raw = label_col.to_numpy(zero_copy_only=False)
        # checked before the cast: a uint64 label of 2**64-1 would become -1, "unlabelled"
        if raw.size and raw.max() >= MAX_CLASSES:
            raise DataError(
                f"data.label_column: label {int(raw.max())} in {where}; labels must be class indices "
                f"below {MAX_CLASSES} (a probe has an output for every index up to the largest)"
            )
        labels, string = raw.astype(np.int64), False
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        labels, string = np.asarray(label_col.to_pylist(), dtype=object), True
    else:
        raise DataError(
            f"data.label_column: column {spec.label_column!r} of {where} has type {t}; expected integers "
            "(class ids) or strings (class names)"
        )
    split = None
    if spec.split_column:
        col = table.column(spec.split_column).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.dictionary_decode()
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)) or col.null_count:
            raise DataError(
                f"data.split_column: column {spec.split_column!r} of {where} must hold split names (strings, no nulls)"
            )
        split = np.asarray(col.to_pylist(), dtype=object)
    meta = pf.metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    n = len(labels)
    return {
        "labels": labels,
        "string": string,
        "names": _hf_class_names(schema, spec.label_column),
        "split": split,
        "num_row_groups": len(sizes),
        "max_group_rows": max(sizes, default=0),
        "row_group": np.repeat(np.arange(len(sizes), dtype=np.int32), sizes),
        "group_row": np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
        if sizes
        else np.zeros(0, np.int64),
        "row": np.arange(n, dtype=np.int64),
    }


def _name_at(names: list[str], i: int) -> str:
    return repr(names[i]) if i < len(names) else "not named"


def _is_image_type(t: Any) -> bool:
    import pyarrow as pa

    def binary(x: Any) -> bool:
        return pa.types.is_binary(x) or pa.types.is_large_binary(x)

    if binary(t):
        return True
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and binary(t.field(idx).type)
    return False


def _hf_class_names(schema: Any, label_column: str) -> list[str] | None:
    """Class names a Hugging Face export keeps in its schema metadata (a ClassLabel)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _map_sources(
    spec: ImagesData, found: dict[str, int], labelled: set[str], what: str
) -> dict[str, str | None]:
    """Probe split -> source split (None: val carved from train); see `ImagesData.splits`."""
    listing = ", ".join(f"{g!r} ({n})" for g, n in sorted(found.items())) or "none"
    if spec.splits is not None:
        sources: dict[str, str | None] = {s: spec.splits.get(s) for s in SPLITS}
        for split, source in sources.items():
            if source is None:
                continue
            if source not in found:
                raise DataError(f"data.splits.{split}: no {source!r} among {what}; found {listing}")
            if source not in labelled:
                raise DataError(f"data.splits.{split}: the {source!r} examples have no labels (all negative)")
    else:
        if "train" not in labelled:
            raise DataError(
                f"data.uri: no 'train' split among {what}; found {listing}. Set data.splits, "
                "e.g. {train: ..., test: ...}"
            )
        val = next((g for g in ("val", "validation") if g in labelled), None)
        test = "test" if "test" in labelled else val
        if test is None:
            raise DataError(
                f"data.uri: no test split among {what} (need 'test', 'val' or 'validation'); found {listing}. "
                "Set data.splits"
            )
        sources = {"train": "train", "val": val if test == "test" else None, "test": test}
    if spec.splits is None:
        unused = sorted(labelled - set(sources.values()))
        if unused:
            # `valid/` next to train/ and test/: the user may well have meant it as val
            log.warning(
                "data.uri: %s among %s not used (the default takes train, val or validation, and test); "
                "set data.splits to use %s",
                ", ".join(f"{g!r} ({found[g]})" for g in unused),
                what,
                "it" if len(unused) == 1 else "them",
            )
    if sources["val"] == sources["train"]:
        sources["val"] = None  # val from the train source: carved from it
    if sources["test"] == sources["train"]:
        raise DataError(
            f"data.splits: test and train both come from {sources['train']!r}; test must be apart"
        )
    if sources["val"] is not None and sources["val"] == sources["test"]:
        raise DataError(
            f"data.splits: val and test both come from {sources['val']!r}; set val: null to carve val from train"
        )
    return sources


def _check_size(fld: str, requested: int, available: int, what: str) -> None:
    if requested > available:
        raise DataError(f"data.{fld}: {requested} is more than the {available} {what}")


def _draw(
    spec: ImagesData, sources: dict[str, str | None], groups: dict[str, _Group], what: str, *, suffix: str
) -> tuple[dict[str, SplitIndex], dict[str, dict[str, Any]]]:
    """Seeded subsets of each source, in each layout's order (module docstring)."""
    train_src = sources["train"]
    assert train_src is not None
    train_group = groups[train_src]
    n_train = len(train_group.labels)
    perm = _rng(spec.seed, "images/train").permutation(n_train)
    picks: dict[str, tuple[str, np.ndarray]] = {}
    if sources["val"] is None:
        _check_size(
            "val_size", spec.val_size, n_train, f"examples in {train_src}{suffix} (val is carved from it)"
        )
        picks["val"] = (train_src, perm[: spec.val_size])
        rest = perm[spec.val_size :]
    else:
        rest = perm
        val_group = groups[sources["val"]]
        val_perm = _rng(spec.seed, "images/val").permutation(len(val_group.labels))
        picks["val"] = (sources["val"], val_perm[: spec.val_size])  # val_size: at most this many
    train_n = len(rest) if spec.train_size is None else spec.train_size
    _check_size("train_size", train_n, len(rest), f"examples left in {train_src}{suffix}")
    picks["train"] = (train_src, rest[:train_n])
    test_src = sources["test"]
    assert test_src is not None
    test_group = groups[test_src]
    test_perm = _rng(spec.seed, "images/test").permutation(len(test_group.labels))
    test_n = len(test_perm) if spec.test_size is None else spec.test_size
    _check_size("test_size", test_n, len(test_perm), f"examples in {test_src}{suffix}")
    picks["test"] = (test_src, test_perm[:test_n])

    splits: dict[str, SplitIndex] = {}
    described: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        src, positions = picks[split]
        group = groups[src]
        if group.unit is not None:  # parquet: row groups in a seeded order, rows in file order
            assert group.row is not None
            rank = _rng(spec.seed, f"images/{split}/order").permutation(int(group.unit.max()) + 1)
            positions = positions[np.lexsort((group.row[positions], rank[group.unit[positions]]))]
        if len(positions) == 0:
            raise DataError(f"data.uri: the {split} split is empty ({src}{suffix} among {what})")
        splits[split] = group.take(positions)
        described[split] = {
            "source": src,
            "examples": len(positions),
            "of": len(group.labels),
            "carved_from_train": split == "val" and sources["val"] is None,
        }
    log.info(
        "data: %s",
        "; ".join(
            f"{s} from {d['source']}{suffix} ({d['examples']} of {d['of']}"
            + (", carved" if d["carved_from_train"] else "")
            + ")"
            for s, d in described.items()
        ),
    )
    return splits, described
