"""A run's MLflow records delivered from a durable journal by a background thread.

A training job's driver and rank-0 worker, and a sweep's driver for its parent run, open an
`Outbox` on a tracking server: from then on `log_params`, `log_metrics`, the artifact functions,
`set_tags` and `finish_run` for that run append a record to the process's journal
(`journal.py`) and return at once. A sender thread delivers the records in order; a network
error or a 5xx answer leaves the record in place and the thread tries again with backoff (up
to `retry_max_s` apart), so a server that is down stalls no training step and loses nothing. A
record the server refuses (4xx) is kept in `<writer>.rejected` and reported, not retried.

At the end of a job `close` waits up to `flush_s` for the server; what is still undelivered
stays in the outbox directory, `undelivered_message` names it, and `panet tracking sync DIR`
(or the next run of the same job, whose driver delivers older journals first) delivers it.
A driver's sender also delivers the journals of processes that are gone (a worker's), and the
run's end (its status) goes last, once every journal of the run is delivered. A run's status
from an older driver is skipped when a newer driver reopened the run.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.tracking import journal as journals
from pipeline.tracking.journal import Journal
from pipeline.tracking.metrics import MAX_METRICS_PER_BATCH, deliver_params
from pipeline.tracking.runs import MAX_PARAMS_PER_BATCH
from pipeline.tracking.store import is_client_error, is_http, mlflow_client, short_error

OUTBOX = "mlflow-outbox"  # in the job's (or sweep's) directory
# MLflow's HTTP client retries a request itself, by default 7 times over ~4 minutes: in a process
# with an outbox, a few tries (~3 s against a stopped server) and the sender's own backoff.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


@dataclass(frozen=True)
class Settings:
    flush_s: float = 60.0  # at the end of a job: seconds to wait for the server to take the rest
    retry_max_s: float = 10.0  # the longest pause between two tries of an undelivered record


def outbox_dir(run_dir: Any) -> Path:
    """A job's or sweep's outbox: `<run_dir>/mlflow-outbox` when that is a local path, else
    (object storage) `~/.cache/panet/mlflow-outbox/<run_dir's name>-<hash of its URI>` on this
    node."""
    if isinstance(run_dir, Path):
        return run_dir / OUTBOX
    uri = str(run_dir).rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "panet" / OUTBOX / f"{uri.rsplit('/', 1)[-1]}-{digest}"


def open_outbox(
    run_dir: Any, tracking_uri: str, run_id: str, role: str, settings: Settings
) -> Outbox | None:
    """The run's outbox in this process (`role` "driver" or "rank0"); None for a local store,
    which is written directly. One left open for the run in this process is closed first."""
    if not is_http(tracking_uri):
        return None
    close_outbox(tracking_uri, run_id, wait_s=0.0)
    return Outbox(outbox_dir(run_dir), tracking_uri, run_id, role, settings)


def close_outbox(
    tracking_uri: str, run_id: str, wait_s: float | None = None, give_up_when_down: bool = False
) -> str | None:
    """Close the run's outbox in this process, if one is open (`Outbox.close`)."""
    box = journals.sink_for(tracking_uri, run_id)
    if not isinstance(box, Outbox):
        return None
    return box.close(wait_s, give_up_when_down)


def send(root: Path, header: dict[str, Any], record: dict[str, Any]) -> None:
    """Deliver one record to its run; raises what MLflow raised."""
    # deferred: `panet --help` imports this module (via tracking.cli); mlflow only to deliver
    from mlflow.entities import Metric, RunTag

    uri, run_id, kind = header["tracking_uri"], header["run_id"], record["kind"]
    client = mlflow_client(uri)
    if kind == "metrics":
        metrics = [Metric(k, v, t, s) for k, v, t, s in record["metrics"]]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])
    elif kind == "params":
        deliver_params(uri, run_id, record["params"], warn=False)
    elif kind == "tags":
        tags = [RunTag(k, v) for k, v in record["tags"].items()]
        for start in range(0, len(tags), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, tags=tags[start : start + MAX_PARAMS_PER_BATCH])
    elif kind == "artifact":
        path = root / record["file"]
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif kind == "terminate":
        client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"MLflow journal record {record['seq']}: unknown kind {kind!r}")


