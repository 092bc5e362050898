"""Checkpoints: find them, decide which are complete, write them, and load them safely.

A training job writes a weights file, then a small marker object next to it, last. The
marker means "this checkpoint is whole"; without it a checkpoint may still be uploading and
is skipped (and reported). `save_checkpoint` does both steps for training loops.

Checkpoints are untrusted input. Loading accepts safetensors (no code can run), and torch
zip files only through `torch.load(weights_only=True)` on a torch that has the known
bypasses fixed. Everything else, including plain pickles, is refused before it is parsed.
Sizes are checked before reading (a safetensors header too: parsing one costs time and
memory), and the marker's SHA-256 (when present) catches a truncated or replaced weights
file. In a local folder only regular files are read, and symbolic links that lead out of
`checkpoints.uri` are refused, in discovery and in loading: a checkpoint folder is written by
a training job, and must not make probeserve read files elsewhere on the machine. Tensors
whose dtype the model would cast lossily (integers or booleans into floating-point weights)
are refused; float-to-float casts are allowed and reported.

Discovery and markers need no torch, and the watch daemon, `probeserve status` and the report
use only them; so torch is imported inside the functions that write or load tensors, and
importing this module does not load it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from probeserve.errors import CheckpointError, StorageError, first_line
from probeserve.spec import CheckpointsSpec
from probeserve.staging import StagingDir
from probeserve.storage import LocalStorage, NotAFile, Storage, join, open_storage

if TYPE_CHECKING:
    import torch

DEFAULT_MARKER = "COMPLETE"
# torch.load(weights_only=True) had code-execution bypasses before 2.6 and again before 2.10.
MIN_SAFE_TORCH = (2, 10)
# The header lists every tensor's name, dtype, shape and offsets (about 100 bytes each) and
# optional string metadata. Python and safetensors both parse all of it before any check can
# run, in time and memory that grow with it (a 100 MB header took a gigabyte and tens of
# seconds); 16 MiB still holds over 100,000 tensors.
SAFETENSORS_MAX_HEADER = 16 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: its weights object, relative to the checkpoints prefix."""

    key: str
    step: int
    size: int
    mtime: float

    @property
    def name(self) -> str:
        """The checkpoint's identity in results: its weights key."""
        return self.key


@dataclass
class Discovery:
    """What a scan of the checkpoint prefix found."""

    complete: list[Checkpoint] = field(default_factory=list)
    incomplete: list[Checkpoint] = field(default_factory=list)  # no marker yet
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def marker_key(weights_key: str, marker: str = DEFAULT_MARKER) -> str:
    folder, name = posixpath.split(weights_key)
    stem = name.split(".", 1)[0]
    return join(folder, marker.format(stem=stem))


_MAX_STEP = 2**63 - 1  # the results table's int64


def _unsafe_key(key: str) -> str | None:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a local file name that is not UTF-8 (it arrives surrogate-escaped)
        return "key is not valid UTF-8"
    if key.startswith("/") or "\\" in key:
        return "absolute-looking key"
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "key with empty, '.' or '..' parts"
    return None


def _confined(storage: Storage) -> Storage:
    """A local checkpoints folder whose reads refuse links out of it; other storage as it is."""
    if isinstance(storage, LocalStorage) and not storage.confine:
        return LocalStorage(storage.root, confine=True)
    return storage


def _leaves(storage: Storage, key: str) -> str | None:
    """Why `key` is refused when a symbolic link on its way leads out of the folder; else None."""
    if not isinstance(storage, LocalStorage):
        return None  # object stores have no links
    real = storage.outside(key)
    return None if real is None else f"a symbolic link to {real}, outside checkpoints.uri"


