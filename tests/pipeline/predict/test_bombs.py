"""`panet predict` on a decompression bomb: named and skipped, the other images predicted."""

from __future__ import annotations

import json

from PIL import Image

from pipeline.cli import main
from tests.pipeline.data.test_image_limit import jpeg_bomb, png_bomb


def test_predict_names_and_skips_bombs(untrained_checkpoint, tmp_path, capsys) -> None:
    bombs = [tmp_path / "huge.png", tmp_path / "huge.jpg"]
    bombs[0].write_bytes(png_bomb(60000, 60000))
    bombs[1].write_bytes(jpeg_bomb(9000, 9000))  # under PIL's own 89 MP warning
    photo = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (30, 160, 90)).save(photo)
    out = tmp_path / "out"
    args = ["predict", "--model", str(untrained_checkpoint), *map(str, bombs), str(photo)]
    code = main([*args, "--out", str(out), "--no-pictures", "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert code == 0, stderr
    meta = json.loads((out / "images.json").read_text())
    assert [i["file_name"] for i in meta["images"]] == [str(photo)]
    skipped = {s["file_name"]: s for s in meta["skipped"]}
    assert set(skipped) == set(map(str, bombs))
    assert "image of 3,600,000,000 pixels is over the limit" in str(skipped[str(bombs[0])])
    assert "9000x9000 pixels (81,000,000)" in str(skipped[str(bombs[1])])
    assert "huge.png" in stderr and "huge.jpg" in stderr
