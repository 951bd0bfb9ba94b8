"""Every path of the platform is a URI: ``s3://bucket/key``, ``gs://...``, ``file:///abs`` or a plain path.

    fs, path = filesystem("s3://bucket/shards", cfg.storage)     # fsspec fs + protocol-less path
    pa_fs, path = pyarrow_filesystem("s3://bucket/runs", cfg.storage)  # for Ray Train / pyarrow
    check_access("s3://bucket/shards", cfg.storage, write=True)   # fail in seconds, in words

S3 settings come from :class:`~clcae.config.StorageConfig` and, where it leaves them unset, from the
standard AWS variables (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``), so MinIO, Ceph and R2 work.
Storage failures are raised as :class:`StorageError` whose message names the URI, the cause and the
setting that fixes it.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator

import fsspec
import pyarrow.fs as pafs
from fsspec.core import split_protocol

from clcae.config import CLCAEConfig, StorageConfig
from clcae.errors import CLCAEError

S3_PROTOCOLS = ("s3", "s3a")
LOCAL_PROTOCOLS = (None, "file", "local")

# Data calls: a refused or silent endpoint fails within ~10 s instead of botocore's minutes of retries.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
MAX_ATTEMPTS = 2
# check_access: one attempt with tighter timeouts, so a probe answers within ~5 s.
PROBE_CONNECT_TIMEOUT_S = 2
PROBE_READ_TIMEOUT_S = 3

_CREDENTIALS_HINT = ("set storage.key and storage.secret (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), "
                     "or storage.anon=true for a public bucket")


class StorageError(CLCAEError, RuntimeError):
    """Storage that cannot be reached or used; the message names the URI, the cause and the fix."""


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI -> (fsspec filesystem, path without protocol). Local paths come back absolute."""
    proto, _ = _split(uri)
    if proto in S3_PROTOCOLS:
        fs = _s3fs(storage)
    else:
        try:
            fs = fsspec.filesystem("file" if proto in LOCAL_PROTOCOLS else proto)
        except ImportError as exc:
            hint = "; run `pip install gcsfs`" if proto in ("gs", "gcs") else ""
            raise StorageError(f"{uri}: the {proto}:// protocol needs a package that is not installed "
                               f"({exc}){hint}") from None
        except ValueError as exc:
            raise StorageError(f"{uri}: unknown protocol {proto!r} ({exc}); use s3://, gs://, file:// "
                               "or a plain path") from None
    return fs, fs._strip_protocol(uri)


def pyarrow_filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path without protocol), e.g. for ``RunConfig(storage_filesystem=...,
    storage_path=path)``: Ray Train needs a pyarrow fs and then a path without ``s3://``."""
    fs, path = filesystem(uri, storage)
    if _is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return _is_local(uri)


def protocol(uri: str) -> str:
    """``"s3"``, ``"gs"``, ... or ``"file"`` for local paths."""
    proto = _split(uri)[0]
    return "file" if proto in LOCAL_PROTOCOLS else proto


def with_protocol(like: str, path: str) -> str:
    """Give the protocol-less ``path`` (as :func:`filesystem` returns it) the protocol of the URI ``like``."""
    proto = _split(like)[0]
    return path if proto is None else f"{proto}://{path}"


def absolute(uri: str | None) -> str | None:
    """A local path made absolute against this process's working directory (``~`` expanded); URIs of other
    protocols (``s3://``, ``gs://``, ...) and absolute paths come back unchanged, and so does None.

    Call it in the driver on every path a user typed, before the path reaches a Ray task, actor or replica: those
    may run in another working directory (``ray job submit --working-dir``, a node of a cluster), where a
    relative path names another file or none."""
    if uri is None:
        return None
    uri = str(uri)
    proto, path = _split(uri)
    if proto is None:
        return os.path.abspath(os.path.expanduser(uri))
    if proto in ("file", "local") and not os.path.isabs(path):
        return f"{proto}://{os.path.abspath(os.path.expanduser(path))}"
    return uri


# Config keys that name files or folders the jobs' Ray workers open (model files, direction files); training
# keys (data.*, train.*, contrastive.*) are the training job's to resolve.
PATH_KEYS = ("generator.checkpoint", "encoder.pretrained", "model.average_image", "loss.id_weights")


def absolute_paths(cfg: CLCAEConfig) -> CLCAEConfig:
    """``cfg`` with :data:`PATH_KEYS` and every ``directions.*.path`` made :func:`absolute` (in place; returned
    for chaining).  For the driver, before ``cfg`` is shipped to Ray workers."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        part = getattr(cfg, section)
        setattr(part, name, absolute(getattr(part, name)))
    for direction in cfg.directions.values():
        direction.path = absolute(direction.path)
    return cfg


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/runs/", "x", "y.pt") == "s3://b/runs/x/y.pt"``; the protocol is kept."""
    out = str(uri)
    for part in (str(p).strip("/") for p in parts):
        if part:
            out = part if not out else (out if out.endswith("/") else out + "/") + part
    return out


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    """Whether a file or folder (prefix) exists at ``uri``; unreachable storage raises StorageError."""
    fs, path = filesystem(uri, storage)
    with storage_errors(uri, storage):
        return bool(fs.exists(path))