def discover(
    storage: Storage, spec: CheckpointsSpec, *, now: float | None = None, page_size: int = 1000
) -> Discovery:
    """One full listing of the prefix, `page_size` keys per request, sorted by (step, key)."""
    if not storage.root_exists():
        raise StorageError(f"checkpoints.uri: {storage.uri} does not exist")
    objects = {o.key: o for o in storage.list("", page_size=page_size)}
    step_re = re.compile(spec.step_regex)
    now = time.time() if now is None else now
    found = Discovery()
    for key, obj in objects.items():
        if not fnmatch.fnmatchcase(key, spec.weights):
            continue
        reason = _unsafe_key(key)
        if reason:
            printable = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            found.rejected.append((printable, reason))
            continue
        reason = _leaves(storage, key)
        if reason:
            found.rejected.append((key, reason))
            continue
        m = step_re.search(key)
        if not m:
            found.rejected.append(
                (key, f"no step: checkpoints.step_regex {spec.step_regex!r} does not match")
            )
            continue
        try:
            step = int(m.group(1))
        except ValueError:
            found.rejected.append((key, f"step {m.group(1)!r} is not an integer"))
            continue
        if step > _MAX_STEP:
            found.rejected.append((key, f"step {step} is out of range (at most {_MAX_STEP})"))
            continue
        if spec.steps is not None and step not in spec.steps:
            continue
        ckpt = Checkpoint(key=key, step=step, size=obj.size, mtime=obj.mtime)
        if spec.completeness == "marker":
            marker = marker_key(key, spec.marker)
            done = marker in objects
            reason = _leaves(storage, marker) if done else None
            if reason:
                found.rejected.append((key, f"its marker {marker} is {reason}"))
                continue
        elif spec.completeness == "stable_size":
            done = now - obj.mtime >= spec.stable_seconds
        else:
            done = True
        (found.complete if done else found.incomplete).append(ckpt)
    for group in (found.complete, found.incomplete):
        group.sort(key=lambda c: (c.step, c.key))
    return found


