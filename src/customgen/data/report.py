"""Scan report for the CLI and the EDA notebook: counts, sizes, skipped/small files, recommended styles."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from statistics import median

from customgen.data.buckets import BucketSpec, bucket_report, format_buckets
from customgen.data.io import DEFAULT_MAX_PIXELS
from customgen.data.scan import ImageRecord, ScanResult, scan_images
from customgen.errors import UserError
from customgen.data.select import (DEFAULT_N_CONTENT, DEFAULT_N_STYLES, DEFAULT_PER_STYLE, SELECTION_FILES,
                                   build_selection, check_writable, write_json)

MAX_LISTED = 200  # ignored files listed by name in the report (the count is always complete)


def report_file_name(layout: str) -> str:
    """scan_report_<layout>.json, so a WikiArt and a COCO scan can share one output folder."""
    return f"scan_report_{layout}.json"


def _size_stats(records: Sequence[ImageRecord]) -> dict:
    """min / median / max of width and height (None when there are no images)."""
    if not records:
        return {"width": None, "height": None}
    stats = {}
    for axis in ("width", "height"):
        values = [getattr(r, axis) for r in records]
        stats[axis] = {"min": min(values), "median": float(median(values)), "max": max(values)}
    return stats


def build_report(scan: ScanResult, buckets: BucketSpec | None = None) -> dict:
    """A JSON-ready report of a scan; `images` lists every decodable image (usable and small) for plots. With `buckets`
    each usable image's record gets its `bucket` [w, h] and the report a `buckets` table (customgen.data.buckets);
    under no_upscale an image with no bucket moves to the small ones."""
    extra = _bucketed(scan, buckets) if buckets is not None else {}
    decodable = scan.records + scan.small
    report = {
        "root": str(scan.root), "layout": scan.layout, "min_size": scan.min_size, "max_pixels": scan.max_pixels,
        "n_usable": len(scan.records), "n_small": len(scan.small), "n_skipped": len(scan.skipped),
        "n_ignored": len(scan.ignored),
        "counts": scan.counts(),
        "small_counts": dict(Counter(r.label or "" for r in scan.small)),
        "skipped_by_reason": dict(Counter(s["reason"] for s in scan.skipped)),
        "sizes": _size_stats(decodable),
        "skipped": scan.skipped,
        "small": [{"path": r.path, "label": r.label, "width": r.width, "height": r.height} for r in scan.small],
        "ignored": scan.ignored[:MAX_LISTED],
        "csv": scan.csv,
        "images": [{"path": r.path, "label": r.label, "width": r.width, "height": r.height, "small": small}
                   for rs, small in ((scan.records, False), (scan.small, True)) for r in rs],
    }
    if buckets is not None:
        where = extra.pop("where")
        for image in report["images"]:
            image["bucket"] = where.get(image["path"])
        report |= extra
    return report


def _bucketed(scan: ScanResult, spec: BucketSpec) -> dict:
    """Place the usable images in buckets (moving no_upscale's bucketless ones to scan.small): path → bucket, the
    table rows and the settings."""
    rep = bucket_report([(r.width, r.height) for r in scan.records], spec)
    placed = list(zip(scan.records, rep["placements"]))
    scan.records = [r for r, p in placed if p is not None]
    scan.small += [r for r, p in placed if p is None]
    return {"where": {r.path: list(p.bucket) for r, p in placed if p is not None}, "buckets": rep["rows"],
            "bucket_settings": rep["settings"], "n_bucket_small": sum(p is None for _, p in placed)}


def scan_report(root: str | Path, *, layout: str | None = None, out: str | Path | None = None, seed: int = 0,
                n_content: int | None = DEFAULT_N_CONTENT, n_styles: int = DEFAULT_N_STYLES,
                per_style: int | None = DEFAULT_PER_STYLE, styles: Sequence[str] | None = None,
                min_size: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                decode: bool = True, overwrite: bool = False, buckets: BucketSpec | None = None) -> dict:
    """Scan ROOT and report (with `buckets`: each image's bucket and the table); with `out`, also write the selection
    JSON and scan_report_<layout>.json there."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"output {out} is a file; pass a folder for --out")
    scan = scan_images(root, layout=layout, min_size=min_size, max_pixels=max_pixels, decode=decode)
    report = build_report(scan, buckets)
    if out is None:
        return report
    selection = build_selection(scan, seed=seed, n_content=n_content, styles=styles, n_styles=n_styles,
                                per_style=per_style)
    targets = [Path(out) / SELECTION_FILES[selection["kind"]], Path(out) / report_file_name(scan.layout)]
    check_writable(targets, overwrite=overwrite)  # refuse before writing anything
    report["selection"] = selection_summary(selection)
    report["written"] = [str(p) for p in targets]
    write_json(targets[0], selection)
    write_json(targets[1], report)
    return report


def write_report(report: dict, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a report to OUT/scan_report_<layout>.json; refuses to overwrite unless asked."""
    path = Path(out) / report_file_name(report["layout"])
    check_writable([path], overwrite=overwrite)
    return write_json(path, report)


def selection_summary(selection: dict) -> dict:
    """A selection document without its path lists: kind, seed and how many images were chosen."""
    summary = {k: v for k, v in selection.items() if k not in ("paths", "items", "styles")}
    if "styles" in selection:
        summary["styles"] = {s: len(v) for s, v in selection["styles"].items()}
    else:
        summary["n_selected"] = len(selection["paths"])
    return summary


def _counts_of(report_or_scan: dict | ScanResult) -> dict[str, int]:
    """Usable images per label from a report dict or a ScanResult."""
    return report_or_scan.counts() if isinstance(report_or_scan, ScanResult) else dict(report_or_scan["counts"])


def recommend_styles(report_or_scan: dict | ScanResult, *, min_images: int = 50, k: int = 5) -> dict:
    """Up to k styles with ≥ min_images usable images, most images first, and why when fewer qualify."""
    counts = _counts_of(report_or_scan)
    ranked = sorted(counts, key=lambda s: (-counts[s], s))
    qualified = [s for s in ranked if counts[s] >= min_images]
    chosen = qualified[:k]
    if len(chosen) >= k:
        reason = f"the {k} styles with most usable images (each ≥ {min_images})"
    elif chosen:
        reason = (f"only {len(chosen)} of {len(counts)} styles have ≥ {min_images} usable images; "
                  f"lower min_images or add images to reach {k}")
    else:
        best = f" (largest: {ranked[0]} with {counts[ranked[0]]})" if ranked else ""
        reason = f"no style has ≥ {min_images} usable images{best}; lower min_images or add images"
    return {"styles": chosen, "counts": {s: counts[s] for s in chosen}, "n_qualified": len(qualified),
            "min_images": min_images, "reason": reason}


def _fmt_sizes(sizes: dict) -> str:
    """'width 120–4000 (median 800), height ...' or 'no decodable images'."""
    if sizes["width"] is None:
        return "sizes: no decodable images"
    w, h = sizes["width"], sizes["height"]
    return (f"sizes: width {w['min']}–{w['max']} (median {w['median']:g}), "
            f"height {h['min']}–{h['max']} (median {h['median']:g})")


def format_summary(report: dict, *, top: int = 5, max_skipped: int = 50) -> str:
    """A few human-readable lines about a scan report, then each skipped file with its reason."""
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(report["skipped_by_reason"].items()))
    counts = report["counts"]
    lines = [
        f"{report['layout']} layout at {report['root']}: {len(counts)} label(s)",
        f"usable {report['n_usable']}; small (< {report['min_size']} px) {report['n_small']}; "
        f"skipped {report['n_skipped']}" + (f" ({reasons})" if reasons else "")
        + f"; ignored {report['n_ignored']} non-image file(s)",
        _fmt_sizes(report["sizes"]),
    ]
    if len(counts) > 1:
        more = f" (+{len(counts) - top} more)" if len(counts) > top else ""
        lines.append("largest: " + ", ".join(f"{k} {v}" for k, v in list(counts.items())[:top]) + more)
    skipped = report.get("skipped", [])
    for item in skipped[:max_skipped]:
        lines.append(f"  skipped {item['path']}: {item['reason']}" + (f" ({item['detail']})" if item.get("detail") else ""))
    if len(skipped) > max_skipped:
        lines.append(f"  ... and {len(skipped) - max_skipped} more skipped files (all listed in the report JSON)")
    if "buckets" in report:
        lines.append(format_buckets(report["buckets"], report["bucket_settings"], small=report["n_bucket_small"]))
    if report.get("written"):
        lines.append("wrote " + ", ".join(report["written"]))
    return "\n".join(lines)