def _same_run(a: Journal, b: Journal) -> bool:
    keys = ("tracking_uri", "run_id")
    return all(a.header.get(k) == b.header.get(k) for k in keys)


def _deliver_journal(j: Journal, every: list[Journal]) -> bool:
    """Deliver `j`'s pending records in order; True when none is left. A run's end waits for
    every other journal of the run; one superseded by a newer driver's journal is skipped."""
    done = j.acked
    for record in j.read()[done:]:
        others = [o for o in every if o is not j and _same_run(o, j)]
        if record["kind"] == "terminate":
            newer = [o for o in others if o.name > j.name and o.header.get("role") == "driver"]
            if not newer and any(o.pending() for o in others):
                return False
            if not newer:
                _send_or_reject(j, record)
        else:
            _send_or_reject(j, record)
        done += 1
        j.ack(done)
        j.remove_files(record)
    return True


def _send_or_reject(j: Journal, record: dict[str, Any]) -> None:
    try:
        send(j.root, j.header, record)
    except Exception as err:
        if not is_client_error(err):
            raise
        j.reject(record, f"{type(err).__name__}: {short_error(err)}")
        warnings.warn(
            f"MLflow refused a {record['kind']} record of run {j.header['run_id']} "
            f"({short_error(err)}); kept in {j.root / (j.name + '.rejected')}",
            RuntimeWarning,
            stacklevel=2,
        )


class DeliveryError(Exception):
    """A tracking server did not take a record (network error or 5xx): try again later."""

    def __init__(self, tracking_uri: str, err: Exception) -> None:
        super().__init__(f"{tracking_uri}: {type(err).__name__}: {short_error(err, 200)}")
        self.tracking_uri = tracking_uri


def deliver_pass(
    root: Path, own: Journal | None, adopt: bool, known: dict[str, Journal] | None = None
) -> bool:
    """One pass over an outbox, oldest journal first: `own`, and with `adopt` every journal no
    living process holds. True when nothing this process may deliver is left. A server that
    does not answer holds up only the journals addressed to it.

    Args:
        known: the journals read by earlier passes, by name (read on from where they stopped).

    Raises:
        DeliveryError: a server did not take a record (after the others were tried).
    """
    known = {} if known is None else known
    if own is not None:
        known[own.name] = own
    for j in journals.journals(root):
        known.setdefault(j.name, j)
    every = [known[name] for name in sorted(known)]
    for j in every:
        j.read()
    taken = [j for j in every if j is not own and adopt and j.try_lock()]
    failed: dict[str, Exception] = {}
    try:
        idle = True
        for j in every:
            uri = j.header["tracking_uri"]
            if (j is own or j in taken) and uri not in failed:
                try:
                    idle = _deliver_journal(j, every) and idle
                except Exception as err:  # noqa: BLE001 - not a client error: try again later
                    failed[uri] = err
        if failed:
            uri, err = next(iter(failed.items()))
            raise DeliveryError(uri, err) from err
        return idle
    finally:
        for j in taken:
            j.close()