def _state_dict(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else dict(obj)
    # safetensors refuses tensors that share memory; a copy per tensor makes each its own
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_checkpoint(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    uri: str,
    step: int,
    *,
    marker: str = DEFAULT_MARKER,
    metadata: Mapping[str, str] | None = None,
    s3_endpoint: str | None = None,
) -> str:
    """Write `{uri}/step={step:09d}/model.safetensors`, then its marker; return the weights URI.

    Both objects are published atomically and the marker goes last, so a watcher never sees
    a checkpoint as complete before its weights are whole. The marker records the SHA-256.
    """
    from safetensors.torch import save

    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    storage = open_storage(uri, s3_endpoint=s3_endpoint)
    key = f"step={step:09d}/model.safetensors"
    meta = {"step": str(step), **(dict(metadata) if metadata else {})}
    blob = save(_state_dict(model), metadata=meta)
    storage.publish_bytes(key, blob)
    info = {
        "step": step,
        "weights": "model.safetensors",
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "format": "safetensors",
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.publish_bytes(marker_key(key, marker), json.dumps(info, indent=2).encode())
    return storage.uri_for(key)


def _torch_is_safe() -> bool:
    import torch

    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return version >= MIN_SAFE_TORCH


def _check_safetensors_header(path: str, size: int, where: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{where}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{where}: truncated or corrupt safetensors file (header of {n} bytes)")
        if n > SAFETENSORS_MAX_HEADER:
            raise CheckpointError(
                f"{where}: safetensors header of {n} bytes is over the {SAFETENSORS_MAX_HEADER} bytes "
                "probeserve parses; refusing to read it"
            )
        try:
            header = json.loads(f.read(n))
        except RecursionError:  # the parser stops at Python's recursion limit: no deeper
            raise CheckpointError(
                f"{where}: corrupt safetensors header: its JSON is nested too deeply to be a header"
            ) from None
        except ValueError as e:  # not JSON, not UTF-8, or a number too long to convert
            raise CheckpointError(f"{where}: corrupt safetensors header ({e})") from None
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError, OverflowError):
            raise CheckpointError(f"{where}: corrupt safetensors header entry {name!r}") from None
        if end > data_bytes:
            raise CheckpointError(
                f"{where}: truncated safetensors file: tensor {name!r} ends at byte {end} "
                f"but only {data_bytes} data bytes are present"
            )


def _check_torch_zip(path: str, size: int, where: str) -> None:
    """Refuse a torch zip file whose entries torch.save would not have written: compressed.

    torch.save stores every entry uncompressed. torch.load reads a compressed storage as its
    raw compressed bytes when it memory-maps the file (silently wrong weights) and inflates it
    without bound otherwise (a zip bomb). The zip's directory is read, not its entries."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{where}: corrupt torch zip file ({e})") from None
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
            raise CheckpointError(
                f"{where}: torch zip entry {entry.filename!r} is compressed ({entry.compress_size} bytes "
                f"that inflate to {entry.file_size}); torch.save never compresses, and torch.load reads "
                "such entries wrongly or without bound: refusing it"
            )
        if entry.header_offset + entry.compress_size > size:
            raise CheckpointError(
                f"{where}: torch zip entry {entry.filename!r} ends past the end of the file: truncated or corrupt"
            )


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 1024 * 1024), b""):
            h.update(block)
    return h.hexdigest()


def _expected_sha256(storage: Storage, ckpt: Checkpoint, spec: CheckpointsSpec) -> str | None:
    try:
        raw = storage.read_bytes(marker_key(ckpt.key, spec.marker), max_bytes=1024 * 1024)
    except NotAFile:
        raise  # a FIFO, a device or a link out of the folder: say so, do not carry on without it
    except StorageError:
        return None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a marker is allowed to be any content, e.g. empty
    return info.get("sha256") if isinstance(info, dict) else None


def _load_file(path: str, where: str) -> dict[str, torch.Tensor]:
    import torch

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        if not _torch_is_safe():
            raise CheckpointError(
                f"{where}: refusing a torch pickle on torch {torch.__version__}, whose "
                "weights_only loader has known bypasses; convert it to safetensors or use torch>=2.10"
            )
        _check_torch_zip(path, size, where)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # the safe unpickler raises several types; none ran code
            first = first_line(e) or type(e).__name__
            raise CheckpointError(f"{where}: refused by torch's weights-only loader: {first}") from None
        if isinstance(obj, Mapping):
            for nested in ("state_dict", "model"):
                if nested in obj and isinstance(obj[nested], Mapping):
                    obj = obj[nested]
                    break
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{where}: a torch file must hold a state dict of tensors")
        return dict(obj)
    if len(head) >= 9 and head[8:9] == b"{":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_safetensors_header(path, size, where)
        try:
            return load_file(path)
        except SafetensorError as e:
            raise CheckpointError(f"{where}: corrupt safetensors file: {e}") from None
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{where}: refusing a plain pickle (it could run code); save safetensors instead"
        )
    raise CheckpointError(
        f"{where}: unsupported checkpoint format (expected safetensors or a torch zip file)"
    )


def load_state_dict(storage: Storage, ckpt: Checkpoint, spec: CheckpointsSpec) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors on the CPU, refusing anything unsafe, oversized or corrupt."""
    where = storage.uri_for(ckpt.key)
    storage = _confined(storage)
    if isinstance(storage, LocalStorage):
        expected = _expected_sha256(storage, ckpt, spec)
        # Checked and read through one open file: a name swapped for a FIFO or a link after
        # the checks cannot change what is read (the loaders reopen it through /proc on Linux).
        with storage.open_regular(ckpt.key) as f:
            size = os.fstat(f.fileno()).st_size
            _check_size(size, spec, where)
            proc = f"/proc/self/fd/{f.fileno()}"
            path = proc if os.path.exists(proc) else where
            if expected and _file_sha256(path) != expected:
                raise CheckpointError(f"{where}: SHA-256 differs from its marker: truncated or modified")
            return _load_file(path, where)
    info = storage.stat(ckpt.key)
    if info is None:
        raise CheckpointError(f"{where}: checkpoint object is gone")
    _check_size(info.size, spec, where)
    expected = _expected_sha256(storage, ckpt, spec)
    # named and locked, so that a run after a kill -9 can tell it is dead and remove it
    staging = StagingDir()
    try:
        path = os.path.join(staging.path, "weights")
        storage.download(ckpt.key, path)
        if expected and _file_sha256(path) != expected:
            raise CheckpointError(f"{where}: SHA-256 differs from its marker: truncated or modified")
        sd = _load_file(path, where)
        # safetensors' load_file copies into tensors; torch's mmap keeps the file: copy out
        return {k: v.clone() for k, v in sd.items()}
    finally:
        staging.remove()


def _check_size(size: int, spec: CheckpointsSpec, where: str) -> None:
    if size > spec.max_bytes:
        raise CheckpointError(
            f"{where}: {size} bytes is over checkpoints.max_bytes ({spec.max_bytes}); refusing to read it"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(dtype: torch.dtype) -> str:
    import torch

    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "int"


def check_dtypes(
    state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], *, where: str, model: str
) -> dict[str, str]:
    """Refuse the tensors `Module.load_state_dict` would cast into something else; return the
    casts it will do that keep the values: {name: "float64->float32"}.

    `load_state_dict` copies each tensor into the model's with `Tensor.copy_`, which casts any
    dtype to any other without a word: int32 bits become float weights, floats are truncated
    into integer buffers, booleans become 0.0 and 1.0. Those give a model that is not the
    checkpoint, so they are refused, naming the tensor and both dtypes. A float into another
    float (float64, float16, bfloat16 into float32) keeps the value up to rounding; an integer
    into another integer keeps it when it fits (BatchNorm's int64 `num_batches_tracked`)."""
    import torch

    casts: dict[str, str] = {}
    for name, target in model_state.items():  # in the model's order
        tensor = state.get(name)
        if tensor is None or tensor.dtype == target.dtype:
            continue  # a missing or unexpected key is load_state_dict's to report
        src, dst = tensor.dtype, target.dtype
        what = f"{_dtype_name(src)}->{_dtype_name(dst)}"
        if _kind(src) != _kind(dst):
            raise CheckpointError(
                f"{where}: tensor {name!r} is {_dtype_name(src)} in the checkpoint but {_dtype_name(dst)} in "
                f"model.factory {model}; refusing to load it ({_kind(src)} values cast to {_kind(dst)} "
                "give a model that is not the checkpoint)"
            )
        if _kind(src) == "int" and tensor.numel():
            info = torch.iinfo(dst)
            if int(tensor.min()) < info.min or int(tensor.max()) > info.max:
                raise CheckpointError(
                    f"{where}: tensor {name!r} holds {_dtype_name(src)} values outside the range of "
                    f"{_dtype_name(dst)}, its dtype in model.factory {model}; refusing to load it"
                )
        casts[name] = what
    return casts


def describe_casts(casts: Mapping[str, str], *, max_names: int = 8) -> str | None:
    """A short summary of `check_dtypes`' casts for a result row; None when nothing was cast.

    >>> describe_casts({"fc1.weight": "float64->float32", "fc2.weight": "float64->float32"})
    '2 tensors float64->float32: fc1.weight, fc2.weight'
    """
    if not casts:
        return None
    by_cast: dict[str, list[str]] = {}
    for name, what in casts.items():
        by_cast.setdefault(what, []).append(name)
    parts = []
    for what, names in by_cast.items():
        shown = ", ".join(names[:max_names])
        if len(names) > max_names:
            shown += f" and {len(names) - max_names} more"
        parts.append(f"{len(names)} tensor{'' if len(names) == 1 else 's'} {what}: {shown}")
    return "; ".join(parts)


def load_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Load tensors from bytes in memory (tests and small tools); same checks as files."""
    with tempfile.NamedTemporaryFile(prefix="probeserve-ckpt-") as f:
        f.write(data)
        f.flush()
        return {k: v.clone() for k, v in _load_file(f.name, where).items()}


__all__ = [
    "Checkpoint",
    "Discovery",
    "check_dtypes",
    "describe_casts",
    "discover",
    "load_bytes",
    "load_state_dict",
    "marker_key",
    "save_checkpoint",
]
