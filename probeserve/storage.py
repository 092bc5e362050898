"""Object storage behind one small interface: local folders and S3.

Keys are plain `/`-separated strings relative to the storage root, never `Path` objects,
because a remote URI would be mangled by path handling. Every write is atomic: a reader sees
either the whole new object or nothing (local files are written under a temporary name and
renamed; an S3 PUT or multipart upload becomes visible only when complete). Create-only
writes back the watch daemon's ledger: local ones use a hard link, which fails if the name
exists; S3 ones use `If-None-Match: *`.

A local folder may hold things that are not files: FIFOs, sockets, devices, links to them or
to places outside the folder. Reads take regular files only and never read more than the
file's size (or `max_bytes`), so a FIFO cannot block a run and a link to `/dev/zero` cannot
fill its memory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat as stat_mode
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import urlsplit, urlunsplit

from probeserve.errors import StorageError

if TYPE_CHECKING:  # for annotations only: these modules load lazily, where used
    from boto3.s3.transfer import TransferConfig

# Local writes go to a temporary name beside the target (a rename is atomic only within one
# file system): `.probeserve-tmp-` and a UUID's 32 hex digits. It is fixed-length, so a long
# name that fits as a key also fits while it is written, and it contains no part of the key,
# so no key a user or a layer name makes is mistaken for it (`blk.tmp-proj`, `step=6.tmp-x`).
# Older versions wrote `.{name}.tmp-{32 hex digits}`: their leftovers are recognised too.
_TMP_PREFIX = ".probeserve-tmp-"
_TMP_NAME = re.compile(r"\.probeserve-tmp-[0-9a-f]{32}|\..+\.tmp-[0-9a-f]{32}", re.DOTALL)


def temp_name() -> str:
    """A new temporary file name (no folder) that `LocalStorage.list` never shows."""
    return f"{_TMP_PREFIX}{uuid.uuid4().hex}"


def is_temp_name(name: str) -> bool:
    """Whether a file name (no folder) is one of probeserve's temporary names."""
    return _TMP_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage root
    size: int
    mtime: float  # seconds since the epoch


