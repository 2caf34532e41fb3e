"""Storage locations: local paths or URIs (`s3://`, `gs://`), read and written through pyarrow.fs.

A location is a string. URIs stay URIs everywhere (`Path` would turn `s3://b/runs` into
`<cwd>/s3:/b/runs`); local paths are made absolute once, at config time. S3 endpoints and
credentials come from the standard AWS environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...), which pyarrow, Ray Data, Ray Train, boto3 and MLflow all read.

Object storage calls that fail on a transient error (connection refused or reset, a timeout,
a 5xx answer) are retried with exponential backoff for at most `PANET_STORAGE_RETRY_S` seconds
(default 120), then fail naming the URI. A full local disk fails naming the path.

`check_on_every_node` runs one small task on each node of the cluster, so storage that some
node cannot see fails before any worker starts, not at the first checkpoint.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

PROBE_PREFIX = ".panet-probe-"  # "."-files are skipped by pyarrow's and Ray Data's discovery
RETRY_ENV = "PANET_STORAGE_RETRY_S"  # seconds an object storage call keeps retrying
DEFAULT_RETRY_S = 120.0
# Errors no retry cures: missing or forbidden objects, a missing bucket, bad credentials.
_PERMANENT = ("ACCESS_DENIED", "NoSuchBucket", "NO_SUCH_BUCKET", "InvalidAccessKeyId", "Forbidden")

T = TypeVar("T")


def retry_seconds() -> float:
    """How long an object storage call keeps retrying (`PANET_STORAGE_RETRY_S`)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError as err:
        raise ValueError(f"{RETRY_ENV}: expected seconds, got {os.environ[RETRY_ENV]!r}") from err


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and (
        err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)
    )


def is_transient(err: BaseException) -> bool:
    """True for an object storage error that may pass: network, timeout, throttling, 5xx."""
    if not isinstance(err, OSError) or is_disk_full(err):
        return False
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return not any(code in str(err) for code in _PERMANENT)


def retrying(
    what: str, location: str | Path, fn: Callable[[], T], budget: float | None = None
) -> T:
    """`fn()`, retried with exponential backoff (0.5 s doubling, at most 8 s) while it raises
    transient errors, for at most `budget` seconds (default `retry_seconds()`).

    Raises:
        OSError: after the budget, naming `what` and `location`, with the last error.
    """
    budget = retry_seconds() if budget is None else budget
    start, delay, attempts = time.monotonic(), 0.5, 0
    while True:
        attempts += 1
        try:
            return fn()
        except OSError as err:
            waited = time.monotonic() - start
            if not is_transient(err):
                raise
            if waited + delay > budget:
                raise OSError(
                    f"{what} {str(location)!r} failed {attempts} times over {waited:.0f} s "
                    f"({RETRY_ENV}={budget:g}): {err}"
                ) from err
            print(f"[storage] {what} {str(location)!r} failed ({err}); retrying in {delay:g} s")
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def disk_full_error(path: str | Path) -> OSError:
    """The error for a full disk at `path`: what to do next, naming the path."""
    return OSError(
        errno.ENOSPC, f"no space left on device writing {str(path)!r}; free space and retry"
    )


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations (`file://` included), False for plain paths."""
    return "://" in str(location)


def absolute(location: str) -> str:
    """A URI unchanged; a local path made absolute (`~` expanded); "" stays ""."""
    if not location or is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URI or a local path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def name(location: str | Path) -> str:
    """The last component of a location."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str:
    """The location one level up."""
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) of a location."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), absolute(str(location))


def _type(location: str | Path) -> Any:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type


def exists(location: str | Path) -> bool:
    return _type(location) != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    return _type(location) == pafs.FileType.File


def is_dir(location: str | Path) -> bool:
    """A directory (on object storage: a prefix holding at least one object)."""
    return _type(location) == pafs.FileType.Directory


def read_bytes(location: str | Path) -> bytes:
    """The bytes of a file. Raises FileNotFoundError naming the location."""
    fs, path = filesystem(location)

    def read() -> bytes:
        # A random-access file: one ranged GET for the whole object on S3; an input stream's
        # read() fetches it in many small ranges (40 MB from moto: 0.5 s against 28 s).
        with fs.open_input_file(path) as f:
            return bytes(f.read())

    try:
        return retrying("reading", location, read) if is_uri(location) else read()
    except (FileNotFoundError, OSError) as err:
        if not is_file(location):
            raise FileNotFoundError(f"{str(location)!r} does not exist") from err
        raise


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file, never half of it under its name.

    Local files go through a temporary name and a rename (a full disk raises naming the path);
    an object store's PUT is atomic, retried while its errors are transient (`retrying`).
    """
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if is_disk_full(err):
                raise disk_full_error(path) from err
            raise
        return
    fs, path_in = filesystem(location)

    def put() -> None:
        with fs.open_output_stream(path_in) as f:
            f.write(data)

    retrying("writing", location, put)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def makedirs(location: str | Path) -> None:
    """Create a directory (a no-op on object storage, where prefixes need no creation)."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def list_names(location: str | Path) -> list[str]:
    """Sorted names of the entries directly under a directory ([] if it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def delete(location: str | Path) -> None:
    """Remove a file, or a directory with everything under it; missing is fine."""
    fs, path = filesystem(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | Path, destination: str) -> None:
    """Copy a local directory's files (recursively) to `destination`."""
    fs, path = filesystem(destination)
    pafs.copy_files(str(Path(local_dir).resolve()), path, destination_filesystem=fs)