def list_files(uri: str, storage: StorageConfig | None = None, suffix: str = ".parquet") -> list[str]:
    """Sorted URIs (same protocol as ``uri``) of the files under ``uri`` ending in ``suffix``.

    ``uri`` may also name one file, which is returned whatever its suffix. Hidden and underscore-prefixed
    names (``.tmp`` files, ``_SUCCESS``) are skipped. A missing path gives ``[]``; a missing bucket or an
    unreachable endpoint raises StorageError.
    """
    fs, path = filesystem(uri, storage)
    with storage_errors(uri, storage):
        try:
            info = fs.info(path)
        except FileNotFoundError as exc:
            if _bucket_missing(exc):
                raise
            return []
        if info["type"] != "directory":
            return [uri]
        found = fs.find(path)
    keep = [p for p in found if p.endswith(suffix) and not hidden(posixpath.relpath(p, path))]
    return sorted(with_protocol(uri, p) for p in keep)


def write_bytes(uri: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write a whole file so that readers never see half of it.

    Local: a hidden temp file in the same folder, then an atomic rename. Object stores: one PUT (or a
    multipart upload for big data), which becomes visible only when complete.
    """
    fs, path = filesystem(uri, storage)
    with storage_errors(uri, storage):
        if _is_local(uri):
            folder, name = os.path.split(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")  # hidden: list_files skips it
            try:
                with open(tmp, "xb") as fh:  # not mkstemp: the file gets the umask's mode, not 0600
                    fh.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            fs.pipe_file(path, data)


def check_access(uri: str, storage: StorageConfig | None = None, write: bool = False) -> None:
    """Probe ``uri`` within a few seconds; raise StorageError saying what is wrong and how to fix it.

    read (default): the path must exist. write=True: a probe object is written and deleted under ``uri``
    (created if missing), which proves the bucket exists and the credentials may write.
    """
    if _is_local(uri):
        _check_local(uri, write)
        return
    if _split(uri)[0] not in S3_PROTOCOLS:
        fs, path = filesystem(uri, storage)
        with storage_errors(uri, storage):
            if write:
                probe = join(path, f".clcae-probe-{uuid.uuid4().hex}")
                fs.pipe_file(probe, b"")
                fs.rm_file(probe)
            elif not fs.exists(path):
                raise FileNotFoundError(path)
        return
    fs = _s3fs(storage, probe=True)
    path = fs._strip_protocol(uri)
    bucket, _, key = path.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket in the URI; write it as s3://BUCKET/path")
    with storage_errors(uri, storage):
        # One ListObjectsV2 answers for the endpoint, the credentials and the bucket (and finds a folder).
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        listing = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
        if write:
            probe = join(prefix, f".clcae-probe-{uuid.uuid4().hex}")
            fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"")
            fs.call_s3("delete_object", Bucket=bucket, Key=probe)
        elif prefix and not listing.get("KeyCount", len(listing.get("Contents", []))):
            fs.call_s3("head_object", Bucket=bucket, Key=key)  # not a folder; an object? (404 -> missing)


@contextlib.contextmanager
def storage_errors(uri: str, storage: StorageConfig | None = None) -> Iterator[None]:
    """Turn storage exceptions (botocore, s3fs, OSError) raised inside the block into StorageError."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - filtered by _explain: non-storage errors are re-raised
        message = _explain(exc, uri, storage)
        if message is None:
            raise
        raise StorageError(message) from exc


# ---------------------------------------------------------------------------------------------------
# S3


def s3_options(storage: StorageConfig | None = None, probe: bool = False) -> dict:
    """Keyword arguments of ``s3fs.S3FileSystem`` from the config, falling back to the AWS variables."""
    s = storage or StorageConfig()
    endpoint, _ = _endpoint(s)
    region = s.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    opts: dict = {
        "anon": s.anon,
        # Several processes (Ray workers) write the same prefixes: a cached listing would go stale.
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": PROBE_CONNECT_TIMEOUT_S if probe else CONNECT_TIMEOUT_S,
            "read_timeout": PROBE_READ_TIMEOUT_S if probe else READ_TIMEOUT_S,
            "retries": {"max_attempts": 1 if probe else MAX_ATTEMPTS},
        },
    }
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        opts["client_kwargs"] = {"region_name": region}
    if s.key is not None:  # else botocore's chain: AWS_ACCESS_KEY_ID..., ~/.aws, instance metadata
        opts["key"], opts["secret"] = s.key, s.secret
    return opts