class Storage(Protocol):
    """What the rest of probeserve needs from storage."""

    uri: str

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]: ...
    def stat(self, key: str) -> ObjectInfo | None: ...
    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes: ...
    def download(self, key: str, local_path: str) -> None: ...
    def publish_bytes(self, key: str, data: bytes) -> None: ...
    def publish_file(self, key: str, local_path: str) -> None: ...
    def create_only(self, key: str, data: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...
    def root_exists(self) -> bool: ...
    def uri_for(self, key: str) -> str: ...


def join(*parts: str) -> str:
    """Join key parts with '/', ignoring empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def redact(uri: str) -> str:
    """Drop user:password from a URL so it can go in a log or an error."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def redact_text(text: str) -> str:
    """Drop user:password@ from every URL in a message."""
    import re

    return re.sub(r"(\w+://)[^/@\s]+@", r"\1", text)


def _check_key(key: str) -> str:
    if key.startswith("/") or any(p in ("..", ".") for p in key.split("/")):
        raise StorageError(f"refusing key {key!r}: absolute or with '.'/'..' parts")
    return key


def _too_big(uri: str, size: int, max_bytes: int) -> StorageError:
    return StorageError(f"{uri}: {size} bytes is over the limit of {max_bytes} bytes")


# os.link failing because the file system has no hard links, not because of the name
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _local_error(path: str, action: str, e: OSError) -> StorageError:
    """An OS error on a local path as a one-line StorageError that names the path."""
    why = e.strerror or str(e)
    if e.errno == errno.ENOTDIR:
        why += ": a part of the path is a file, not a folder"
    return StorageError(f"{path}: cannot {action} ({why})")


class NotAFile(StorageError):
    """A local path that exists but is not a regular file (a FIFO, socket, device or folder),
    or that leaves a folder whose links must stay inside it."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat_mode.S_ISDIR, "a folder"),
        (stat_mode.S_ISFIFO, "a FIFO (named pipe)"),
        (stat_mode.S_ISSOCK, "a socket"),
        (stat_mode.S_ISCHR, "a character device"),
        (stat_mode.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _not_a_file(path: str, mode: int) -> NotAFile:
    what = _kind(mode)
    if os.path.islink(path):
        what = f"a symbolic link to {os.path.realpath(path)}, {what}"
    return NotAFile(f"{path}: {what}, not a regular file; refusing to read it")


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever.
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
)


def _read_bounded(f: BinaryIO, path: str, size: int) -> bytes:
    """The `size` bytes fstat gave for an open regular file; more means it grew while read."""
    data = f.read(size + 1)
    if len(data) > size:
        raise StorageError(
            f"{path}: grew while it was read (it had {size} bytes); is something still writing it?"
        )
    return data


class LocalStorage:
    """A folder on a local or network file system.

    With `confine`, reads refuse anything that resolves, through symbolic links, to a place
    outside the folder: checkpoints are untrusted, and a link in them must not make probeserve
    read (or report on) files elsewhere on the machine. Outputs are not confined, since a user
    may link part of an output folder to a bigger disk.
    """

    def __init__(self, root: str, *, confine: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.uri = self.root
        self.confine = confine

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *_check_key(key).split("/")) if key else self.root

    def uri_for(self, key: str) -> str:
        return self._path(key)

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object under `prefix` (a folder or a key prefix), sorted by key."""
        del page_size  # one directory walk; S3 is the paged case
        prefix = prefix.lstrip("/")
        base_dir = prefix if prefix.endswith("/") or not prefix else os.path.dirname(prefix)
        top = self._path(base_dir.rstrip("/"))
        found = []
        # links to folders are not followed (os.walk's default): a checkpoint folder that
        # is a link is not listed, and a link cycle cannot make a listing endless
        for dirpath, _, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if is_temp_name(name):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue  # deleted while listing, or a link to nothing (or to itself)
                found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        yield from sorted(found, key=lambda o: o.key)

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise _local_error(self._path(key), "read", e) from None
        return ObjectInfo(key, st.st_size, st.st_mtime) if os.path.isfile(self._path(key)) else None

    def outside(self, key: str) -> str | None:
        """Where `key` leads, if a symbolic link on its way leads out of the folder; else None."""
        real = os.path.realpath(self._path(key))
        return None if _inside(os.path.realpath(self.root), real) else real

    def open_regular(self, key: str) -> BinaryIO:
        """Open `key` for reading if it is a regular file (inside the folder, with `confine`).

        Anything else is refused with a `NotAFile` that names the path, without blocking on it:
        the file is opened non-blocking and checked again once open, so a FIFO swapped in
        after the first check is refused as well. The caller closes the file."""
        path = self._path(key)
        try:
            mode = os.stat(path).st_mode
            if not stat_mode.S_ISREG(mode):
                raise _not_a_file(path, mode)
            if self.confine and (real := self.outside(key)) is not None:
                raise NotAFile(
                    f"{path}: a symbolic link to {real}, outside {self.root}; refusing to follow it"
                )
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise StorageError(f"{path}: no such object") from None
        except OSError as e:
            raise _local_error(path, "read", e) from None
        f = os.fdopen(fd, "rb")
        try:
            opened = os.fstat(fd)
            if not stat_mode.S_ISREG(opened.st_mode):
                raise _not_a_file(path, opened.st_mode)
            if self.confine:
                # what was opened, not what the name leads to now (Linux shows it in /proc)
                proc = f"/proc/self/fd/{fd}"
                real = os.path.realpath(proc) if os.path.exists(proc) else os.path.realpath(path)
                if not _inside(os.path.realpath(self.root), real):
                    raise NotAFile(f"{path}: leads to {real}, outside {self.root}; refusing to read it")
        except BaseException:
            f.close()
            raise
        return f

    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        with self.open_regular(key) as f:
            try:
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise _too_big(path, size, max_bytes)
                return _read_bounded(f, path, size)
            except OSError as e:
                raise _local_error(path, "read", e) from None

    def download(self, key: str, local_path: str) -> None:
        path = self._path(key)
        with self.open_regular(key) as f:
            try:
                left = os.fstat(f.fileno()).st_size
                with open(local_path, "wb") as out:
                    while left > 0 and (block := f.read(min(left, 8 << 20))):
                        out.write(block)
                        left -= len(block)
                if f.read(1):
                    raise StorageError(f"{path}: grew while it was read; is something still writing it?")
            except OSError as e:
                raise _local_error(path, "read", e) from None

    def _tmp_for(self, path: str) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.path.join(os.path.dirname(path), temp_name())

    @contextlib.contextmanager
    def _writing(self, path: str) -> Iterator[str]:
        """A temporary name beside `path`, removed afterwards; OS errors name `path`."""
        tmp = None
        try:
            tmp = self._tmp_for(path)
            yield tmp
        except OSError as e:
            raise _local_error(path, "write", e) from None
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):  # never hide the error that got us here
                    os.unlink(tmp)

    def publish_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with self._writing(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def publish_file(self, key: str, local_path: str) -> None:
        """Publish a finished local file under `key`; `local_path` is moved or copied."""
        path = self._path(key)
        with self._writing(path) as tmp:
            try:
                os.replace(local_path, tmp)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)

    def create_only(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist yet; True when this call created it."""
        path = self._path(key)
        with self._writing(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic, fails if the name exists, content already complete
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in _NO_HARD_LINKS:
                    raise
                return self._create_exclusive(path, data)
            return True

    @staticmethod
    def _create_exclusive(path: str, data: bytes) -> bool:
        """For local file systems without hard links (some FUSE and SMB mounts): O_EXCL
        still lets one writer alone create the name, but a reader may see the object before
        its bytes are all there. A write that fails removes the name again; a process killed
        mid-write leaves a damaged object, which the watch ledger treats as a claim that has
        not moved (taken over after --claim-timeout). Not for mounts of object stores, where
        O_EXCL is not exclusive across machines: use s3:// there."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return True

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _local_error(self._path(key), "delete", e) from None


class S3Storage:
    """A bucket and prefix on S3 or an S3-compatible server.

    Credentials and region come from the standard AWS chain (environment, config files,
    instance roles); `endpoint_url` (or $PROBESERVE_S3_ENDPOINT) points at a compatible
    server such as MinIO. Error messages carry the bucket and key, never credentials.
    """

    # Files over `part_bytes` (activation shards: up to 256 MiB a part by default) are uploaded
    # and downloaded as parts of that size, `concurrency` at a time: one HTTP stream to S3
    # reaches tens of MB/s, parallel parts multiply it. The connection pool is sized to match.
    part_bytes = 16 * 1024 * 1024
    concurrency = 16

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=self.concurrency + 4,
        )
        self._client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)

    def _transfer(self) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.part_bytes,
            multipart_chunksize=self.part_bytes,
            max_concurrency=self.concurrency,
            use_threads=True,
        )

    def _full(self, key: str) -> str:
        return join(self.prefix, _check_key(key)) if key else self.prefix

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def _error(self, e: Exception, key: str, action: str) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = self.uri_for(key)
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                return StorageError(f"{where}: bucket '{self.bucket}' does not exist")
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageError(f"{where}: no such object")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(f"{where}: access denied while trying to {action} ({code})")
            return StorageError(f"{where}: {action} failed: {code or e}")
        endpoint = redact(self.endpoint_url or "AWS")
        if isinstance(e, EndpointConnectionError):
            return StorageError(f"{where}: cannot reach the S3 endpoint {endpoint}")
        if isinstance(e, (BotoConnectionError, HTTPClientError)):  # closed, timed out, cut mid-response
            return StorageError(
                f"{where}: lost the connection to the S3 endpoint {endpoint} while trying to {action} "
                f"({type(e).__name__})"
            )
        return StorageError(f"{where}: {action} failed: {type(e).__name__}: {redact_text(str(e))}")

    def root_exists(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise self._error(e, "", "check the bucket") from None
        except BotoCoreError as e:
            raise self._error(e, "", "check the bucket") from None
        return True

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Every object under `prefix`, following ListObjectsV2 continuation tokens."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = join(self.prefix, prefix)
        if prefix.endswith("/") or (not prefix and full):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        kwargs = {"Bucket": self.bucket, "Prefix": full, "MaxKeys": page_size}
        while True:
            try:
                page = self._client.list_objects_v2(**kwargs)
            except (ClientError, BotoCoreError) as e:
                raise self._error(e, prefix, "list") from None
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], obj["Size"], obj["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    def folders(self, *, limit: int = 1000) -> tuple[str, ...]:
        """The first `limit` "folders" (common prefixes) right under this prefix, by name: one
        ListObjectsV2 request with a delimiter, however many objects lie below them."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self.prefix + "/" if self.prefix else ""
        try:
            page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=full, Delimiter="/", MaxKeys=limit)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "", "list") from None
        return tuple(p["Prefix"][len(full) :].rstrip("/") for p in page.get("CommonPrefixes", []))

    def stat(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(e, key, "stat") from None
        except BotoCoreError as e:
            raise self._error(e, key, "stat") from None
        return ObjectInfo(key, head["ContentLength"], head["LastModified"].timestamp())

    def read_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            if max_bytes is not None and obj["ContentLength"] > max_bytes:
                obj["Body"].close()
                raise _too_big(self.uri_for(key), obj["ContentLength"], max_bytes)
            return obj["Body"].read()
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, "read") from None

    def download(self, key: str, local_path: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.download_file(self.bucket, self._full(key), local_path, Config=self._transfer())
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, "download") from None

    def publish_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, "write") from None

    def publish_file(self, key: str, local_path: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # parallel parts above `part_bytes`; the object appears only when the upload completes
            self._client.upload_file(local_path, self.bucket, self._full(key), Config=self._transfer())
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, "upload") from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(local_path)

    def create_only(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, IfNoneMatch="*")
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            raise self._error(e, key, "create") from None
        except BotoCoreError as e:
            raise self._error(e, key, "create") from None
        return True

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, key, "delete") from None


def open_storage(uri: str, *, s3_endpoint: str | None = None) -> Storage:
    """Storage for a plain path, a file:// URI or s3://bucket/prefix."""
    if not uri:
        raise StorageError("empty storage URI")
    parts = urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket, like s3://bucket/prefix")
        endpoint = s3_endpoint or os.environ.get("PROBESERVE_S3_ENDPOINT") or None
        if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
            # name where it came from: set in the environment, it is in no spec or flag the user sees
            source = "" if s3_endpoint else "PROBESERVE_S3_ENDPOINT: "
            raise StorageError(
                f"{source}S3 endpoint {redact(endpoint)!r}: expected a URL like http://127.0.0.1:9000"
            )
        return S3Storage(parts.netloc, parts.path, endpoint_url=endpoint)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"{uri}: file:// URIs name a local path, like file:///data/x (three slashes)")
        return LocalStorage(parts.path)
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise StorageError(
            f"{redact(uri)}: unsupported scheme '{parts.scheme}://' (use a path, file:// or s3://)"
        )
    return LocalStorage(uri)


