"""Storage: the same contract for a local folder and a real S3 server (moto) on loopback."""

from __future__ import annotations

import errno
import http.server
import os
import threading

import pytest

from probeserve.errors import StorageError
from probeserve.storage import (
    LocalStorage,
    S3Storage,
    file_location,
    is_temp_name,
    open_storage,
    publish_file,
    redact,
    temp_name,
)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    return open_storage(f"s3://{bucket}/some/prefix", s3_endpoint=server.endpoint)


def test_publish_read_list(storage):
    storage.publish_bytes("a/b/one.bin", b"1")
    storage.publish_bytes("a/two.bin", b"22")
    storage.publish_bytes("c.bin", b"333")
    assert storage.read_bytes("a/two.bin") == b"22"
    assert [(o.key, o.size) for o in storage.list("")] == [("a/b/one.bin", 1), ("a/two.bin", 2), ("c.bin", 3)]
    assert [o.key for o in storage.list("a/")] == ["a/b/one.bin", "a/two.bin"]
    assert storage.stat("c.bin").size == 3
    assert storage.stat("nope") is None
    storage.publish_bytes("c.bin", b"replaced")
    assert storage.read_bytes("c.bin") == b"replaced"
    storage.delete("c.bin")
    assert storage.stat("c.bin") is None


def test_read_missing_names_key(storage):
    with pytest.raises(StorageError, match="missing/key"):
        storage.read_bytes("missing/key")


def test_max_bytes_refuses_before_reading(storage):
    storage.publish_bytes("big", b"x" * 100)
    with pytest.raises(StorageError, match="over the limit"):
        storage.read_bytes("big", max_bytes=10)


def test_create_only(storage):
    assert storage.create_only("ledger/claim", b"first") is True
    assert storage.create_only("ledger/claim", b"second") is False
    assert storage.read_bytes("ledger/claim") == b"first"


def _race(storage, key: str, size: int = 1) -> list[int]:
    """8 threads create_only the same key, each with its own bytes; the winners' numbers."""
    wins = []

    def claim(i):
        if storage.create_only(key, str(i).encode() * size):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, wins
    assert storage.read_bytes(key) == str(wins[0]).encode() * size
    return wins


def test_create_only_races_have_one_winner(storage):
    _race(storage, "race/x")


def test_create_only_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_links)
    storage = open_storage(str(tmp_path / "root"))
    _race(storage, "race/x", size=1000)
    assert sorted(os.listdir(tmp_path / "root" / "race")) == ["x"]  # no staging files left
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(StorageError, match=r"race/y: cannot write \(I/O error\)"):  # not hidden
        storage.create_only("race/y", b"y")


def test_publish_file_moves_and_publishes(storage, tmp_path):
    src = tmp_path / "staged.bin"
    src.write_bytes(b"payload" * 1000)
    storage.publish_file("files/p.bin", str(src))
    assert storage.read_bytes("files/p.bin") == b"payload" * 1000
    assert not src.exists()


def test_keys_with_dotdot_are_refused(storage):
    with pytest.raises(StorageError, match=r"\.\."):
        storage.publish_bytes("../escape", b"x")


def test_only_probeserve_temp_files_are_invisible(tmp_path):
    s = LocalStorage(str(tmp_path))
    s.publish_bytes("x/real", b"1")
    # ours: today's, and an older version's leftover (`.{name}.tmp-` and a UUID's hex digits)
    for name in (temp_name(), ".real.tmp-" + "0123456789abcdef" * 2):
        assert is_temp_name(name)
        (tmp_path / "x" / name).write_bytes(b"partial")
    # names a user, a layer or a checkpoint folder can have: listed like any other
    users = [
        "x/blk.tmp-proj.parquet",
        "x/.half.tmp-123",
        "x/plain.tmp-" + "a" * 32,
        "step=6.tmp-x/model.safetensors",
    ]
    for key in users:
        assert not is_temp_name(key.rsplit("/", 1)[-1])
        s.publish_bytes(key, b"2")
    assert [o.key for o in s.list("")] == sorted(["x/real", *users])
    assert [o.key for o in s.list("step=6.tmp-x/")] == ["step=6.tmp-x/model.safetensors"]


def test_long_names_that_fit_are_written(tmp_path):
    # the temporary name has a fixed length: a name near the file system's limit (255 bytes)
    # is written, where `.{name}.tmp-{32 hex}` beside it was too long
    s = LocalStorage(str(tmp_path))
    key = "results/" + "x" * 240 + ".parquet"
    s.publish_bytes(key, b"1")
    assert s.create_only("ledger/" + "y" * 250, b"2") is True
    staged = tmp_path / "staged"
    staged.write_bytes(b"3")
    s.publish_file("acts/" + "z" * 250, str(staged))
    assert sorted(o.key for o in s.list("")) == sorted(
        ["results/" + "x" * 240 + ".parquet", "ledger/" + "y" * 250, "acts/" + "z" * 250]
    )
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no staging file left