def _s3fs(storage: StorageConfig | None, probe: bool = False) -> fsspec.AbstractFileSystem:
    import s3fs

    return s3fs.S3FileSystem(**s3_options(storage, probe))


def _endpoint(s: StorageConfig) -> tuple[str | None, str]:
    """(endpoint URL, where it came from) for error messages."""
    if s.endpoint_url:
        return s.endpoint_url, "storage.endpoint_url"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, "default AWS endpoint"


# ---------------------------------------------------------------------------------------------------
# Error messages


def _explain(exc: BaseException, uri: str, storage: StorageConfig | None) -> str | None:
    """A sentence for a storage failure, or None when ``exc`` is not one (then it propagates as is)."""
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    codes = {_error_code(e) for e in chain} - {None}
    endpoint, source = _endpoint(storage or StorageConfig())
    where = f"{endpoint} (from {source})" if endpoint else "the AWS S3 endpoint"
    bucket = _bucket(uri)
    if _is_local(uri):
        if "FileNotFoundError" in names:
            return f"{uri}: no such file or folder."
        if "PermissionError" in names:
            return f"{uri}: permission denied ({_first_line(chain[0])}); check the folder's owner and mode."
        if any(isinstance(e, OSError) for e in chain):
            return f"{uri}: {_first_line(chain[0])}"
        return None

    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ConnectionRefusedError", "gaierror", "ProxyConnectionError"}:
        return (f"{uri}: cannot reach the storage endpoint {where}: {_first_line(chain[0])}. "
                "Check that the server is running and set storage.endpoint_url (or AWS_ENDPOINT_URL).")
    if names & {"ReadTimeoutError", "TimeoutError", "FSTimeoutError"}:
        return (f"{uri}: the storage endpoint {where} did not answer in time; check the server and "
                "storage.endpoint_url (or AWS_ENDPOINT_URL).")
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return f"{uri}: no S3 credentials were found: {_CREDENTIALS_HINT}."
    if "InvalidAccessKeyId" in codes:
        return (f"{uri}: bad credentials: the access key is not known to {where}; {_CREDENTIALS_HINT}.")
    if "SignatureDoesNotMatch" in codes:
        return (f"{uri}: bad credentials: the secret key does not match the access key; check storage.secret "
                "(or AWS_SECRET_ACCESS_KEY).")
    if codes & {"InvalidToken", "ExpiredToken", "TokenRefreshRequired"}:
        return (f"{uri}: the session token is invalid or expired; refresh AWS_SESSION_TOKEN or "
                f"{_CREDENTIALS_HINT}.")
    if codes & {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"} or (
            names & {"PermissionError"} and not codes):
        return (f"{uri}: access denied on bucket {bucket!r}: the credentials lack permission for this "
                f"operation; grant it to the key or {_CREDENTIALS_HINT}.")
    if codes & {"NoSuchBucket"} or (codes & {"404"} and _bucket_only(uri)):
        return (f"{uri}: bucket {bucket!r} does not exist at {where}: create it, or fix the bucket name "
                "in the URI (or storage.endpoint_url if it lives on another server).")
    if codes & {"InvalidBucketName"}:
        return f"{uri}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, dots, dashes)."
    if "FileNotFoundError" in names:
        return f"{uri}: no such file or folder."
    if "IsADirectoryError" in names or "NotADirectoryError" in names or "FileExistsError" in names:
        return f"{uri}: {_first_line(chain[0])}"
    if any(isinstance(e, OSError) for e in chain) or codes or any(
            type(e).__module__.startswith(("botocore", "aiobotocore", "s3fs", "aiohttp")) for e in chain):
        return f"{uri}: storage error: {_first_line(chain[0])}"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    return None


def _bucket_missing(exc: BaseException) -> bool:
    return any(_error_code(e) == "NoSuchBucket" for e in _chain(exc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Paths


def _split(uri: str) -> tuple[str | None, str]:
    protocol, path = split_protocol(str(uri))
    return (protocol.lower() if protocol else None), path


def _is_local(uri: str) -> bool:
    return _split(uri)[0] in LOCAL_PROTOCOLS


def _bucket(uri: str) -> str:
    return _split(uri)[1].split("/", 1)[0]


def _bucket_only(uri: str) -> bool:
    return "/" not in _split(uri)[1].strip("/")


def hidden(relpath: str) -> bool:
    """A path with a part starting with "." or "_" (temp files, _SUCCESS, _errors/): not data."""
    return any(part.startswith((".", "_")) for part in relpath.split("/") if part not in ("", "."))


def _check_local(uri: str, write: bool) -> None:
    _, path = filesystem(uri)
    with storage_errors(uri):
        if not write:
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            return
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
