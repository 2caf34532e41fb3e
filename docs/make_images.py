"""Render the README's picture: a trained model's predictions beside the ground truth.

Loads a training checkpoint, predicts on the first validation images of a shard directory and
draws each image twice, ground truth left and predictions right (the picture `panet train`
logs to MLflow at every evaluation, `pipeline/tracking/pictures.py`). By default it takes the
model `make demo` trained and writes `docs/images/demo_predictions.png`:

    make demo
    .venv/bin/python docs/make_images.py [--checkpoint DIR] [--data DIR] [--images N] [--out PNG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = "demo/runs/tiny-synth"
DEFAULT_DATA = "demo/shards/val"
DEFAULT_OUT = REPO / "docs" / "images" / "demo_predictions.png"
PANEL_WIDTH = 300  # px per image panel: small enough for a README, large enough to read labels
COLORS = 256  # the PNG is stored with a palette: a third of the bytes, no visible change


def render(checkpoint: Path, data: Path, images: int, out: Path) -> Path:
    """Draw `images` validation images with the checkpoint's predictions into `out`.

    Args:
        checkpoint: a job directory, a `step-*` directory or its `state.pt`.
        data: the shard directory of the validation images.
        images: how many images (the first ones of the shards), one row each.
        out: the PNG to write.

    Returns:
        `out`.
    """
    import torch

    from panet_model import build_panet
    from pipeline.data.manifest import load_manifest
    from pipeline.data.reader import inverse_label_map
    from pipeline.evaluate.job import pick_checkpoint
    from pipeline.state_file import load_state, model_config
    from pipeline.tracking.pictures import prediction_figure
    from pipeline.tracking.samples import predict, read_samples

    state = load_state(pick_checkpoint(str(checkpoint)))
    model = build_panet(model_config(state), num_classes=int(state["num_classes"]))
    model.load_state_dict(state["model"])

    manifest = load_manifest(data)
    inverse = inverse_label_map(manifest)  # label -> category id
    names = {c["id"]: c["name"] for c in manifest["categories"]}
    samples = read_samples(str(data), images, {cat: label for label, cat in inverse.items()})
    pictures = [s["image"] for s in samples]
    path = prediction_figure(
        pictures,
        predict(model, pictures, torch.device("cpu")),
        [s["gt"] for s in samples],
        {label: names[cat] for label, cat in inverse.items()},
        path=out,
        panel_width=PANEL_WIDTH,
    )
    return shrink(path)


def shrink(path: Path) -> Path:
    """Re-save a PNG with an adaptive palette of `COLORS` colors, without dithering."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    palette = rgb.quantize(COLORS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render a model's predictions beside the ground truth (the README picture).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", type=Path, default=Path(DEFAULT_CHECKPOINT))
    parser.add_argument("--data", type=Path, default=Path(DEFAULT_DATA), help="shard directory")
    parser.add_argument("--images", type=int, default=3, help="validation images, one row each")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images: expected >= 1")
    try:
        path = render(args.checkpoint, args.data, args.images, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"make_images: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
