"""A trained model ready to predict: loaded from a checkpoint or from MLflow, with class names.

`load_predictor` accepts a training checkpoint (its directory or `state.pt`), an MLflow model
URI (`models:/<id>`, `models:/<name>/<version>`, `models:/<name>@<alias>`, `runs:/<run id>/model`)
or a local MLflow model directory. Either way the model is rebuilt from its config (with
`--set model.*` overrides, e.g. the test-time tricks) and its weights are loaded strictly, so both
give the same predictions. Weights are read with `weights_only=True` (no code runs from a file);
an MLflow model that has only a pickled module is unpickled only with `allow_pickle`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from panet_model import build_panet
from pipeline import tracking
from pipeline.evaluate.scoring import predictions_to_coco
from pipeline.state_file import load_state
from pipeline.state_file import model_config as checkpoint_config

MLFLOW_SCHEMES = ("models:/", "runs:/")
ALLOW_PICKLE_FLAG = "--allow-pickle"  # unpickles an MLflow model that has no weights file


@dataclass
class Detections:
    """One image's detections at its original size, best first (numpy)."""

    boxes: np.ndarray  # (N, 4) float x1y1x2y2
    scores: np.ndarray  # (N,) float
    category_ids: np.ndarray  # (N,) int: the dataset's category ids
    masks: np.ndarray  # (N, H, W) bool
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,) 1..C


@dataclass
class Predictor:
    """A model in eval mode plus what turns its outputs into dataset results."""

    model: nn.Module
    categories: dict[int, str]  # dataset category id -> name, in training label order
    device: torch.device
    score_threshold: float = 0.5
    max_detections: int = 100
    source: str = ""

    def input_scale(self, height: int, width: int) -> float:
        """The factor the model's transform resizes an image of this size by before the backbone.

        As in training and evaluation, every image is resized so that its short side is the
        test scale (`model.transform.min_size[-1]`, or the smallest of `model.test.scales`) and
        its long side at most the cap: an image far smaller than that is upscaled many times.
        """
        transform: Any = self.model.transform  # torchvision's GeneralizedRCNNTransform
        test: Any = getattr(self.model, "test", None)
        short = min(test.scales) if test is not None and test.scales else transform.min_size[-1]
        cap = (test.max_size if test is not None else 0) or transform.max_size
        return float(min(short / min(height, width), cap / max(height, width)))

    @property
    def inverse_labels(self) -> dict[int, int]:
        """Contiguous label 1..C -> dataset category id."""
        return {i + 1: cat for i, cat in enumerate(self.categories)}

    def predict(self, image: np.ndarray) -> Detections:
        """Detections of one (H, W, 3) uint8 RGB image above the score threshold.

        Images go through the model one at a time: the results do not depend on batching
        (padding a batch to its largest image changes the features of the others).
        """
        chw = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(
            2, 0, 1
        )  # (H, W, 3) -> (3, H, W)
        x = chw.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        with torch.inference_mode():
            out = self.model([x.to(self.device)])[0]
        scores = out["scores"].cpu()
        keep = torch.nonzero(scores >= self.score_threshold).flatten()[: self.max_detections]
        labels = out["labels"].cpu()[keep]
        h, w = image.shape[:2]
        masks = (
            (out["masks"][keep.to(out["masks"].device), 0] > 0.5).cpu().numpy()
            if "masks" in out
            else np.zeros((len(keep), h, w), dtype=bool)
        )
        inverse = self.inverse_labels
        return Detections(
            boxes=out["boxes"].cpu()[keep].numpy(),
            scores=scores[keep].numpy(),
            category_ids=np.array([inverse[int(v)] for v in labels], dtype=np.int64),
            masks=masks,
            labels=labels.numpy(),
        )

    def coco_results(self, detections: Detections, image_id: int) -> list[dict[str, Any]]:
        """COCO result dicts (dataset category ids, compressed RLE masks) of one image."""
        output = {
            "boxes": torch.from_numpy(detections.boxes),
            "scores": torch.from_numpy(detections.scores),
            "labels": torch.from_numpy(detections.labels),
            "masks": torch.from_numpy(detections.masks),
        }
        return predictions_to_coco([output], [image_id], self.inverse_labels)


def is_mlflow_model(source: str) -> bool:
    """An MLflow model URI, or a local directory holding an MLflow model (its MLmodel file)."""
    return source.startswith(MLFLOW_SCHEMES) or (Path(source) / "MLmodel").is_file()


