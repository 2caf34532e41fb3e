"""A run's MLflow records on local disk: an append-only journal per writing process.

A journal is `<writer>.jsonl` in an outbox directory: a header line (the tracking URI, the run,
the writer's role), then one record a line, each appended, flushed and fsynced before the call
that made it returns. `<writer>.acked` holds how many records are delivered (they are delivered
in order, so a count is enough; replaced atomically), `<writer>.rejected` the records the store
refused, `<writer>.lock` is held (`flock`) by the writing process while it lives, and an
artifact's file is copied to `files/<writer>/<seq>/`. Writer names begin with the creation time,
so sorting them gives the order the journals were opened in.

The registry maps (tracking URI, run id) to the sink open for it in this process: the
`pipeline.tracking` functions hand their records to it (`put`) instead of calling MLflow.
This module does not import MLflow; delivery is `outbox.py`'s.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

SUFFIX = ".jsonl"
FILES = "files"


class Sink(Protocol):
    def put(self, kind: str, fields: dict[str, Any], file: Path | None = None) -> None: ...


_sinks: dict[tuple[str, str], Sink] = {}
_sinks_lock = threading.Lock()


def register(tracking_uri: str, run_id: str, sink: Sink | None) -> None:
    """Route the records of run `run_id` in this process to `sink` (None: to MLflow again)."""
    with _sinks_lock:
        if sink is None:
            _sinks.pop((tracking_uri, run_id), None)
        else:
            _sinks[(tracking_uri, run_id)] = sink


def sink_for(tracking_uri: str, run_id: str) -> Sink | None:
    """The sink open for the run in this process, if any."""
    with _sinks_lock:
        return _sinks.get((tracking_uri, run_id))


def put(tracking_uri: str, run_id: str, kind: str, file: Path | None = None, **fields: Any) -> bool:
    """Hand a record to the sink open for the run, if any; returns whether one took it."""
    sink = sink_for(tracking_uri, run_id)
    if sink is None:
        return False
    sink.put(kind, fields, file)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Journal:
    """One writer's journal in `root`: appended by its writer, read and acknowledged by whichever
    process delivers it (the writer's sender, or another process once the writer is gone)."""

    root: Path
    name: str  # the writer: "<time ns>-<role>-<pid>"
    header: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # read so far
    _offset: int = 0  # bytes of the journal file read so far
    _lock_fd: int | None = None
    _file: Any = None  # the append handle, for the writer
    _mutex: Any = field(default_factory=threading.Lock)  # the writer's thread and its sender's

    @property
    def path(self) -> Path:
        return self.root / f"{self.name}{SUFFIX}"

    @classmethod
    def create(cls, root: Path, tracking_uri: str, run_id: str, role: str) -> Journal:
        """A new journal for this process, locked for as long as it lives."""
        root.mkdir(parents=True, exist_ok=True)
        journal = cls(root, f"{time.time_ns():020d}-{role}-{os.getpid()}")
        if not journal.try_lock():
            raise RuntimeError(f"cannot lock the new MLflow journal {journal.path}")
        journal.header = {"tracking_uri": tracking_uri, "run_id": run_id, "role": role}
        journal._file = open(journal.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        journal._append(journal.header)
        journal._offset = journal.path.stat().st_size
        _fsync_dir(root)
        return journal

    def _append(self, obj: dict[str, Any]) -> None:
        self._file.write(json.dumps(obj, allow_nan=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, kind: str, fields: dict[str, Any], file: Path | None = None) -> int:
        """Add a record (an artifact's `file` copied first); returns its sequence number."""
        with self._mutex:
            seq = len(self.records)
            record = {"seq": seq, "kind": kind, **fields}
            if file is not None:
                dest = self.root / FILES / self.name / str(seq) / file.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                if file.is_dir():
                    shutil.copytree(file, dest)
                else:
                    shutil.copyfile(file, dest)
                record["file"] = str(dest.relative_to(self.root))
            self._append(record)
            self.records.append(record)
            self._offset = self.path.stat().st_size
            return seq

    def close(self) -> None:
        """Stop writing and release the lock: another process may deliver the rest."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def try_lock(self) -> bool:
        """Take the journal's lock if no living process holds it."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self.root / f"{self.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def read(self) -> list[dict[str, Any]]:
        """The records, read on from where the last read stopped (a torn last line is left)."""
        with self._mutex:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            for line in complete.splitlines():
                try:
                    obj = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"MLflow journal {self.path}: unreadable line: {err}") from err
                if "kind" not in obj:
                    self.header = obj
                elif obj["seq"] == len(self.records):
                    self.records.append(obj)
            self._offset += len(complete)
            if not self.header:
                raise ValueError(f"MLflow journal {self.path} has no header line")
            return list(self.records)

    @property
    def acked(self) -> int:
        """How many records are delivered."""
        try:
            return int((self.root / f"{self.name}.acked").read_text())
        except FileNotFoundError:
            return 0

    def ack(self, count: int) -> None:
        """Record that the first `count` records are delivered (atomically, durably)."""
        path = self.root / f"{self.name}.acked"
        tmp = path.with_suffix(".acked.tmp")
        with open(tmp, "w") as f:
            f.write(str(count))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def reject(self, record: dict[str, Any], error: str) -> None:
        """Keep a record the store refused, with its error, beside the journal."""
        with open(self.root / f"{self.name}.rejected", "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "error": error}, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pending(self) -> list[dict[str, Any]]:
        """The records not delivered yet, in order."""
        return self.read()[self.acked :]

    def remove_files(self, record: dict[str, Any]) -> None:
        """Delete a delivered artifact's copy."""
        if "file" in record:
            shutil.rmtree(self.root / Path(record["file"]).parent, ignore_errors=True)


def journals(root: Path) -> list[Journal]:
    """The journals in an outbox directory, oldest first."""
    if not root.is_dir():
        return []
    return [Journal(root, p.name[: -len(SUFFIX)]) for p in sorted(root.glob(f"*{SUFFIX}"))]
