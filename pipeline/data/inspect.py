"""What a shard directory holds, as a report: `panet data inspect`, `--verify`, and the summary
and yield check printed after a conversion.

Reads the manifest (`manifest.read_manifest_file`); `--verify` re-hashes every shard and checks
its row count and schema against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.data.manifest import read_manifest_file, schema_mismatch, sha256_file
from pipeline.data.progress import format_bytes, format_duration

if TYPE_CHECKING:
    from pipeline.storage import StoragePath


def group_skipped(skipped: list[dict]) -> list[dict]:
    """Group skipped entries by (kind, code), most frequent first.

    Returns:
        `[{"kind", "code", "count", "example": first entry}, ...]`.
    """
    groups: dict[tuple[str, str], dict] = {}
    for s in skipped:
        key = (s.get("kind", "?"), s.get("code", "?"))
        if key not in groups:
            groups[key] = {"kind": key[0], "code": key[1], "count": 0, "example": s}
        groups[key]["count"] += 1
    return sorted(groups.values(), key=lambda g: (-g["count"], g["kind"], g["code"]))


def _format_skipped(skipped: list[dict], indent: str = "  ") -> list[str]:
    lines = []
    for g in group_skipped(skipped):
        ex = g["example"]
        lines.append(
            f"{indent}{g['count']} x {g['kind']} {g['code']}, e.g. {ex['source']}: {ex['reason']}"
        )
    return lines


# What to check when a conversion keeps (almost) nothing, by input format.
YIELD_HINTS = {
    "coco": "is --images the folder holding the annotation file's file_name paths?",
    "mvd": "are --root and --split the data set root and the split folder?",
    "cityscapes": "are --root and --split the data set root and the split folder?",
}


def yield_problem(manifest: dict) -> str | None:
    """One line with a hint when a conversion kept no record or skipped most images, else None.

    Args:
        manifest: a finished conversion's manifest.
    """
    t = manifest["totals"]
    images, records = int(t["images"]), int(t["records"])
    if images == 0:
        return "the input lists no images; is it the right annotation file or split?"
    if records > 0 and 2 * int(t["skipped_images"]) <= images:
        return None
    groups = [g for g in group_skipped(manifest["skipped"]) if g["kind"] == "image"]
    cause = ""
    if groups:
        ex = groups[0]["example"]
        cause = f", {groups[0]['count']} x {groups[0]['code']}, e.g. {ex['source']}: {ex['reason']}"
    hint = YIELD_HINTS.get(str(manifest.get("source", {}).get("format")), "")
    return f"kept {records} of {images} images ({t['skipped_images']} skipped{cause}); {hint}"


def format_summary(manifest: dict, *, elapsed: float, reused_shards: int = 0) -> str:
    """The end-of-conversion summary: records, shards, bytes, time, skipped grouped by reason.

    Args:
        manifest: the manifest just written.
        elapsed: seconds this run took.
        reused_shards: shards found finished by `--resume`.

    Returns:
        Multi-line text.
    """
    t = manifest["totals"]
    name = manifest["source"].get("format", "?")
    lines = [
        f"convert {name}: {t['records']} records ({t['instances']} instances, {t['crowd']} crowd) "
        f"from {t['images']} images in {t['shards']} shards, {format_bytes(t['bytes'])}, "
        f"{format_duration(elapsed)}"
    ]
    if reused_shards:
        lines.append(f"  resumed: {reused_shards} finished shards kept as they were")
    if manifest["skipped"]:
        lines.append(
            f"  skipped {t['skipped_images']} images and {t['skipped_annotations']} annotations:"
        )
        lines += _format_skipped(manifest["skipped"], indent="    ")
    else:
        lines.append("  skipped nothing")
    return "\n".join(lines)


def verify_shard(shard_dir: Path | StoragePath, shard: dict) -> list[str]:
    """Re-check one shard against its manifest entry: presence, sha256, row count, schema.

    Returns:
        Problems found, each naming the shard; empty if it is intact.
    """
    path = shard_dir / shard["path"]
    name = shard["path"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    sha = sha256_file(path)
    if sha != shard["sha256"]:
        problems.append(f"{name}: sha256 mismatch (manifest {shard['sha256']}, file {sha})")
    try:
        meta = pq.read_metadata(str(path))
        if meta.num_rows != shard["rows"]:
            problems.append(f"{name}: {meta.num_rows} rows, manifest says {shard['rows']}")
        msg = schema_mismatch(meta.schema.to_arrow_schema())
        if msg:
            problems.append(f"{name}: {msg}")
    except Exception as e:
        problems.append(f"{name}: not readable Parquet ({e})")
    return problems


def inspect_shards(shard_dir: str | Path | StoragePath, *, verify: bool = False) -> dict:
    """Summarise a shard directory from its manifest; with `verify`, re-check every shard.

    Args:
        shard_dir: directory written by `panet data convert`.
        verify: re-hash every shard and compare row counts and schema with the manifest.

    Returns:
        `{"dir", "source", "format_version", "totals", "image_size", "categories" (with
        "instances" and "crowd" counts), "bytes_on_disk", "skipped_groups", "verified",
        "problems"}`.

    Raises:
        DataError: no (complete) manifest.
    """
    shard_dir = storage.as_path(shard_dir)
    manifest = read_manifest_file(shard_dir)
    instance_counts = manifest.get("instance_counts", {})
    crowd_counts = manifest.get("crowd_counts", {})
    categories = [
        {
            "id": c["id"],
            "name": c["name"],
            "instances": instance_counts.get(str(c["id"]), 0),
            "crowd": crowd_counts.get(str(c["id"]), 0),
        }
        for c in manifest["categories"]
    ]
    on_disk = 0
    for s in manifest["shards"]:
        fs, where = storage.filesystem(str(shard_dir / s["path"]))
        on_disk += max(fs.get_file_info(where).size or 0, 0)
    problems: list[str] = []
    if verify:
        for s in manifest["shards"]:
            problems += verify_shard(shard_dir, s)
        if not sum(int(s["rows"]) for s in manifest["shards"]):
            problems.append("no records: the shard set is empty (see the skipped images)")
    return {
        "dir": str(shard_dir),
        "source": manifest.get("source", {}),
        "format_version": manifest["format_version"],
        "totals": manifest.get("totals", {}),
        "image_size": manifest.get("image_size"),
        "categories": categories,
        "shards": len(manifest["shards"]),
        "bytes_on_disk": on_disk,
        "skipped": manifest["skipped"],
        "skipped_groups": group_skipped(manifest["skipped"]),
        "verified": verify,
        "problems": problems,
    }


def format_inspect(report: dict) -> str:
    """Human-readable text of an `inspect_shards` report.

    Returns:
        Multi-line text.
    """
    t = report["totals"]
    src = report["source"]
    lines = [
        f"{report['dir']}: format_version {report['format_version']}, "
        f"source {src.get('format', '?')} "
        + ", ".join(f"{k}={v}" for k, v in src.items() if k != "format"),
        f"  records: {t.get('records', '?')} of {t.get('images', '?')} images, "
        f"{t.get('instances', '?')} instances, {t.get('crowd', '?')} crowd regions",
        f"  shards: {report['shards']}, {format_bytes(report['bytes_on_disk'])} on disk",
    ]
    size = report["image_size"]
    if size:
        lines.append(
            f"  image size: height {size['min_height']}..{size['max_height']}, "
            f"width {size['min_width']}..{size['max_width']}"
        )
    lines.append(f"  categories ({len(report['categories'])}):")
    for c in report["categories"]:
        lines.append(
            f"    {c['id']:>4}  {c['name']:<40} {c['instances']:>8} inst {c['crowd']:>6} crowd"
        )
    if report["skipped"]:
        lines.append(
            f"  skipped: {t.get('skipped_images', '?')} images, "
            f"{t.get('skipped_annotations', '?')} annotations"
        )
        lines += _format_skipped(report["skipped"], indent="    ")
    else:
        lines.append("  skipped: nothing")
    if report["verified"]:
        if report["problems"]:
            lines.append(f"  verify: FAILED, {len(report['problems'])} problem(s):")
            lines += [f"    {p}" for p in report["problems"]]
        else:
            lines.append(f"  verify: OK, all {report['shards']} shards match sha256 and rows")
    return "\n".join(lines)