def download_dir(location: str, local_dir: str | Path) -> Path:
    """Copy a directory's files (recursively) into `local_dir`; returns `local_dir`."""
    fs, path = filesystem(location)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs)
    return Path(local_dir)


@contextmanager
def local_dir(location: str | Path) -> Iterator[Path]:
    """A local directory holding `location`'s files: the path itself, or a temporary copy."""
    if not is_uri(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="panet-") as tmp:
        yield download_dir(str(location), tmp)


# ---------------------------------------------------------------------------------------------
# Every node sees the same storage


def _probe_on_node(checks: list[tuple[str, str, str]]) -> list[str]:
    """On one node: each (key, location, probe file) must be readable; returns the problems."""
    problems = []
    for key, location, probe in checks:
        try:
            if probe:
                read_bytes(probe)
            elif not exists(location):
                raise FileNotFoundError(f"{location!r} does not exist")
        except Exception as err:  # noqa: BLE001 - reported to the driver with the node
            problems.append(f"config key {key!r}: {location!r} ({type(err).__name__}: {err})")
    return problems


def check_on_every_node(
    readable: Mapping[str, str], writable: Mapping[str, str], timeout: float = 120.0
) -> None:
    """Fail if some node of the Ray cluster cannot see a location the job needs.

    Each `writable` location gets a probe file written here, on the driver; one zero-CPU task
    per alive node then reads every probe and checks every `readable` location exists. A local
    path that is a different disk on each node (not a shared mount) fails here, naming the node.

    Args:
        readable: {config key: location} that must exist on every node (the shard folders).
        writable: {config key: location} every node writes to (checkpoint storage, a SQLite
            tracking store's folder); the driver writes and removes a probe file there.
        timeout: seconds to wait for the tasks.

    Raises:
        ValueError: naming the config key, the location and the node that cannot see it.
    """
    # deferred: the data tools (convert, inspect, manifest) use this module without Ray
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex[:12]
    checks = [(key, loc, "") for key, loc in readable.items() if loc]
    probes = []
    for key, loc in writable.items():
        if not loc:
            continue
        probe = join(loc, f"{PROBE_PREFIX}{token}")
        try:
            write_text(probe, f"written by the driver on {os.uname().nodename}")
        except Exception as err:  # noqa: BLE001 - any storage error, named with the key
            raise ValueError(f"config key {key!r}: cannot write to {loc!r}: {err}") from err
        probes.append(probe)
        checks.append((key, loc, probe))
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(_probe_on_node)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {
            n["NodeID"]: task.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(checks)
            for n in nodes
        }
        problems = []
        addresses = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
        for node_id, ref in refs.items():
            for problem in ray.get(ref, timeout=timeout):
                problems.append(f"node {node_id[:12]} ({addresses[node_id]}): {problem}")
    finally:
        for probe in probes:
            with suppress(OSError):
                delete(probe)
    if problems:
        raise ValueError(
            "storage that not every Ray node sees (use a path every node mounts, or s3:// / "
            "gs:// storage): " + "; ".join(problems)
        )


# ---------------------------------------------------------------------------------------------
# A `pathlib.Path`-like handle on a URI


class StoragePath:
    """A location on object storage with the `pathlib.Path` methods the pipeline uses.

    `as_path` gives a `Path` for a local location and a `StoragePath` for a URI, so code that
    joins, reads and writes files works on both without turning a URI into a local path.
    """

    def __init__(self, uri: str) -> None:
        self._uri = str(uri).rstrip("/")

    def __str__(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"StoragePath({self._uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoragePath) and other._uri == self._uri

    def __hash__(self) -> int:
        return hash(self._uri)

    def __lt__(self, other: StoragePath) -> bool:
        return self._uri < other._uri

    def __truediv__(self, part: str) -> StoragePath:
        return StoragePath(join(self._uri, str(part)))

    @property
    def name(self) -> str:
        return name(self._uri)

    @property
    def parent(self) -> StoragePath:
        return StoragePath(parent(self._uri))

    def resolve(self) -> StoragePath:
        return self

    def as_uri(self) -> str:
        return self._uri

    def exists(self) -> bool:
        return exists(self._uri)

    def is_file(self) -> bool:
        return is_file(self._uri)

    def is_dir(self) -> bool:
        return is_dir(self._uri)

    def read_bytes(self) -> bytes:
        return read_bytes(self._uri)

    def read_text(self, encoding: str = "utf-8") -> str:
        return read_bytes(self._uri).decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        write_bytes(self._uri, data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        write_bytes(self._uri, text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        makedirs(self._uri)

    def unlink(self, missing_ok: bool = False) -> None:
        if not missing_ok and not self.is_file():
            raise FileNotFoundError(f"{self._uri!r} does not exist")
        delete(self._uri)

    def iterdir(self) -> Iterator[StoragePath]:
        for entry in list_names(self._uri):
            yield self / entry

    def glob(self, pattern: str) -> Iterator[StoragePath]:
        """Entries matching a relative pattern of `*`/`?` components, e.g. `step-*/state.pt`."""
        found = [self]
        for part in pattern.split("/"):
            found = [c for p in found for c in p.iterdir() if fnmatch.fnmatchcase(c.name, part)]
        yield from sorted(found)


def as_path(location: str | Path | StoragePath) -> Path | StoragePath:
    """A `Path` (absolute) for a local location, a `StoragePath` for a URI."""
    if isinstance(location, (Path, StoragePath)):
        return location
    if is_uri(location) and not str(location).startswith("file://"):
        return StoragePath(str(location))
    if str(location).startswith("file://"):
        location = str(location)[len("file://") :]
    return Path(absolute(str(location)))
