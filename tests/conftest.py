"""Fixtures shared by the test packages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small synthetic data set converted to shards: 24 training and 8 validation images."""
    from pipeline.demo import ensure_shards

    root = tmp_path_factory.mktemp("data")
    return {
        "train": ensure_shards(root / "raw", root / "shards", "train", 24, 0),
        "val": ensure_shards(root / "raw", root / "shards", "val", 8, 1),
    }


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `mlflow server` for the session (SQLite, local artifacts); its tests keep apart
    by experiment, run and model names. A test that stops its server starts its own."""
    from tests.mlflow_server import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