def file_location(uri: str) -> tuple[str, str]:
    """(folder, name) of the one file a path or URI names; the name is "" when it names a folder.

    A plain path or a file:// URI is made absolute here, so a relative `--out answer.csv` lands
    in the folder the command runs in. Any other URI (s3://bucket/dir/answer.csv) is split as
    text at its last `/`, so the object is named exactly as written (a `?` or `#` included,
    which URL parsing would take for a query or a fragment); a bucket alone names no object.
    """
    parts = urlsplit(uri)
    if parts.scheme and len(parts.scheme) > 1 and parts.scheme != "file":  # one letter: a Windows drive
        folder, _, name = uri.rpartition("/")
        return (folder, name) if "://" in folder else (uri, "")
    path = parts.path if parts.scheme == "file" else uri
    if path.endswith(("/", os.sep)):
        return os.path.abspath(path), ""
    folder, name = os.path.split(os.path.abspath(path))
    return folder, name


def publish_file(uri: str, data: bytes, *, s3_endpoint: str | None = None) -> str:
    """Write one whole file at a path or URI atomically (a reader never sees half of it); return `uri`.

    What `query --out`, `plot` and `report` write: locally the bytes go to a temporary name in
    the target's folder and are renamed over the name; on S3 they are one PUT. Nothing else is
    written.
    """
    folder, name = file_location(uri)
    if not name:
        raise StorageError(f"{redact(uri)}: names a folder, not a file")
    open_storage(folder, s3_endpoint=s3_endpoint).publish_bytes(name, data)
    return uri
