"""Metrics for generated outputs: per-image rows, then one row per model/style (means, stds, set metrics, cost).

Per-image metrics are computed per content image: the content is loaded and encoded once, and every output made
from it (all points) goes through CLIP, LPIPS and SSIM in batches; reference styles are encoded once. CLIP and
Inception features are cached per image (sha1 of its bytes) under eval.output/features, so a re-run or a larger
study computes only new images. Degenerate outputs (black, NaN, constant) are kept in the per-image table with
their `flag` and left out of every mean and of FID/KID (customgen.metrics.summarize / the set metrics).
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from customgen import metrics as M
from customgen.evaluate.generate import BASELINE, Output, ip_reference
from customgen.formats import sha256

PAIR_METRICS = ("clip_content", "clip_style", "style_strength", "ssim", "lpips")  # per image
SET_METRICS = ("fid", "kid", "art_fid")  # per model/style
BATCH = 16  # images per network call (CLIP, LPIPS, Inception)


def _img(path):
    return M.load_image(path)


def content_metrics(paths: list, content, nets, lp, *, batch_size: int = BATCH) -> list[tuple[dict, object, str]]:
    """(clip_content/ssim/lpips results, CLIP feature, flag) for each output made from one content image."""
    content = _img(content)
    images = [_img(p) for p in paths]
    arrays = [M.to_array(im) for im in images]
    flags = [M.is_degenerate(a) for a in arrays]
    ok = [i for i, f in enumerate(flags) if f != "nan"]
    feats = dict(zip(ok, M.encode_images([images[i] for i in ok], nets.clip, cache=nets.feature_cache,
                                         batch_size=batch_size))) if ok else {}
    content_feat = M.encode_images([content], nets.clip, cache=nets.feature_cache)  # (1, D)
    ssims, lpipses = M.ssim_many(arrays, content), M.lpips_many(arrays, content, net=lp, batch_size=batch_size)
    out = []
    for i, flag in enumerate(flags):
        clip = M.clip_result("clip_content", feats.get(i), content_feat, smoke=nets.clip.smoke, flag=flag)
        out.append(({"clip_content": clip, "ssim": ssims[i], "lpips": lpipses[i]}, feats.get(i), flag))
    return out


def reference_features(inputs, nets, *, batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """CLIP features (M, D) of every style's reference images, once."""
    return {s: M.encode_images(list(paths), nets.clip, cache=nets.feature_cache, batch_size=batch_size)
            for s, paths in sorted(inputs.references.items()) if paths}


def image_rows(outputs: list[Output], inputs, nets, *, lpips_net: str, progress: bool = True,
               batch_size: int = BATCH) -> list[dict]:
    """Per-image metric rows (MetricResults under '_results'); a baseline image gets one row per reference style."""
    lp = nets.lpips(lpips_net)
    refs = reference_features(inputs, nets, batch_size=batch_size)
    ref_of = {s.name: s.reference for s in inputs.styles}
    ref_of |= {o.point.model: ip_reference(o.point) for o in outputs if ip_reference(o.point)}
    by_content: dict = defaultdict(list)
    for i, o in enumerate(outputs):
        by_content[o.content].append(i)
    pairs: dict[int, tuple] = {}
    for content, idx in tqdm(by_content.items(), desc="metrics", unit="content", disable=not progress):
        pairs.update(zip(idx, content_metrics([outputs[i].path for i in idx], content, nets, lp, batch_size=batch_size)))
    rows = []
    for i, o in enumerate(outputs):
        pair, feat, flag = pairs[i]
        styles = (inputs.reference_styles or [None]) if o.point.model == BASELINE else [ref_of[o.point.model]]
        for style in styles:
            res = dict(pair)
            if style is not None:
                res["clip_style"] = M.clip_result("clip_style", feat, refs[style], smoke=nets.clip.smoke, flag=flag)
            rows.append({"model": o.point.model, "method": o.point.method, "style": style or "",
                         "strength": o.point.strength, "style_scale": o.point.scale, "content": str(o.content),
                         "output": str(o.path), "flag": flag, "seconds": o.seconds,
                         "peak_memory_bytes": o.peak_memory_bytes, "reused": o.reused, "_results": res})
    add_style_strength(rows)
    return rows


def add_style_strength(rows: list[dict]) -> None:
    """Style Strength = CLIP-content / baseline CLIP-content of the same content and strength (baseline: 1)."""
    base = {(r["content"], r["strength"]): r["_results"]["clip_content"] for r in rows if r["model"] == BASELINE}
    for r in rows:
        ref = base.get((r["content"], r["strength"]))
        r["_results"]["style_strength"] = (M.style_strength(r["_results"]["clip_content"], ref) if ref is not None
                                           else M.MetricResult("style_strength", math.nan, flag="no_baseline"))