def test_local_os_errors_name_the_path(tmp_path):
    (tmp_path / "afile").write_bytes(b"x")
    s = LocalStorage(str(tmp_path / "afile"))  # an output "folder" that is a file
    for write in (lambda: s.publish_bytes("runs/spec.json", b"{}"), lambda: s.create_only("a/b", b"1")):
        with pytest.raises(
            StorageError, match=r"afile/.*: cannot write \(Not a directory: a part of the path is a file"
        ):
            write()
    assert s.stat("runs/spec.json") is None
    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(StorageError, match=r"loop: cannot read \(Too many levels of symbolic links"):
        LocalStorage(str(tmp_path)).read_bytes("loop")


@pytest.mark.integration
def test_s3_pagination(s3_server):
    bucket = s3_server.new_bucket()
    s = open_storage(f"s3://{bucket}/p", s3_endpoint=s3_server.endpoint)
    client = s3_server.client()
    for i in range(25):
        client.put_object(Bucket=bucket, Key=f"p/k{i:03d}", Body=b"")
    client.put_object(Bucket=bucket, Key="other/k", Body=b"")
    assert isinstance(s, S3Storage)
    keys = [o.key for o in s.list("", page_size=4)]
    assert keys == [f"k{i:03d}" for i in range(25)]


@pytest.mark.integration
def test_s3_missing_bucket_is_named(s3_server):
    s = open_storage("s3://no-such-bucket-xyz/p", s3_endpoint=s3_server.endpoint)
    assert s.root_exists() is False
    with pytest.raises(StorageError, match="no-such-bucket-xyz"):
        list(s.list(""))


def test_s3_unreachable_endpoint_names_it_without_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s = S3Storage("bucket", "p", endpoint_url="http://user:pw@127.0.0.1:9")
    with pytest.raises(StorageError) as info:
        s.read_bytes("k")
    text = str(info.value)
    assert "127.0.0.1:9" in text and "s3://bucket/p/k" in text
    for secret in ("supersecretvalue", "AKIDSECRETVALUE", "pw@"):
        assert secret not in text


def test_s3_connection_cut_mid_response_says_so(monkeypatch):
    # a server that promises 1000 bytes, sends 10 and hangs up: an outage that starts mid-read
    class CutShort(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "supersecretvalue")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(StorageError) as info:
            S3Storage("bucket", "p", endpoint_url=endpoint).read_bytes("k")
    finally:
        server.shutdown()
    text = str(info.value)
    assert f"s3://bucket/p/k: lost the connection to the S3 endpoint {endpoint} while trying to read" in text
    assert "secret" not in text.lower()


def test_open_storage_schemes(tmp_path):
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    assert open_storage(str(tmp_path)).uri == os.path.abspath(tmp_path)
    with pytest.raises(StorageError, match="three slashes"):
        open_storage("file://data/x")
    with pytest.raises(StorageError, match="gs://"):
        open_storage("gs://bucket/x")
    with pytest.raises(StorageError, match="bucket"):
        open_storage("s3:///nobucket")


def test_redact():
    assert redact("http://a:b@host:9000/x") == "http://host:9000/x"
    assert redact("http://host/x") == "http://host/x"


# ---- one file at a path or URI: what query --out, plot and report write ----


@pytest.mark.parametrize(
    "uri, folder, name",
    [
        ("answer.csv", "{cwd}", "answer.csv"),  # relative: the folder the command runs in
        ("sub/answer.csv", "{cwd}/sub", "answer.csv"),
        ("file:///data/x/answer.csv", "/data/x", "answer.csv"),
        ("s3://bucket/answer.csv", "s3://bucket", "answer.csv"),
        ("s3://bucket/dir/a?b#c.csv", "s3://bucket/dir", "a?b#c.csv"),  # named as written
        ("s3://bucket/dir/", "s3://bucket/dir", ""),
        ("s3://bucket", "s3://bucket", ""),
        ("out/", "{cwd}/out", ""),
        ("file:///data/x/", "/data/x", ""),
    ],
)
def test_file_location_splits_paths_and_uris(tmp_path, monkeypatch, uri, folder, name):
    monkeypatch.chdir(tmp_path)
    assert file_location(uri) == (folder.format(cwd=os.getcwd()), name)


def test_publish_file_writes_one_whole_file_and_refuses_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert publish_file("sub/a.txt", b"one") == "sub/a.txt"
    assert publish_file(f"file://{tmp_path}/sub/a.txt", b"two").endswith("a.txt")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.txt"]  # no temporary file left beside it
    with pytest.raises(StorageError, match="names a folder, not a file"):
        publish_file("sub/", b"x")


@pytest.mark.integration
def test_publish_file_puts_one_object_named_as_written(s3_server):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/dir/a#1.png"
    assert publish_file(uri, b"png", s3_endpoint=s3_server.endpoint) == uri
    s = open_storage(f"s3://{bucket}", s3_endpoint=s3_server.endpoint)
    assert [o.key for o in s.list("")] == ["dir/a#1.png"]
    assert s.read_bytes("dir/a#1.png") == b"png"
