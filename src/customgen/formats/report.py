"""`customgen inspect FILE`: what a file is and whether customgen can use it, answered before anything loads.

A file customgen cannot use is still an answer (exit 0): `usable: false` with the `reason`, the same line every
command that would use it refuses it with. A checkpoint also gets the model report `customgen inspect REF` gives.
"""
from __future__ import annotations

from pathlib import Path

from customgen.formats.adapter import examine, sha256


def file_report(path: str | Path) -> dict:
    """The JSON report: format, base, modules, rank, alpha, triggers, metadata, usable, use, reason, sha256 (and a
    checkpoint's components)."""
    report, _ = examine(path)
    report["sha256"] = sha256(Path(path).expanduser())
    if report["format"] == "checkpoint" and report["usable"]:
        from customgen.models import load_components  # lazy: a model's architecture, only for checkpoints
        from customgen.models.inspect import inspect_components  # lazy

        report["model"] = inspect_components(load_components(str(path), meta=True))
    return report


def _span(values) -> str:
    if not values:
        return "-"
    low, high = values
    return f"{low:g}" if low == high else f"{low:g}–{high:g}"


def format_file_report(report: dict) -> str:
    """Human-readable lines for `customgen inspect FILE`."""
    modules = ", ".join(f"{n} {c}" for c, n in sorted(report.get("modules", {}).items())) or "-"
    rows = [f"file      {report['file']}",
            f"format    {report['format']} (for {report['base']})",
            f"layers    {modules}; rank {_span(report['rank'])}, alpha {_span(report['alpha'])}"]
    if report.get("dora"):
        rows.append(f"dora      {', '.join(report['dora'])}-axis magnitude")
    if report.get("embeddings"):
        rows.append("embedding " + ", ".join(f"{w} ({n} vector{'s' * (n != 1)})" for w, n in report["embeddings"].items()))
    if report["triggers"]:
        rows.append(f"triggers  {', '.join(report['triggers'])}")
    if report.get("sampler"):
        s = report["sampler"]
        rows.append(f"sampler   {s['what']}: --scheduler {' or '.join(s['schedulers'])}, {s['steps']} steps")
    if report.get("unmatched"):
        u = report["unmatched"]
        rows.append(f"not SD1   {u['count']} key(s) match no SD v1.5 layer (first: {', '.join(u['first'])})")
    for key in ("ss_output_name", "ss_sd_model_name", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_resolution", "ss_steps"):
        if key in report["metadata"]:
            rows.append(f"{key:<9} {report['metadata'][key]}")
    if "model" in report:
        rows.append(f"model     unet {report['model']['unet']['total']:,} parameters")
    rows.append(f"usable    yes: {report['use']}" if report["usable"] else f"usable    no: {report['reason']}")
    rows.append(f"sha256    {report['sha256']}")
    return "\n".join(rows)