def per_image_table(rows: list[dict]) -> pd.DataFrame:
    """The per-image rows as a DataFrame: one column per metric, plus `smoke`."""
    flat = []
    for r in rows:
        res = r["_results"]
        flat.append({k: v for k, v in r.items() if k != "_results"}
                    | {m: float(res[m]) if m in res else math.nan for m in PAIR_METRICS}
                    | {"smoke": any(x.smoke for x in res.values())})
    return pd.DataFrame(flat)


def cost_columns(group: list[dict], style) -> dict:
    """Generation time (median over images: the first call also loads weights) and artifact cost columns (styles
    and subjects alike: `style` is the artifact, None for the base model)."""
    secs = np.array([r["seconds"] for r in group], dtype=float)
    secs = secs[np.isfinite(secs)]
    peaks = [r["peak_memory_bytes"] for r in group if r["peak_memory_bytes"] is not None]
    m = style.manifest if style is not None else None
    path = None if m is None else getattr(style, "source", None) or style.folder / m.weights
    return {"source": str(path or ""), "sha256": weights_sha256(path) if path else "",
            "seconds_per_image": float(np.median(secs)) if secs.size else math.nan,
            "seconds_per_image_std": float(secs.std(ddof=1)) if secs.size > 1 else math.nan,
            "infer_peak_memory_bytes": max(peaks) if peaks else None,
            "trainable_params": m.trainable_params if m else 0,
            "artifact_bytes": M.artifact_bytes(style.folder / m.weights) if m else 0,
            "train_seconds": m.train_seconds if m else 0.0,
            "peak_memory_bytes": m.peak_memory_bytes if m else None}


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))


def weights_sha256(path: Path) -> str:
    """The sha256 of a style's weights file (a downloaded file and a trained artifact side by side), once per
    version of the file."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def _set_metrics(group: list[dict], refs, nets, e, lpips_mean: float) -> dict:
    """FID and KID between the group's outputs and the style references (features computed once per image, the
    references' once per style), and ArtFID; with sample sizes."""
    enc = nets.inception
    fa = M.encode_images([r["output"] for r in group], enc, cache=nets.feature_cache) if group else None
    if fa is None or refs is None:
        return {k: math.nan for k in ("fid", "fid_std", "kid", "kid_std", "art_fid", "art_fid_std")} | {
            "fid_n": 0, "fid_n_ref": 0, "kid_subset_size": 0, "_smoke": False}
    fid = M.fid(fa, refs, smoke=enc.smoke)
    kid = M.kid(fa, refs, subset_size=e.kid_subset, seed=e.seed, smoke=enc.smoke)
    art = M.art_fid(lpips_mean, fid)
    return {"fid": fid.value, "fid_std": math.nan, "kid": kid.value, "kid_std": kid.std, "art_fid": art.value,
            "art_fid_std": math.nan, "fid_n": fid.n, "fid_n_ref": fid.n_ref,
            "kid_subset_size": min(e.kid_subset, kid.n, kid.n_ref), "_smoke": fid.smoke or kid.smoke}


def reference_set_features(inputs, nets) -> dict[str, np.ndarray | None]:
    """Inception features of each style's non-degenerate reference images (None when none is usable)."""
    out = {}
    for style, paths in inputs.references.items():
        keep = [p for p in paths if M.is_degenerate(p) is None]
        out[style] = M.encode_images(keep, nets.inception, cache=nets.feature_cache) if keep else None
    return out


def aggregate(rows: list[dict], inputs, nets, cfg, *, set_metrics: bool = True) -> pd.DataFrame:
    """One row per (model, style, strength, scale): means/stds of per-image metrics, FID/KID/ArtFID, cost."""
    e = cfg.eval
    styles = {s.name: s for s in inputs.styles}
    refs = reference_set_features(inputs, nets) if set_metrics else {}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["style"], r["strength"], r["style_scale"])].append(r)
    table = []
    for (model, style, strength, scale), group in groups.items():
        row = {"model": model, "method": group[0]["method"], "style": style, "strength": strength,
               "style_scale": scale, "steps": e.steps, "seed": e.seed, "base_model": cfg.model.ref}
        smoke = False
        for m in PAIR_METRICS:
            vals = [r["_results"].get(m, M.MetricResult(m, math.nan)) for r in group]
            s = M.summarize(vals)
            row[m], row[f"{m}_std"], smoke = s.mean, s.std, smoke or s.smoke
        row["n_images"] = len(group)
        row["n_flagged"] = sum(1 for r in group if r["flag"])
        if set_metrics:
            kept = [r for r in group if not r["flag"]]
            sm = _set_metrics(kept, refs.get(style), nets, e, row["lpips"])
            set_smoke = sm.pop("_smoke")
            smoke = smoke or set_smoke
            row |= sm
        row |= cost_columns(group, styles.get(model))
        row["n_references"] = len(inputs.references.get(style, []))
        row["smoke"] = smoke
        table.append(row)
    return pd.DataFrame(table)