class Outbox:
    """The journal of one run in this process, and the thread that delivers it (module doc)."""

    def __init__(
        self, root: Path, tracking_uri: str, run_id: str, role: str, settings: Settings
    ) -> None:
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)
        self.root, self.settings = root, settings
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.journal = Journal.create(root, tracking_uri, run_id, role)
        self.adopt = role == "driver"
        self.failing_since: float | None = None  # monotonic time of the first failed try
        self.last_error = ""
        self._wake, self._halt, self._closing = threading.Event(), threading.Event(), False
        self._known: dict[str, Journal] = {}  # the journals of the outbox, read so far
        self._thread = threading.Thread(target=self._send, name="mlflow-outbox", daemon=True)
        journals.register(tracking_uri, run_id, self)
        self._thread.start()

    def put(self, kind: str, fields: dict[str, Any], file: Path | None = None) -> None:
        self.journal.append(kind, fields, file)
        self._wake.set()

    def _send(self) -> None:
        delay = 0.5
        while not self._halt.is_set():
            # Read before the pass: a pass that began before `close` may have missed the last
            # records, so only one that began after it may end the thread.
            closing = self._closing
            try:
                idle = deliver_pass(self.root, self.journal, self.adopt, self._known)
            except Exception as err:  # noqa: BLE001 - a server or a disk error: try again
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    print(
                        f"[tracking] MLflow server unreachable ({short_error(err, 300)}); "
                        f"records are kept in {self.root} and delivered when it is back",
                        flush=True,
                    )
                self.last_error = short_error(err)
                self._halt.wait(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
                continue
            if self.failing_since is not None:
                print(f"[tracking] MLflow records delivered again from {self.root}", flush=True)
            self.failing_since, delay = None, 0.5
            if idle and closing:
                return
            self._wake.wait(1.0 if idle else 0.5)
            self._wake.clear()

    def close(self, wait_s: float | None = None, give_up_when_down: bool = False) -> str | None:
        """Stop taking records; wait up to `wait_s` (default `settings.flush_s`) for the sender
        to deliver them, or, with `give_up_when_down`, only while the server answers.

        Returns:
            `undelivered_message` for what is left in the outbox, None when all is delivered.
        """
        journals.register(self.tracking_uri, self.run_id, None)
        self._closing = True
        self._wake.set()
        deadline = time.monotonic() + (self.settings.flush_s if wait_s is None else wait_s)
        while self._thread.is_alive() and time.monotonic() < deadline:
            if give_up_when_down and self.failing_since is not None:
                break
            self._thread.join(timeout=0.2)
        self._halt.set()
        self._thread.join(timeout=5.0)
        self.journal.close()
        return undelivered_message(self.root, self.last_error)


def undelivered(root: Path) -> dict[tuple[str, str], Counter]:
    """What the journals of an outbox still hold, per (tracking URI, run id): a count per
    record kind, "metric values" and "status" (the run's end, if pending) beside them."""
    out: dict[tuple[str, str], Counter] = {}
    for j in journals.journals(root):
        for record in j.pending():
            counts = out.setdefault((j.header["tracking_uri"], j.header["run_id"]), Counter())
            counts[record["kind"]] += 1
            if record["kind"] == "metrics":
                counts["metric values"] += len(record["metrics"])
            if record["kind"] == "terminate":
                counts[f"status {record['status']}"] = 1
    return out


def undelivered_message(root: Path, error: str = "") -> str | None:
    """One paragraph naming what an outbox holds undelivered, where, and how to deliver it."""
    left = undelivered(root)
    if not left:
        return None
    lines = [f"[tracking] MLflow records NOT delivered{f' ({error})' if error else ''}:"]
    for (uri, run_id), c in sorted(left.items()):
        status = [k.split()[1] for k in c if k.startswith("status ")]
        parts = [
            f"{_count(c['metrics'], 'metric batch', 'es')} ({_count(c['metric values'], 'value')})",
            _count(c["params"], "params batch", "es"),
            _count(c["tags"], "tag batch", "es"),
            _count(c["artifact"], "artifact"),
            f"the run's end ({status[0]})" if status else "not the run's end",
        ]
        lines.append(f"  run {run_id} on {uri}: {', '.join(parts)}")
    lines.append(f"They are kept in {root}. Deliver them when the server is back with:")
    lines.append(f"  panet tracking sync {root}")
    lines.append("(re-running the same job also delivers them first).")
    return "\n".join(lines)


def _count(n: int, noun: str, plural: str = "s") -> str:
    return f"{n} {noun}{'' if n == 1 else plural}"


def sync(root: Path, timeout_s: float, retry_max_s: float = 10.0) -> str | None:
    """`panet tracking sync`: deliver every journal of an outbox no living process holds,
    trying again with backoff for up to `timeout_s`.

    Returns:
        `undelivered_message` for what is left, None when everything is delivered.
    """
    if not root.is_dir():
        raise ValueError(f"{root}: no such MLflow outbox directory")
    if not journals.journals(root):
        raise ValueError(f"{root}: no MLflow journals (*.jsonl) in this directory")
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    deadline, delay, error = time.monotonic() + timeout_s, 0.5, ""
    known: dict[str, Journal] = {}
    while True:
        try:
            if deliver_pass(root, None, adopt=True, known=known):
                return undelivered_message(root)
        except DeliveryError as err:
            error = short_error(err)
        if time.monotonic() + delay > deadline:
            return undelivered_message(root, error)
        time.sleep(delay)
        delay = min(delay * 2, retry_max_s)
