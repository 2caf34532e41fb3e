"""Decompression bombs: tiny files declaring huge images are named and skipped, never decoded."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.image_limit import MAX_PIXELS_ENV, ImageTooLarge, max_pixels, open_image

REPO = Path(__file__).resolve().parents[3]


def png_bomb(width: int, height: int, rows: int = 1) -> bytes:
    """A PNG declaring `width` x `height` 8-bit grey pixels, with `rows` rows of zeros.

    `rows == height` is a whole image that decodes (a 10000 x 10000 one is 100 MB decoded from
    ~100 KB); fewer rows is a truncated one, which only the header check can refuse cheaply.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    packer = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # a filter byte, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(rows)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def jpeg_bomb(width: int, height: int) -> bytes:
    """A 16 x 16 JPEG whose frame header (SOF0) is rewritten to declare `width` x `height`."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_the_header_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # raised below
    for bomb in (png_bomb(60000, 60000), jpeg_bomb(60000, 60000)):
        assert len(bomb) < 1000
        with pytest.raises(ImageTooLarge, match="over the limit of 64,000,000"):
            open_image(bomb)
    # PIL alone only warns here (100 MP < twice its 89 MP): the limit is what refuses it.
    with pytest.raises(ImageTooLarge, match="10000x10000 pixels"):
        open_image(png_bomb(10000, 10000))
    with open_image(png_bomb(4000, 2000, rows=2000)) as img:
        assert img.size == (4000, 2000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "7_000_000")
    with pytest.raises(ImageTooLarge, match=r"4000x2000 pixels \(8,000,000\)"):
        open_image(png_bomb(4000, 2000))
    monkeypatch.setenv(MAX_PIXELS_ENV, "400000000")  # above PIL's own error threshold too
    with open_image(png_bomb(20000, 10000)) as img:
        assert img.size == (20000, 10000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots'"):
        max_pixels()


MEMORY_SCRIPT = """
import json, sys
from pathlib import Path
from pipeline.data import augment, plan
from pipeline.data.convert_mvd import MVD_MODES, read_id_map
from pipeline.predict import images

path = Path(sys.argv[1])
data = path.read_bytes()

def status(key):  # MB
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
before, errors = status("VmRSS"), []
calls = [
    lambda: images.decode(data, str(path)),
    lambda: plan.read_image(path),
    lambda: read_id_map(path, (10000, 10000), MVD_MODES),
    lambda: augment.decode_image(data, 10000, 10000),
]
for call in calls if sys.argv[2] == "all" else calls[1:2]:
    try:
        call()
        errors.append("")
    except Exception as err:
        errors.append(f"{type(err).__name__}: {getattr(err, 'reason', err)}")
print(json.dumps({"growth_mb": status("VmHWM") - before, "errors": errors}))
"""


def _decode_in_subprocess(path: Path, limit: int | None = None, calls: str = "all") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(MAX_PIXELS_ENV, None)
    if limit:
        env[MAX_PIXELS_ENV] = str(limit)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path), calls],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_a_whole_bomb_costs_no_memory_in_predict_conversion_or_training(tmp_path: Path) -> None:
    """A real 100-megapixel PNG of ~100 KB: every reader refuses it, peak RSS barely moves."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(10000, 10000, rows=10000))
    assert path.stat().st_size < 200_000
    found = _decode_in_subprocess(path)
    assert found["growth_mb"] < 30, found
    messages = found["errors"]
    assert messages[0].startswith(f"ImageError: {path}: image of 10000x10000 pixels"), messages
    assert all("over the limit of 64,000,000" in m for m in messages), messages
    # The control: with the limit raised, conversion's reader decodes it (100 MB).
    raised = _decode_in_subprocess(path, limit=200_000_000, calls="read_image")
    assert raised["growth_mb"] > 90 and raised["errors"] == [""], raised


def test_conversion_lists_a_bomb_as_skipped(tmp_path: Path) -> None:
    from pipeline.cli import main as panet
    from pipeline.data.synth import write_synthetic

    raw = tmp_path / "raw"
    write_synthetic("coco", 3, 0, raw, split="train")
    images = sorted((raw / "images" / "train").iterdir())
    images[1].write_bytes(png_bomb(60000, 60000))
    out = tmp_path / "shards"
    args = ["data", "convert", "coco", "--out", str(out), "--workers", "1", "--quiet"]
    args += ["--annotations", str(raw / "annotations" / "instances_train.json")]
    assert panet([*args, "--images", str(raw / "images" / "train")]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [s for s in manifest["skipped"] if s["kind"] == "image"]
    assert [(s["source"], s["code"]) for s in skipped] == [(str(images[1]), "image_too_large")]
    assert "image of 3,600,000,000 pixels is over the limit" in skipped[0]["reason"]
    assert sum(s["rows"] for s in manifest["shards"]) == 2
