"""Subject metrics for generated images: per-image rows, then one row per subject and step (mean and std per metric,
cost).

Every image is loaded and checked once; its DINO and CLIP features are computed once (in batches, cached by the
sha1 of its bytes under eval.output/features, so a re-run computes nothing it has seen), as are the instance photos'
and each prompt's CLIP text feature. DIV runs LPIPS once per image within its prompt's batch. Degenerate images
(black, NaN, constant) keep their row with a `flag` and are left out of every mean.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pandas as pd

from customgen import metrics as M
from customgen.evaluate.generate import BASELINE
from customgen.evaluate.score import cost_columns
from customgen.evaluate.subjects.generate import Shot, points_of

IMAGE_METRICS = ("dino", "clip_i", "clip_t")  # per image; PRES is DINO on the class-prompt images
BATCH = 16  # images per network call


def features(paths: list, encoder, nets, flags: dict) -> dict:
    """path → feature (D,) of every non-NaN image, computed once per image (cached)."""
    ok = [p for p in paths if flags[p] != "nan"]
    feats = M.encode_images(ok, encoder, cache=nets.feature_cache, batch_size=BATCH) if ok else []
    return dict(zip(ok, feats))


def image_features(samples, subjects, nets) -> dict:
    """Flags, DINO and CLIP features of every generated image and instance photo; CLIP text features of the
    prompts with each subject's token removed."""
    paths = list(dict.fromkeys([str(s.path) for s in samples] + [str(p) for x in subjects for p in x.instances]))
    flags = {p: M.is_degenerate(p) for p in paths}
    texts = sorted({M.fidelity_prompt(p, x.token) for x in subjects for p in x.prompts})
    return {"flags": flags, "dino": features(paths, nets.dino, nets, flags),
            "clip": features(paths, nets.clip, nets, flags),
            "text": dict(zip(texts, nets.clip.encode_text(texts))) if texts else {}}


def _row(subject, sample, role: str, f: dict, refs: dict, nets) -> dict:
    """One image's row: identity to the subject's instances (`refs`: their features (M, D) per network), fidelity
    to its prompt (prompt images only)."""
    path, flag = str(sample.path), f["flags"][str(sample.path)]
    res = {"dino": M.similarity_result("dino", f["dino"].get(path), refs["dino"], smoke=nets.dino.smoke, flag=flag),
           "clip_i": M.similarity_result("clip_i", f["clip"].get(path), refs["clip"], smoke=nets.clip.smoke,
                                         flag=flag)}
    if role == "prompt":
        text = f["text"][M.fidelity_prompt(sample.shot.prompt, subject.token)][None]  # (1, D)
        res["clip_t"] = M.similarity_result("clip_t", f["clip"].get(path), text, smoke=nets.clip.smoke, flag=flag)
    point = sample.shot.point
    return {"subject": subject.name, "model": point.model, "step": point.step, "role": role,
            "prompt": sample.shot.prompt, "index": sample.index, "output": path, "flag": flag,
            "seconds": sample.seconds, "peak_memory_bytes": sample.peak_memory_bytes, "reused": sample.reused,
            "_results": res}


def image_rows(subjects, samples, nets) -> list[dict]:
    """Per-image rows of every subject: its steps and the baseline, on its prompts and its class prompt."""
    f = image_features(samples, subjects, nets)
    by_shot = defaultdict(list)
    for s in samples:
        by_shot[s.shot].append(s)
    rows = []
    for subject in subjects:
        refs = {k: np.stack([f[k][str(p)] for p in subject.instances]) for k in ("dino", "clip")}  # (M, D) each
        for point in points_of(subject):
            for prompt, role in [(p, "prompt") for p in subject.prompts] + [(subject.class_prompt, "class")]:
                rows += [_row(subject, s, role, f, refs, nets) for s in by_shot[Shot(point, prompt)]]
    return rows


def per_image_table(rows: list[dict]) -> pd.DataFrame:
    """The per-image rows as a DataFrame: one column per metric (nan where it does not apply), plus `smoke`."""
    flat = [{k: v for k, v in r.items() if k != "_results"}
            | {m: float(r["_results"][m]) if m in r["_results"] else math.nan for m in IMAGE_METRICS}
            | {"smoke": any(x.smoke for x in r["_results"].values())} for r in rows]
    return pd.DataFrame(flat)


def diversity(group: list[dict], nets, lpips_net: str, memo: dict) -> M.MetricResult:
    """DIV of one prompt's batch (memoised by its images: the baseline's batches serve several subjects)."""
    key = tuple(r["output"] for r in group)
    if key not in memo:
        memo[key] = M.div(list(key), net=nets.lpips(lpips_net), batch_size=BATCH)
    return memo[key]


def _summary(values, name: str) -> dict:
    s = M.summarize(values)
    return {name: s.mean, f"{name}_std": s.std, "_smoke": s.smoke}


def aggregate_one(subject, group: list[dict], weights, nets, cfg, memo: dict) -> dict:
    """One subject × step row: means and stds of DINO, CLIP-I, CLIP-T (prompt images), DIV (over prompts), PRES
    (DINO of the class-prompt images), cost."""
    e = cfg.eval
    prompt_rows = [r for r in group if r["role"] == "prompt"]
    class_rows = [r for r in group if r["role"] == "class"]
    batches = defaultdict(list)
    for r in prompt_rows:
        batches[r["prompt"]].append(r)
    parts = [_summary([r["_results"][m] for r in prompt_rows], m) for m in IMAGE_METRICS]
    parts.append(_summary([diversity(b, nets, e.lpips_net, memo) for b in batches.values()], "div"))
    parts.append(_summary([M.MetricResult("pres", float(r["_results"]["dino"]), smoke=nets.dino.smoke, flag=r["flag"])
                           for r in class_rows], "pres"))
    where = "" if weights is None else weights.folder.relative_to(subject.folder).as_posix()  # "." or snapshots/...
    row = {"subject": subject.name, "model": group[0]["model"], "method": subject.manifest.method,
           "step": group[0]["step"], "weights": where,
           "base_model": cfg.model.ref, "sample_steps": e.steps, "seed": e.seed,
           "samples_per_prompt": e.samples_per_prompt, "n_prompts": len(batches), "n_images": len(group),
           "n_flagged": sum(1 for r in group if r["flag"]), "n_instances": len(subject.instances)}
    for p in parts:
        row |= {k: v for k, v in p.items() if k != "_smoke"}
    return row | cost_columns(group, weights) | {"smoke": any(p["_smoke"] for p in parts)}


def aggregate(subjects, rows: list[dict], nets, cfg) -> pd.DataFrame:
    """One row per subject and step (the baseline as step 0 of each subject)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["subject"], r["model"], r["step"])].append(r)
    memo: dict = {}
    table = []
    for subject in subjects:
        steps = {s.step: s for s in subject.steps}
        for point in points_of(subject):
            weights = None if point.model == BASELINE else steps[point.step]
            table.append(aggregate_one(subject, groups[(subject.name, point.model, point.step)], weights, nets, cfg,
                                       memo))
    return pd.DataFrame(table)
