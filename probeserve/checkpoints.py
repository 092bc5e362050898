"""Checkpoints: find them, decide which are complete, write them, and load them safely.

A training job writes a weights file, then a small marker object next to it, last. The
marker means "this checkpoint is whole"; without it a checkpoint may still be uploading and
is skipped (and reported). `save_checkpoint` does both steps for training loops.

Checkpoints are untrusted input. Loading accepts safetensors (no code can run), and torch
zip files only through `torch.load(weights_only=True)` on a torch that has the known
bypasses fixed. Everything else, including plain pickles, is refused before it is parsed.
Sizes are checked before reading, and the marker's SHA-256 (when present) catches a
truncated or replaced weights file.
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

import torch

from probeserve.errors import CheckpointError, StorageError
from probeserve.spec import CheckpointsSpec
from probeserve.staging import StagingDir
from probeserve.storage import LocalStorage, Storage, join, open_storage

DEFAULT_MARKER = "COMPLETE"
# torch.load(weights_only=True) had code-execution bypasses before 2.6 and again before 2.10.
MIN_SAFE_TORCH = (2, 10)
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


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


def discover(storage: Storage, spec: CheckpointsSpec, *, now: float | None = None) -> Discovery:
    """One full, paginated listing of the prefix, sorted by (step, key)."""
    if not storage.root_exists():
        raise StorageError(f"checkpoints.uri: {storage.uri} does not exist")
    objects = {o.key: o for o in storage.list("")}
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
            done = marker_key(key, spec.marker) in objects
        elif spec.completeness == "stable_size":
            done = now - obj.mtime >= spec.stable_seconds
        else:
            done = True
        (found.complete if done else found.incomplete).append(ckpt)
    for group in (found.complete, found.incomplete):
        group.sort(key=lambda c: (c.step, c.key))
    return found


def _state_dict(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    return version >= MIN_SAFE_TORCH


def _check_safetensors_header(path: str, size: int, where: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{where}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise CheckpointError(f"{where}: truncated or corrupt safetensors file (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{where}: corrupt safetensors header") from None
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{where}: corrupt safetensors header entry {name!r}") from None
        if end > data_bytes:
            raise CheckpointError(
                f"{where}: truncated safetensors file: tensor {name!r} ends at byte {end} "
                f"but only {data_bytes} data bytes are present"
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
    except StorageError:
        return None
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a marker is allowed to be any content, e.g. empty
    return info.get("sha256") if isinstance(info, dict) else None


def _load_file(path: str, where: str) -> dict[str, torch.Tensor]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        if not _torch_is_safe():
            raise CheckpointError(
                f"{where}: refusing a torch pickle on torch {torch.__version__}, whose "
                "weights_only loader has known bypasses; convert it to safetensors or use torch>=2.10"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # the safe unpickler raises several types; none ran code
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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
    info = storage.stat(ckpt.key)
    if info is None:
        raise CheckpointError(f"{where}: checkpoint object is gone")
    if info.size > spec.max_bytes:
        raise CheckpointError(
            f"{where}: {info.size} bytes is over checkpoints.max_bytes ({spec.max_bytes}); refusing to read it"
        )
    expected = _expected_sha256(storage, ckpt, spec)
    if isinstance(storage, LocalStorage):
        path = storage.uri_for(ckpt.key)
        if expected and _file_sha256(path) != expected:
            raise CheckpointError(f"{where}: SHA-256 differs from its marker: truncated or modified")
        return _load_file(path, where)
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


def load_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    """Load tensors from bytes in memory (tests and small tools); same checks as files."""
    with tempfile.NamedTemporaryFile(prefix="probeserve-ckpt-") as f:
        f.write(data)
        f.flush()
        return {k: v.clone() for k, v in _load_file(f.name, where).items()}


__all__ = [
    "Checkpoint",
    "Discovery",
    "discover",
    "load_bytes",
    "load_state_dict",
    "marker_key",
    "save_checkpoint",
]