def resolve_device(device: str) -> torch.device:
    """ "auto" -> the first GPU if there is one, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: this machine has no CUDA GPU (use cpu or auto)")
    return dev


def tracking_uri_for(source: str, tracking_uri: str | None) -> str:
    """The MLflow store of a model URI: the given one, else MLFLOW_TRACKING_URI."""
    uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")).strip()
    if not uri and source.startswith(MLFLOW_SCHEMES):
        raise ValueError(
            f"--model {source!r} is an MLflow URI: say which store holds it with --tracking-uri "
            "(e.g. the sqlite:///... URI `panet train` printed) or MLFLOW_TRACKING_URI"
        )
    return uri


def load_predictor(
    source: str,
    *,
    device: str = "cpu",
    tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
    score_threshold: float = 0.5,
    max_detections: int = 100,
    allow_pickle: bool = False,
) -> Predictor:
    """Load a model for prediction.

    Args:
        source: a checkpoint directory or `state.pt`, an MLflow model URI, or a local MLflow
            model directory.
        device: "cpu", "cuda", "cuda:1", or "auto".
        tracking_uri: the MLflow store of a `models:/` or `runs:/` URI (default
            MLFLOW_TRACKING_URI).
        overrides: `{"model.dotted.key": value}` applied to the model's config, e.g.
            `{"model.test.flip": True}`; keys must start with "model.".
        score_threshold: detections below this score are dropped.
        max_detections: at most this many detections per image (the best).
        allow_pickle: unpickle an MLflow model that has no weights file (logged by other code
            than `panet train`); unpickling runs any code the file carries.

    Returns:
        A `Predictor` with the model in eval mode on `device`.

    Raises:
        ValueError / FileNotFoundError: naming the model source or the key that is wrong.
    """
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold {score_threshold}: expected a score in [0, 1]")
    if max_detections < 1:
        raise ValueError(f"--max-detections {max_detections}: expected >= 1")
    dev = resolve_device(device)
    if is_mlflow_model(source):
        state, model_config, categories = _from_mlflow(source, tracking_uri, allow_pickle)
    else:
        state, model_config, categories = _from_checkpoint(source)
    cfg = _config(model_config, overrides or {}, max_detections)

    model = build_panet(cfg, num_classes=len(categories) + 1)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"model {source!r} does not fit its config: {str(err)[:300]}") from err
    return Predictor(model.to(dev).eval(), categories, dev, score_threshold, max_detections, source)


def _config(model_config: dict[str, Any], overrides: dict[str, Any], max_detections: int) -> Any:
    cfg = checkpoint_config({"config": {"model": model_config}}, overrides)
    if max_detections > cfg.roi.detections_per_img:
        cfg = cfg.override({"roi.detections_per_img": max_detections})
    return cfg


def _from_checkpoint(source: str) -> tuple[dict, dict[str, Any], dict[int, str]]:
    state = load_state(source)
    if "config" not in state or "categories" not in state:
        raise ValueError(f"checkpoint {source!r} lacks its config or categories")
    categories = {int(k): str(v) for k, v in state["categories"].items()}
    return state["model"], dict(state["config"]["model"]), categories


def _from_mlflow(
    source: str, tracking_uri: str | None, allow_pickle: bool
) -> tuple[dict, dict[str, Any], dict[int, str]]:
    uri = tracking_uri_for(source, tracking_uri)
    card = _load_mlflow(source, uri, lambda: tracking.model_metadata(uri, source)).get("panet")
    if not isinstance(card, dict) or "categories" not in card or "model_config" not in card:
        raise ValueError(
            f"MLflow model {source!r} carries no PANet metadata (categories, model_config): "
            "log it with `panet train`, or predict from its checkpoint directory"
        )
    state = _load_mlflow(source, uri, lambda: tracking.load_weights(uri, source))
    if state is None:
        if not allow_pickle:
            raise ValueError(
                f"MLflow model {source!r} holds no weights file ({tracking.WEIGHTS_PATH}), only "
                "a pickled module, and unpickling runs whatever code its author put in it: if "
                f"you trust where it comes from, load it with {ALLOW_PICKLE_FLAG}"
            )
        module = _load_mlflow(source, uri, lambda: tracking.load_pickled_model(uri, source))
        state = module.state_dict()
    categories = {int(c["id"]): str(c["name"]) for c in card["categories"]}
    return state, dict(card["model_config"]), categories


def _load_mlflow(source: str, uri: str, read: Callable[[], Any]) -> Any:
    """`read()`, with MLflow's errors re-raised as a ValueError naming the model and store."""
    try:
        return read()
    except ValueError:
        raise  # ours: it names the model
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; re-raised with the URI
        where = f" from {uri!r}" if uri else ""
        raise ValueError(f"cannot load MLflow model {source!r}{where}: {err}") from err
