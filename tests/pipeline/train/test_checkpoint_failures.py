"""Storage failing under a checkpoint: an outage mid-upload, a corrupt state.pt, a full disk.

The object store is moto's server behind `Outage`, a relay the test cuts (every connection
reset, new ones refused) and restores; the full disk is a small tmpfs the test mounts.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from pipeline import storage
from pipeline.state_file import load_state, save_state, whole_checkpoints
from pipeline.train.checkpoints import latest_state_file, load_resume_state, upload_files
from tests.disk import small_disk
from tests.s3_server import Outage, s3_server

MB = 1 << 20


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server reached through an `Outage` relay; AWS variables point at the relay."""
    with s3_server(tmp_path_factory.mktemp("s3")) as env, pytest.MonkeyPatch.context() as mp:
        relay = Outage(env["AWS_ENDPOINT_URL"])
        for key, value in {**env, "AWS_ENDPOINT_URL": relay.endpoint}.items():
            mp.setenv(key, value)
        yield relay
        relay.cut()


def checkpoint(directory: Path, step: int, megabytes: int = 0) -> Path:
    """A checkpoint directory as the training loop writes it: metrics.json, state.pt (with
    `megabytes` of random weights), then the seal."""
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps({"step": step}))
    weights = {"w": torch.full((4,), float(step)), "pad": torch.rand(megabytes * MB // 4)}
    save_state(directory, model=weights, step=step)
    return directory


def cut_midway(relay: Outage, after: int, restore_after: float | None) -> threading.Thread:
    """Cut the relay once `after` more bytes went up (inside state.pt); restore it later."""
    start = relay.bytes_up

    def run() -> None:
        while relay.bytes_up - start < after:
            time.sleep(0.005)
        relay.cut()
        if restore_after is not None:
            time.sleep(restore_after)
            relay.restore()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_an_upload_cut_midway_is_retried_and_whole_when_storage_is_back(
    outage: Outage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    fs, run = storage.filesystem("s3://panet/outage/retried")
    upload_files(checkpoint(tmp_path / "a", 2), fs, f"{run}/step-00000002")
    monkeypatch.setenv(storage.RETRY_ENV, "60")
    cutter = cut_midway(outage, after=4 * MB, restore_after=8.0)
    t0 = time.monotonic()
    upload_files(checkpoint(tmp_path / "b", 4, megabytes=24), fs, f"{run}/step-00000004")
    cutter.join(timeout=10)
    assert (
        time.monotonic() - t0 > 8.0
    )  # it waited out the outage, longer than the S3 client retries
    assert "retrying" in capsys.readouterr().out
    uri = "s3://panet/outage/retried"
    assert [d.name for d in whole_checkpoints(uri)] == ["step-00000002", "step-00000004"]
    assert load_state(f"{uri}/step-00000004")["step"] == 4  # its sha256 checked on reading


def test_an_outage_past_the_retry_budget_names_the_uri_and_keeps_the_last_whole(
    outage: Outage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = "s3://panet/outage/failed"
    fs, run = storage.filesystem(uri)
    upload_files(checkpoint(tmp_path / "a", 2), fs, f"{run}/step-00000002")
    monkeypatch.setenv(storage.RETRY_ENV, "2")
    cut_midway(outage, after=4 * MB, restore_after=None).join(timeout=0)
    with pytest.raises(OSError, match=rf"{uri}/step-00000004/state.pt.*failed \d+ times"):
        upload_files(checkpoint(tmp_path / "b", 4, megabytes=24), fs, f"{run}/step-00000004")
    outage.restore()
    warnings: list[str] = []
    # The half-uploaded step has no seal: resume and eval see only the whole one.
    assert str(latest_state_file(uri, warnings.append)) == f"{uri}/step-00000002/state.pt"
    assert all("step-00000004" in w and "checkpoint.json" in w for w in warnings)


@pytest.mark.parametrize(("damage", "where"), [("cut at half", "s3"), ("garbage", "local")])
def test_resume_names_a_corrupt_state_file_and_takes_the_previous_whole_checkpoint(
    outage: Outage, tmp_path: Path, damage: str, where: str
) -> None:
    run = "s3://panet/corrupt/job" if where == "s3" else str(tmp_path / "runs" / "job")
    fs, path = storage.filesystem(run)
    for step in (2, 4, 6):
        upload_files(checkpoint(tmp_path / str(step), step), fs, f"{path}/step-{step:08d}")

    def spoil(step: int) -> str:
        state = f"{run}/step-{step:08d}/state.pt"
        data = storage.read_bytes(state)
        # Garbage of the same size: only the seal's sha256 tells it from the real file.
        storage.write_bytes(
            state, data[: len(data) // 2] if damage == "cut at half" else os.urandom(len(data))
        )
        return state

    bad = spoil(6)
    warnings: list[str] = []
    state = load_resume_state(f"{run}/step-00000006", warnings.append)
    assert state["step"] == 4
    assert any(bad in w for w in warnings), warnings
    assert warnings[-1].endswith(f"{run}/step-00000004")  # where it goes on from
    # A cut file is left out of the listing already; garbage of the right size when it is read.
    listed = 4 if damage == "cut at half" else 6
    assert str(latest_state_file(run, warnings.append)) == f"{run}/step-{listed:08d}/state.pt"
    spoil(4), spoil(2)
    with pytest.raises(ValueError, match=rf"{bad}.*holds no earlier whole checkpoint"):
        load_resume_state(f"{run}/step-00000006", warnings.append)


def test_a_full_disk_under_a_checkpoint_names_the_path_and_keeps_the_last_whole(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk", 256 * 1024) as disk:
        fs, run = pafs.LocalFileSystem(), disk / "job"
        upload_files(checkpoint(tmp_path / "a", 2), fs, str(run / "step-00000002"))
        big = checkpoint(tmp_path / "b", 4, megabytes=1)
        with pytest.raises(
            OSError, match=rf"no space left on device writing '{run}/step-00000004/state.pt'"
        ):
            upload_files(big, fs, str(run / "step-00000004"))
        assert not (run / "step-00000004").exists()  # the partial copy is removed
        assert latest_state_file(run) == run / "step-00000002" / "state.pt"
        # Writing the state itself on a full disk (the worker's own temp folder) names it too.
        with pytest.raises(OSError, match=rf"no space left on device writing '{disk}/w/state.pt'"):
            checkpoint(disk / "w", 6, megabytes=1)
        assert [p.name for p in (disk / "w").iterdir()] == ["metrics.json"]  # no state, no seal


def test_an_injected_enospc_under_a_checkpoint_names_the_path(tmp_path: Path) -> None:
    """The same as on a full tmpfs, where none can be mounted: ENOSPC when state.pt is written."""
    from fsspec.implementations.local import LocalFileSystem

    class FullDisk(pafs.FSSpecHandler):
        def open_output_stream(self, path: str, metadata: dict) -> object:
            if path.endswith("state.pt"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().open_output_stream(path, metadata)

    fs, run = pafs.PyFileSystem(FullDisk(LocalFileSystem())), tmp_path / "job"
    upload_files(checkpoint(tmp_path / "a", 2), pafs.LocalFileSystem(), str(run / "step-00000002"))
    with pytest.raises(
        OSError, match=rf"no space left on device writing .*{run}/step-00000004/state.pt"
    ):
        upload_files(checkpoint(tmp_path / "b", 4), fs, str(run / "step-00000004"))
    assert [d.name for d in whole_checkpoints(run)] == ["step-00000002"]
