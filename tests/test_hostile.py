"""The red-team's hostile inputs, played against the service.

Malicious and malformed checkpoints (pickles with payloads, zip bombs, lying headers, huge
declared sizes, deep nesting, wrong dtypes), hostile names (`.tmp-`, unicode, spaces, `%`,
very long), special files in the checkpoints folder (FIFOs, a `/dev/zero` link, sockets, link
loops, links out of the folder) and an output inside the checkpoints. Each must be refused
with one line that names it, or handled like any other input; none may block, read without
bound, run code or hide a result. The tables are meant to grow with every new finding.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
from helpers import tiny_spec, write_checkpoints
from safetensors.torch import save
from torch import nn

from probeserve import results
from probeserve.checkpoints import (
    Checkpoint,
    check_dtypes,
    describe_casts,
    discover,
    load_bytes,
    load_state_dict,
    marker_key,
    save_checkpoint,
)
from probeserve.cli import main
from probeserve.errors import CheckpointError, LayerError, StorageError
from probeserve.runners.local import run_local
from probeserve.spec import CheckpointsSpec, spec_from_dict
from probeserve.status import run_status
from probeserve.storage import LocalStorage, NotAFile, open_storage
from probeserve.sweep import Sweep, manifest_key


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail, instead of hanging, if the body blocks (a FIFO opened for reading does)."""

    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- malicious and malformed checkpoint files ------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates `proof`."""

    def __init__(self, proof):
        self.proof = str(proof)

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


class EvalPayload(Payload):
    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.proof!r}).touch()",))


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_zip_with(data_entry: bytes, *, compress: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A torch.save file whose one storage entry is replaced (and compressed)."""
    src = zipfile.ZipFile(io.BytesIO(_torch_bytes({"w": torch.arange(4, dtype=torch.float32)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                z.writestr(info.filename, data_entry, compress_type=compress)
            else:
                z.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_STORED)
    return out.getvalue()


def _safetensors(header: bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def _entry(offsets, shape=(2,), dtype="F32") -> bytes:
    return json.dumps({"w": {"dtype": dtype, "shape": list(shape), "data_offsets": offsets}}).encode()


MiB = 1024 * 1024

# (id, makes the file's bytes from the path a payload would create, the error it must get)
HOSTILE_CHECKPOINTS = [
    ("pickle-os-system", lambda p: pickle.dumps(Payload(p)), "refusing a plain pickle"),
    (
        "pickle-protocol-0",
        lambda p: f"cos\nsystem\n(S'touch {p}'\ntR.".encode(),
        "unsupported checkpoint format",
    ),
    (
        "torch-zip-os-system",
        lambda p: _torch_bytes({"w": torch.zeros(2), "x": Payload(p)}),
        "weights-only loader",
    ),
    ("torch-zip-eval", lambda p: _torch_bytes({"x": EvalPayload(p)}), "weights-only loader"),
    (
        "torch-zip-bomb",
        lambda p: _torch_zip_with(b"\0" * (64 * MiB)),
        "is compressed .* that inflate to 67108864",
    ),
    # read raw by torch.load(mmap=True): wrong weights and no error, before the check
    ("torch-zip-deflated-storage", lambda p: _torch_zip_with(bytes(16)), "is compressed"),
    ("torch-zip-truncated", lambda p: _torch_bytes({"w": torch.zeros(64)})[:700], "corrupt torch zip file"),
    ("empty-file", lambda p: b"", "unsupported checkpoint format"),
    ("gguf", lambda p: b"GGUF\x03\x00\x00\x00" + bytes(64), "unsupported checkpoint format"),
    ("safetensors-header-past-end", lambda p: _safetensors(b"{}", length=10**6), "header of 1000000 bytes"),
    ("safetensors-header-2**64-1", lambda p: _safetensors(b"{}", length=2**64 - 1), "truncated or corrupt"),
    (
        "safetensors-header-over-16MiB",
        lambda p: _safetensors(b"{" + b" " * (17 * MiB) + b"}"),
        "header of 17825794 bytes is over the 16777216 bytes probeserve parses",
    ),
    (
        "safetensors-nested-200000-deep",
        lambda p: _safetensors(b'{"a":' * 200_000 + b"1" + b"}" * 200_000),
        "header: its JSON is nested too deeply",
    ),
    ("safetensors-header-a-list", lambda p: _safetensors(b"[1, 2]"), "unsupported checkpoint format"),
    ("safetensors-header-not-utf8", lambda p: _safetensors(b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
    ("safetensors-header-not-json", lambda p: _safetensors(b"{nope"), "corrupt safetensors header"),
    (
        "safetensors-offsets-past-end",
        lambda p: _safetensors(_entry([0, 8000]), bytes(8)),
        "truncated safetensors file: tensor 'w' ends at byte 8000",
    ),
    ("safetensors-offset-1e400", lambda p: _safetensors(_entry([0, 1e400]), bytes(8)), "entry 'w'"),
    (
        "safetensors-offset-5000-digits",
        lambda p: _safetensors(b'{"w": {"data_offsets": [0, ' + b"9" * 5000 + b"]}}"),
        "corrupt safetensors header",
    ),
    (
        "safetensors-huge-declared-shape",
        lambda p: _safetensors(_entry([0, 8], shape=(2**40, 2**20)), bytes(8)),
        "corrupt safetensors file",
    ),
    ("safetensors-unknown-dtype", lambda p: _safetensors(_entry([0, 8], dtype="X99"), bytes(8)), "corrupt"),
]


@pytest.mark.parametrize(
    ("make", "error"), [c[1:] for c in HOSTILE_CHECKPOINTS], ids=[c[0] for c in HOSTILE_CHECKPOINTS]
)
def test_hostile_checkpoint_files_are_refused_naming_them(tmp_path, make, error):
    proof = tmp_path / "payload-ran"
    storage = open_storage(str(tmp_path / "ckpts"))
    key = "step=1/model.safetensors"
    storage.publish_bytes(key, make(proof))
    info = storage.stat(key)
    ckpt = Checkpoint(key=key, step=1, size=info.size, mtime=info.mtime)
    with deadline(60), pytest.raises(CheckpointError, match=error) as raised:
        load_state_dict(storage, ckpt, CheckpointsSpec(uri=storage.uri, completeness="none"))
    message = str(raised.value)
    assert message.startswith(storage.uri_for(key) + ": ") and "\n" not in message
    assert not proof.exists()


def test_the_payloads_do_run_when_unpickled_unsafely(tmp_path):
    # so that the table above can fail: its payloads are live
    for payload, name in ((Payload, "a"), (EvalPayload, "b")):
        pickle.loads(pickle.dumps(payload(tmp_path / name)))
        assert (tmp_path / name).exists()


def test_a_deflated_torch_storage_would_load_wrong_weights_unchecked(tmp_path):
    # what the torch-zip-deflated-storage case guards against: no error, wrong values
    path = tmp_path / "m.pt"
    path.write_bytes(_torch_zip_with(torch.arange(4, dtype=torch.float32).numpy().tobytes()))
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["w"]
    assert not torch.equal(loaded, torch.arange(4, dtype=torch.float32))


# -- weights of the wrong dtype --------------------------------------------------------------

REFUSED_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "bool"]  # safetensors I8 ... BOOL
CAST_DTYPES = ["float64", "float16", "bfloat16"]  # F64, F16, BF16: recorded, not refused


def _through_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return load_bytes(save(state), "step=1/model.safetensors")


@pytest.mark.parametrize("dtype", REFUSED_DTYPES)
def test_integer_and_bool_weights_into_float_parameters_are_refused(dtype):
    model = nn.Linear(3, 2)
    state = _through_safetensors(
        {"weight": torch.ones(2, 3).to(getattr(torch, dtype)), "bias": torch.zeros(2)}
    )
    with pytest.raises(CheckpointError, match=rf"tensor 'weight' is {dtype} in the checkpoint but float32"):
        check_dtypes(state, model.state_dict(), where="step=1/model.safetensors", model="m")


@pytest.mark.parametrize("dtype", CAST_DTYPES)
def test_float_weights_of_another_width_are_cast_and_recorded(dtype):
    model = nn.Linear(3, 2)
    state = _through_safetensors(
        {"weight": torch.ones(2, 3, dtype=getattr(torch, dtype)), "bias": torch.zeros(2)}
    )
    casts = check_dtypes(state, model.state_dict(), where="w", model="m")
    assert casts == {"weight": f"{dtype}->float32"}
    assert describe_casts(casts) == f"1 tensor {dtype}->float32: weight"


def test_integer_buffers_stay_integer_and_other_combinations_are_refused():
    bn = nn.BatchNorm1d(3)  # num_batches_tracked: an int64 buffer
    good = {k: v.clone() for k, v in bn.state_dict().items()}
    assert check_dtypes(_through_safetensors(good), bn.state_dict(), where="w", model="m") == {}
    narrower = {**good, "num_batches_tracked": torch.tensor(7, dtype=torch.int32)}
    assert check_dtypes(narrower, bn.state_dict(), where="w", model="m") == {
        "num_batches_tracked": "int32->int64"
    }
    for bad, what in (
        (torch.tensor(7.5, dtype=torch.float32), "float32 in the checkpoint but int64"),  # truncated by copy_
        (torch.tensor(True), "bool in the checkpoint but int64"),
    ):
        with pytest.raises(CheckpointError, match=what):
            check_dtypes({**good, "num_batches_tracked": bad}, bn.state_dict(), where="w", model="m")
    int8_model = {"n": torch.zeros(1, dtype=torch.int8)}
    with pytest.raises(CheckpointError, match="'n' holds int64 values outside the range of int8"):
        check_dtypes({"n": torch.tensor([300])}, int8_model, where="w", model="m")
    complex_into_float = {"weight": torch.ones(2, 3, dtype=torch.complex64), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match="complex64 in the checkpoint but float32"):
        check_dtypes(complex_into_float, nn.Linear(3, 2).state_dict(), where="w", model="m")
    # and what the refusals prevent: load_state_dict casts every one of these without a word
    model = nn.Linear(3, 2)
    model.load_state_dict(
        {"weight": torch.full((2, 3), 1065353216, dtype=torch.int32), "bias": torch.zeros(2)}
    )
    assert model.weight[0, 0].item() == 1065353216.0  # the int32 bits of 1.0, read as a number


def _save_raw(uri: str, step: int, state: dict[str, torch.Tensor]) -> None:
    storage = open_storage(uri)
    key = f"step={step:09d}/model.safetensors"
    storage.publish_bytes(key, save(state))
    storage.publish_bytes(marker_key(key), b"")


def test_wrong_dtypes_fail_their_items_and_float_casts_are_recorded(tmp_path):
    spec = tiny_spec(tmp_path, layers={"include": ["input", "fc2"]})
    write_checkpoints(spec, steps=(0,))
    model = Sweep(spec).build_model()
    as_f64 = {k: v.double() for k, v in model.state_dict().items()}
    _save_raw(spec.checkpoints.uri, 1, {**as_f64, "fc2.bias": model.state_dict()["fc2.bias"]})
    _save_raw(spec.checkpoints.uri, 2, {**model.state_dict(), "fc1.weight": model.fc1.weight.to(torch.int32)})
    summary = run_local(spec)
    assert summary.ok == 4 and len(summary.failed) == 2
    rows = {(r["step"], r["layer"]): r for r in results.load(spec.output.uri).to_pylist()}
    assert rows[(0, "fc2")]["weights_cast"] is None
    assert rows[(1, "fc2")]["weights_cast"] == "3 tensors float64->float32: fc1.weight, fc1.bias, fc2.weight"
    for layer in ("input", "fc2"):
        assert rows[(2, layer)]["status"] == "failed"
        assert "tensor 'fc1.weight' is int32 in the checkpoint but float32" in rows[(2, layer)]["error"]
    sweep = Sweep(spec)
    ckpt = next(c for c in sweep.discover().complete if c.step == 1)
    manifest = results.read_json(sweep.output, manifest_key("t", ckpt, "fc2"))
    assert manifest["weights_cast"] == {
        n: "float64->float32" for n in ("fc1.weight", "fc1.bias", "fc2.weight")
    }


# -- hostile names ---------------------------------------------------------------------------

LONG = "x" * 230  # fits as a file name, but not with the old temporary suffix around it
HOSTILE_MODULES = ["tmp-proj", "a b%41", "ünï-çødé", LONG]
HOSTILE_LAYERS = ["blk.tmp-proj", "blk.a b%41", "blk.ünï-çødé", f"blk.{LONG}"]
HOSTILE_FOLDERS = ["step=6.tmp-x", "step=7 wïth spaces%2F..%2F", "step=10" + "y" * 200]


def hostile_model(long: int = len(LONG)) -> nn.Module:
    """A model whose module names are all hostile (a module name cannot hold '.' or be '..')."""
    blk = nn.Sequential()
    blk.add_module("tmp-proj", nn.Linear(6, 8))
    blk.add_module("a b%41", nn.ReLU())
    blk.add_module("ünï-çødé", nn.Linear(8, 8))
    blk.add_module("x" * long, nn.Linear(8, 2))
    model = nn.Sequential()
    model.add_module("blk", blk)
    model.input_shape = (6,)
    return model


def hostile_spec(tmp_path, **over):
    spec = {
        "run": "t",
        "checkpoints": {"uri": str(tmp_path / "ckpts")},
        "model": {"factory": "test_hostile:hostile_model"},
        "layers": {"include": HOSTILE_LAYERS},
        "data": {"kind": "gaussian", "dim": 6, "train_size": 100, "val_size": 50, "test_size": 50},
        "probe": {"max_epochs": 5},
        "resources": {"device": "cpu", "torch_threads": 1},
        "output": {"uri": str(tmp_path / "out")},
    }
    return spec_from_dict({**spec, **over})


def test_hostile_layer_and_checkpoint_names_are_listed_probed_queried_and_counted(tmp_path):
    spec = hostile_spec(tmp_path)
    torch.manual_seed(0)
    storage = open_storage(spec.checkpoints.uri)
    for folder in HOSTILE_FOLDERS:
        storage.publish_bytes(f"{folder}/model.safetensors", save(hostile_model().state_dict()))
        storage.publish_bytes(f"{folder}/COMPLETE", b"")
    found = discover(storage, spec.checkpoints)
    assert sorted(c.key.split("/")[0] for c in found.complete) == sorted(HOSTILE_FOLDERS)
    assert not found.rejected and not found.incomplete
    items = len(HOSTILE_FOLDERS) * len(HOSTILE_LAYERS)
    summary = run_local(spec)
    assert (summary.ok, summary.failed) == (items, [])
    rows = results.load(spec.output.uri).to_pylist()  # what `query` shows
    assert sorted((r["checkpoint"].split("/")[0], r["layer"]) for r in rows) == sorted(
        (f, layer) for f in HOSTILE_FOLDERS for layer in HOSTILE_LAYERS
    )
    [status] = run_status(spec.output.uri)
    assert (status["items"], status["done"], status["pending"]) == (items, items, 0)
    assert Sweep(spec).plan().counts() == {"ok": items, "failed": 0, "pending": 0}
    again = run_local(spec)  # nothing is invisible, so nothing is done again
    assert (again.ok, again.skipped_done) == (0, items)


def test_a_layer_name_too_long_for_a_file_name_is_refused_before_any_work(tmp_path):
    spec = hostile_spec(tmp_path, model={"factory": "test_hostile:hostile_model", "kwargs": {"long": 300}})
    spec = spec.model_copy(update={"layers": spec.layers.model_copy(update={"include": ["*"]})})
    save_checkpoint(hostile_model(300), spec.checkpoints.uri, 1)
    with pytest.raises(
        LayerError, match=r"layer 'blk.xxx.*\(304 characters\): .* 304 bytes, over the 247 .*layers.exclude"
    ):
        Sweep(spec).plan()
    assert not os.path.exists(spec.output.uri)  # nothing was written, nothing half-done
    fine = spec.model_copy(update={"layers": spec.layers.model_copy(update={"exclude": ["blk.xxx*"]})})
    assert run_local(fine).failed == []


def test_checkpoint_keys_with_dotdot_or_backslashes_are_rejected_not_read():
    class Listing:
        uri = "fake://"

        def root_exists(self):
            return True

        def list(self, prefix="", *, page_size=1000):  # the Storage protocol
            from probeserve.storage import ObjectInfo

            keys = [
                "step=1/../../etc/model.safetensors",
                "step=2\\..\\model.safetensors",
                "./step=3/model.safetensors",
            ]
            return [ObjectInfo(k, 1, 0.0) for k in keys]

    found = discover(Listing(), CheckpointsSpec(uri="x", completeness="none", weights="*"))
    assert found.complete == [] and len(found.rejected) == 3


# -- special files ---------------------------------------------------------------------------


def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    s = socket.socket(socket.AF_UNIX)
    here = os.getcwd()
    os.chdir(os.path.dirname(path))  # a socket's path is limited to about 100 bytes
    try:
        s.bind(os.path.basename(path))
    finally:
        os.chdir(here)
    s.close()


SPECIAL_FILES = [
    ("fifo", _fifo, "a FIFO \\(named pipe\\), not a regular file"),
    ("socket", _socket, "a socket, not a regular file"),
    ("folder", os.mkdir, "a folder, not a regular file"),
    (
        "link-to-fifo",
        lambda p: (_fifo(p + ".fifo"), os.symlink(p + ".fifo", p)),
        "a symbolic link to .*, a FIFO",
    ),
    ("link-loop", lambda p: os.symlink(os.path.basename(p), p), "Too many levels of symbolic links"),
]


@pytest.mark.parametrize(("make", "error"), [c[1:] for c in SPECIAL_FILES], ids=[c[0] for c in SPECIAL_FILES])
def test_reads_of_special_files_are_refused_without_blocking(tmp_path, make, error):
    storage = LocalStorage(str(tmp_path))
    make(str(tmp_path / "thing"))
    for read in (
        lambda: storage.read_bytes("thing", max_bytes=1 << 20),
        lambda: storage.download("thing", str(tmp_path / "copy")),
    ):
        with deadline(10), pytest.raises(StorageError, match=error) as raised:
            read()
        assert str(raised.value).startswith(str(tmp_path / "thing") + ": ")


def _run_capped(
    code: str, *args: str, memory: int = 1 << 30, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run Python code in a child whose memory is capped: a read without bound fails there
    (MemoryError) instead of filling this machine."""

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=cap,
    )


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero on this system")
def test_a_link_to_dev_zero_is_refused_not_read_without_bound(tmp_path):
    os.symlink("/dev/zero", tmp_path / "COMPLETE")
    proc = _run_capped(
        """
        import sys
        from probeserve.storage import LocalStorage
        from probeserve.errors import StorageError
        s = LocalStorage(sys.argv[1])
        for read in (lambda: s.read_bytes("COMPLETE", max_bytes=1 << 20), lambda: s.read_bytes("COMPLETE")):
            try:
                read()
            except StorageError as e:
                print(e)
        """,
        str(tmp_path),
        memory=512 << 20,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert (
            line
            == f"{tmp_path}/COMPLETE: a symbolic link to /dev/zero, a character device, not a regular file; refusing to read it"
        )


def test_a_read_stops_at_the_size_the_file_had(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"0123456789")
    storage = LocalStorage(str(tmp_path))
    real = os.fstat

    class Shrunk:  # what fstat says of a file that grows while it is read
        def __init__(self, st):
            self.st_mode, self.st_size = st.st_mode, 4

    monkeypatch.setattr(os, "fstat", lambda fd: Shrunk(real(fd)))
    with pytest.raises(StorageError, match="grew while it was read"):
        storage.read_bytes("f")


def _checkpoint_tree(tmp_path):
    """A checkpoints folder with one good checkpoint and one of every kind of special file."""
    spec = tiny_spec(tmp_path, layers={"include": ["input"]})
    write_checkpoints(spec, steps=(1,))
    root = spec.checkpoints.uri
    good = os.path.join(root, "step=000000001", "model.safetensors")

    def folder(step):
        path = os.path.join(root, f"step={step}")
        os.makedirs(path)
        return path

    os.mkfifo(os.path.join(folder(2), "model.safetensors"))
    open(os.path.join(root, "step=2", "COMPLETE"), "wb").close()
    os.link(good, os.path.join(folder(3), "model.safetensors"))
    os.mkfifo(os.path.join(root, "step=3", "COMPLETE"))
    os.link(good, os.path.join(folder(4), "model.safetensors"))
    os.symlink("/dev/zero", os.path.join(root, "step=4", "COMPLETE"))
    os.symlink("/dev/zero", os.path.join(folder(5), "model.safetensors"))
    open(os.path.join(root, "step=5", "COMPLETE"), "wb").close()
    _socket(os.path.join(folder(6), "model.safetensors"))
    open(os.path.join(root, "step=6", "COMPLETE"), "wb").close()
    # links out of the folder, to a checkpoint that would load fine
    elsewhere = tmp_path / "elsewhere"
    save_checkpoint(nn.Linear(6, 2), str(elsewhere), 0)
    outside = str(elsewhere / "step=000000000" / "model.safetensors")
    os.symlink(outside, os.path.join(folder(7), "model.safetensors"))
    open(os.path.join(root, "step=7", "COMPLETE"), "wb").close()
    os.link(good, os.path.join(folder(8), "model.safetensors"))
    os.symlink(str(elsewhere / "step=000000000" / "COMPLETE"), os.path.join(root, "step=8", "COMPLETE"))
    os.symlink(
        str(elsewhere / "step=000000000"), os.path.join(root, "step=11")
    )  # a folder link: not followed
    # a link inside the folder is followed like the file it names
    os.symlink(good, os.path.join(folder(9), "model.safetensors"))
    open(os.path.join(root, "step=9", "COMPLETE"), "wb").close()
    os.symlink("loop", os.path.join(folder(10), "model.safetensors"))  # to itself: not an object
    return spec


def test_links_out_of_the_checkpoints_folder_are_rejected_in_discovery_and_refused_in_loading(tmp_path):
    spec = _checkpoint_tree(tmp_path)
    storage = open_storage(spec.checkpoints.uri)
    found = discover(storage, spec.checkpoints)
    rejected = dict(found.rejected)
    outside = os.path.realpath(tmp_path / "elsewhere" / "step=000000000")
    assert rejected == {
        "step=4/model.safetensors": "its marker step=4/COMPLETE is a symbolic link to /dev/zero, "
        "outside checkpoints.uri",
        "step=5/model.safetensors": "a symbolic link to /dev/zero, outside checkpoints.uri",
        "step=7/model.safetensors": f"a symbolic link to {outside}/model.safetensors, outside checkpoints.uri",
        "step=8/model.safetensors": f"its marker step=8/COMPLETE is a symbolic link to {outside}/COMPLETE, "
        "outside checkpoints.uri",
    }
    assert [c.step for c in found.complete] == [1, 2, 3, 6, 9]
    info = os.stat(os.path.join(spec.checkpoints.uri, "step=7", "model.safetensors"))
    escaped = Checkpoint(key="step=7/model.safetensors", step=7, size=info.st_size, mtime=info.st_mtime)
    with pytest.raises(
        NotAFile, match=r"step=7/model.safetensors: a symbolic link to .*elsewhere.*, outside"
    ):
        load_state_dict(storage, escaped, spec.checkpoints)
    inside = next(c for c in found.complete if c.step == 9)
    assert set(load_state_dict(storage, inside, spec.checkpoints)) == {
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
    }


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero on this system")
def test_a_run_over_special_files_fails_their_items_and_finishes(tmp_path):
    spec = _checkpoint_tree(tmp_path)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    # in a child with capped memory and a time limit: without the checks this blocks or
    # reads /dev/zero until memory runs out
    proc = _run_capped(
        "import sys; from probeserve.cli import main; sys.exit(main(sys.argv[1:]))",
        "run",
        str(path),
        "--runner",
        "local",
        memory=4 << 30,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = {r["step"]: r for r in results.load(spec.output.uri).to_pylist()}
    assert {s for s, r in rows.items() if r["status"] == "ok"} == {1, 9}
    root = spec.checkpoints.uri
    expect = {
        2: f"{root}/step=2/model.safetensors: a FIFO (named pipe), not a regular file",
        3: f"{root}/step=3/COMPLETE: a FIFO (named pipe), not a regular file",
        6: f"{root}/step=6/model.safetensors: a socket, not a regular file",
    }
    for step, error in expect.items():
        assert rows[step]["status"] == "failed" and rows[step]["error"].startswith(error), rows[step]["error"]
    assert set(rows) == {1, 2, 3, 6, 9}  # the links out (to /dev/zero too) are rejected, and said so
    assert "skipping step=5/model.safetensors: a symbolic link to /dev/zero, outside" in proc.stderr


# -- an output inside the checkpoints --------------------------------------------------------


@pytest.mark.parametrize(
    ("checkpoints", "output", "refused"),
    [
        ("{tmp}/ckpts", "{tmp}/ckpts", True),
        ("{tmp}/ckpts", "{tmp}/ckpts/probes", True),
        ("{tmp}/ckpts", "file://{tmp}/ckpts/probes", True),
        ("{tmp}/ckpts", "{tmp}/alias/probes", True),  # alias: a link to ckpts
        ("{tmp}/ckpts/", "{tmp}/ckpts/../ckpts/x", True),
        ("{tmp}/ckpts", "{tmp}/ckpts-probes", False),
        ("{tmp}/ckpts/run", "{tmp}/ckpts", False),  # checkpoints inside the output: the demo's layout
        ("s3://b/ckpts", "s3://b/ckpts", True),
        ("s3://b/ckpts", "s3://b/ckpts/probes", True),
        ("s3://b", "s3://b/probes", True),
        ("s3://b/ckpts", "s3://b/ckpts-probes", False),
        ("s3://b/ckpts", "s3://other/ckpts/probes", False),
        ("s3://b/ckpts", "{tmp}/ckpts", False),
    ],
)
def test_an_output_inside_the_checkpoints_is_refused_at_validation(
    tmp_path, capsys, checkpoints, output, refused
):
    os.makedirs(tmp_path / "ckpts")
    os.symlink(tmp_path / "ckpts", tmp_path / "alias")
    spec = tiny_spec(tmp_path).model_dump(mode="json")
    spec["checkpoints"] = {"uri": checkpoints.format(tmp=tmp_path), "weights": "*"}
    spec["output"] = {"uri": output.format(tmp=tmp_path)}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    if refused:
        assert code == 2
        [line] = [x.strip() for x in err.splitlines() if "output.uri" in x]
        # one spec error is one line: `error: SPEC: output.uri: ...`
        assert line.startswith(f"output.uri: {spec['output']['uri']} is ") or (
            f": output.uri: {spec['output']['uri']} is " in line
        )
        assert "checkpoints.uri" in line
    else:
        # validate also opens the output and checks that an s3:// bucket exists (no S3 server
        # here: those fail on that, naming the field), but never for overlapping the checkpoints
        assert "listed as a possible checkpoint" not in err, err
        assert not [x for x in err.splitlines() if "output.uri" in x and "is inside" in x], err
        if not any(spec[k]["uri"].startswith("s3://") for k in ("checkpoints", "output")):
            assert code == 0, err
