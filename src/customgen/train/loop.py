"""The one training loop (encode → add noise → UNet → loss → step) for every method.

LoRA, DreamBooth and Textual Inversion differ only by their method object (a kind's training half,
customgen.kinds).
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import torch
from diffusers.training_utils import compute_snr
from tqdm.auto import tqdm

from customgen.config import config_hash, to_dict
from customgen.data.cache import randn_rows
from customgen.data.captions import CaptionRules
from customgen.errors import UserError
from customgen.memory import out_of_memory
from customgen.train.artifact import snapshot
from customgen.train.build import Run
from customgen.train.checkpoint import check_fits, checkpoints, load_latest, restore, save_checkpoint
from customgen.train.captions import CaptionLog
from customgen.train.data import batch_positions, flip_mask, sample_generators, sample_ids
from customgen.train.losses import combine, noise_l2, offset_noise
from customgen.train.schedule import group_steps, validation_steps

LOG_COLUMNS = ("step", "loss", "l2", "lpips", "gram", "prior", "lr", "sec_per_it")
# random streams of the examples (customgen.train.data.sample_generators): instance, class and content images, an
# instance image's random crop in its bucket, its caption's dropout and shuffle
INSTANCE, CLASS, CONTENT, CROP, CAPTION = 0, 1, 2, 3, 4


class TrainingDiverged(UserError):
    """The loss became NaN/inf: the run stops and keeps its last good checkpoint."""


def encode_prompts(run: Run, captions: list[str]) -> torch.Tensor:
    """Text embeddings (B, 77, D); cached per caption while the text encoder is frozen (shuffled captions are too many
    to keep: those are encoded each time)."""
    tok = run.comps.tokenizer
    ids = lambda texts: tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa: E731
                            return_tensors="pt").input_ids.to(run.accelerator.device)
    if run.method.trains_text_encoder:
        return run.text_encoder(ids(captions))[0]
    missing, new = sorted({c for c in captions if c not in run.prompt_cache}), {}
    if missing:
        with torch.no_grad():
            new = dict(zip(missing, run.comps.text_encoder(ids(missing))[0]))
        if not run.cfg.data.shuffle_caption:
            run.prompt_cache |= new
    return torch.stack([run.prompt_cache[c] if c in run.prompt_cache else new[c] for c in captions])


def offload_unused(run: Run) -> None:
    """Cache every fixed prompt, then (when the plan says so) move the VAE and text encoder off the GPU when
    nothing needs them (the text encoder stays for shuffled captions)."""
    if not run.method.trains_text_encoder:
        captions = {run.method.caption(run.images.dataset.caption_of(i), torch.Generator())
                    for i in range(len(run.images.dataset.records))}
        captions |= {run.cfg.prompt.class_prompt} if run.classes is not None else set()
        captions |= {""} if run.cfg.data.caption_dropout > 0 else set()
        encode_prompts(run, sorted(captions))
        if run.accelerator.device.type == "cuda" and run.plan.offload and not run.cfg.data.shuffle_caption:
            run.comps.text_encoder.to("cpu")
    cached = run.images.latents is not None and (run.classes is None or run.classes.latents is not None)
    if cached and run.perceptual is None and run.contents is None and run.accelerator.device.type == "cuda" \
            and run.plan.offload:
        run.comps.vae.to("cpu")
        torch.cuda.empty_cache()


def _target(run: Run, latents, noise, t):
    sched = run.comps.noise_scheduler
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(latents, noise, t)
    return noise


def _denoise(run: Run, latents: torch.Tensor, captions: list[str], generators: list[torch.Generator],
             t: torch.Tensor | None = None):
    """Noise the latents, predict with the UNet: (noisy, prediction, target, t); example i's timestep, noise and noise
    offset come from generators[i]."""
    sched = run.comps.noise_scheduler
    latents = latents.to(run.accelerator.device)
    if t is None:
        T = sched.config.num_train_timesteps
        t = torch.cat([torch.randint(0, T, (1,), generator=g) for g in generators]).to(latents.device)
    noise = randn_rows(generators, latents.shape[1:]).to(latents.device, latents.dtype)
    if run.cfg.loss.noise_offset:  # drawn after the noise: runs without an offset keep their noise
        noise = offset_noise(noise, latents, generators, offset=run.cfg.loss.noise_offset,
                             adaptive=run.cfg.loss.adaptive_noise_scale)
    noisy = sched.add_noise(latents, noise, t)
    cond = encode_prompts(run, captions)
    with run.accelerator.autocast():
        pred = run.unet(noisy.to(run.weight_dtype), t, cond.to(run.weight_dtype)).sample
    return noisy, pred, _target(run, latents, noise, t), t


def _weighted_l2(run: Run, pred, target, t) -> torch.Tensor:
    """Per-sample L2, Min-SNR weighted when loss.snr_gamma > 0 (Hang et al. 2023): min(SNR, γ)/SNR for
    ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction (as diffusers' training examples weight them)."""
    l2 = noise_l2(pred, target)
    if run.cfg.loss.snr_gamma > 0:
        snr = compute_snr(run.comps.noise_scheduler, t)
        v_pred = run.comps.noise_scheduler.config.prediction_type == "v_prediction"
        l2 = l2 * torch.clamp(snr, max=run.cfg.loss.snr_gamma) / (snr + 1 if v_pred else snr)
    return l2


def step_losses(run: Run, step: int) -> dict[str, torch.Tensor]:
    """Losses of micro-step `step`. Each example's flip, latent sample, crop, caption (template, dropout, shuffle),
    timestep and noise come from its own generators (seed, run-wide example index), the rest from the (seed, step,
    rank) seed. With buckets the micro-batch is one bucket's (customgen.train.data.bucket_epoch)."""
    cfg, acc = run.cfg, run.accelerator
    torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + acc.process_index)
    where = dict(step=step, batch_size=cfg.train.batch_size, rank=acc.process_index, world=acc.num_processes)
    chunk = cfg.train.batch_size * (cfg.train.grad_accum or 1) * acc.num_processes  # an optimizer step's examples
    pos = run.images.positions(seed=cfg.train.seed, chunk=chunk, **where)
    ids = sample_ids(**where)
    gens = sample_generators(cfg.train.seed, ids, stream=INSTANCE)
    crops = None if cfg.data.center_crop else sample_generators(cfg.train.seed, ids, stream=CROP)
    perceptual = run.perceptual is not None and run.perceptual.active(step) and run.contents is None
    batch = run.images.batch(pos, vae=run.comps.vae, flip=flip_mask(gens, on=cfg.data.random_flip), generators=gens,
                             need_pixels=perceptual and run.needs_pixels, crops=crops)
    captions = example_captions(run, step, batch, gens, ids)
    n_inst, parts = len(pos), [(batch["latents"], captions, gens)]
    if run.classes is not None:  # prior preservation: one class image per instance image
        parts.append(class_part(run, where))
    if len(parts) == 2 and parts[0][0].shape[1:] == parts[1][0].shape[1:]:  # one UNet call for both (square images)
        parts = [(torch.cat([parts[0][0], parts[1][0]]), parts[0][1] + parts[1][1], parts[0][2] + parts[1][2])]
    calls = [_denoise(run, *part) for part in parts]  # a non-square bucket's batch and the square class images: two
    l2 = torch.cat([_weighted_l2(run, pred, target, t) for _, pred, target, t in calls])
    noisy, pred, _, t = calls[0]
    terms = {}
    if perceptual:
        terms = run.perceptual.terms(run.comps.vae, noisy[:n_inst], pred[:n_inst], t[:n_inst],
                                     run.comps.noise_scheduler.alphas_cumprod, batch["pixels"])
    elif run.perceptual is not None and run.perceptual.active(step):
        terms = content_pair_terms(run, step, captions[:n_inst])
    prior = l2[n_inst:] if run.classes is not None else None
    return combine(l2=l2[:n_inst], weights=cfg.loss, lpips=terms.get("lpips"), gram=terms.get("gram"),
                   prior=prior, prior_weight=cfg.prompt.prior_weight)


def class_part(run: Run, where: dict) -> tuple[torch.Tensor, list[str], list[torch.Generator]]:
    """Latents, captions and generators of the class images of micro-step `where` (square: they stay as the base
    model made them)."""
    seed = run.cfg.train.seed
    cpos = batch_positions(len(run.classes), seed=seed + 1, **where)
    cgens = sample_generators(seed, sample_ids(**where), stream=CLASS)
    cb = run.classes.batch(cpos, vae=run.comps.vae, flip=flip_mask(cgens, on=False), need_pixels=False,
                           generators=cgens)
    return cb["latents"], cb["captions"], cgens


def example_captions(run: Run, step: int, batch: dict, gens: list[torch.Generator], ids: list[int]) -> list[str]:
    """The captions the examples train with: the method's (instance prompt, record caption, TI template), then kohya's
    dropout and shuffle from each example's CAPTION generator; the first steps' go to captions.jsonl."""
    captions = [run.method.caption(c, g) for c, g in zip(batch["captions"], gens)]
    rules = CaptionRules.of(run.cfg.data)
    if rules.active:
        captions = [rules.apply(c, g) for c, g in zip(captions, sample_generators(run.cfg.train.seed, ids,
                                                                                  stream=CAPTION))]
    if run.caption_log is not None:
        run.caption_log.add(step // (run.cfg.train.grad_accum or 1) + 1, batch["paths"], captions)
    return captions


def content_pair_terms(run: Run, step: int, captions: list[str]) -> dict:
    """Perceptual terms on content images noised to the img2img strength: LPIPS to content, Gram to style."""
    cfg, acc = run.cfg, run.accelerator
    where = dict(step=step, batch_size=len(captions), rank=acc.process_index, world=acc.num_processes)
    pos = batch_positions(len(run.contents), seed=cfg.train.seed + 2, **where)
    gens = sample_generators(cfg.train.seed, sample_ids(**where), stream=CONTENT)
    cb = run.contents.batch(pos, vae=run.comps.vae, flip=flip_mask(gens, on=False), need_pixels=True, generators=gens)
    T = run.comps.noise_scheduler.config.num_train_timesteps
    t = torch.full((len(pos),), min(T - 1, int(cfg.loss.content_strength * T)), device=acc.device)
    noisy, pred, _, t = _denoise(run, cb["latents"], captions, gens, t)
    return run.perceptual.terms(run.comps.vae, noisy, pred, t, run.comps.noise_scheduler.alphas_cumprod, cb["pixels"],
                                threshold=False)  # the strength sets t here


def optimizer_step(run: Run, step: int) -> dict[str, float]:
    """grad_accum micro-steps, clip, step; NaN/inf stops the run before any weight changes. A group with a `frac` key
    (pivotal tuning's embeddings) steps at lr 0 past its share of the steps: its weights stay exactly as they are."""
    cfg, acc = run.cfg, run.accelerator
    modules = [m for m in (run.unet, run.text_encoder) if any(p.requires_grad for p in m.parameters())]
    for group in run.optimizer.param_groups:  # set before every step: the LR scheduler rewrites each group's lr
        if "frac" in group and step >= group_steps(group["frac"], cfg.train.steps):
            group["lr"] = 0.0
    logs = {}
    for micro in range(cfg.train.grad_accum):
        with acc.accumulate(*modules):
            losses = step_losses(run, step * cfg.train.grad_accum + micro)
            if not torch.isfinite(losses["loss"]):
                last = checkpoints(run.out)
                raise TrainingDiverged(
                    f"loss became {losses['loss'].item()} at step {step}; last good checkpoint: "
                    f"{last[-1] if last else 'none'}; lower train.lr or use train.mixed_precision=no/bf16")
            acc.backward(losses["loss"])
            if acc.sync_gradients and cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], cfg.train.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        logs = {k: logs.get(k, 0.0) + float(v.detach()) / cfg.train.grad_accum for k, v in losses.items()}
    run.method.after_step(run.comps)
    return logs


class LossLog:
    """CSV (logs/loss.csv) + TensorBoard rows; on resume the CSV keeps the rows up to the resumed step (rows a
    killed run wrote after its last checkpoint are written again by the resumed run, not twice)."""

    def __init__(self, run: Run, start: int = 0):
        self.run, self.path = run, run.out / "logs" / "loss.csv"
        if run.accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_log(self.path, start)

    def write(self, step: int, logs: dict, sec_per_it: float) -> None:
        row = {"step": step, **{k: round(v, 6) for k, v in logs.items()}, "sec_per_it": round(sec_per_it, 4),
               "lr": self.run.lr_scheduler.get_last_lr()[0]}
        self.run.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self.run.accelerator.is_main_process:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, LOG_COLUMNS, extrasaction="ignore").writerow(row)


def truncate_log(path: Path, step: int) -> None:
    """Rewrite `path` (atomically) with its header and the rows of steps ≤ `step`; unparsable rows are dropped."""
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit() and int(r["step"]) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def checkpoint(run: Run, step: int) -> None:
    """Save checkpoint `step` (main process) and wait for everyone."""
    if run.accelerator.is_main_process:
        save_checkpoint(run.out, step=step, tensors=run.method.trained_params(run.comps), optimizer=run.optimizer,
                        lr_scheduler=run.lr_scheduler,
                        info={"config_hash": config_hash(run.cfg), "config": to_dict(run.cfg)},
                        keep=run.cfg.train.keep_checkpoints)
    run.accelerator.wait_for_everyone()


def resume(run: Run, how: str, *, force: bool = False) -> int:
    """Continue from a checkpoint (`auto`: the latest intact one, if any); returns the first step to run.
    A checkpoint of another config is refused unless `force` (customgen.train.checkpoint)."""
    ck = load_latest(run.out, how)
    if ck is None:
        return 0
    tensors = run.method.trained_params(run.comps)
    check_fits(ck, tensors, config=to_dict(run.cfg), config_hash=config_hash(run.cfg), force=force)
    restore(ck, tensors=tensors, optimizer=run.optimizer, lr_scheduler=run.lr_scheduler)
    run.accelerator.print(f"resumed from {ck.path} at step {ck.step}")
    return ck.step


def run_loop(run: Run, *, start: int, progress: bool = True, validate=None) -> dict:
    """Steps `start`..train.steps with logging, snapshots, checkpoints (every N steps / T minutes) and validation."""
    cfg = run.cfg
    log, t0 = LossLog(run, start), time.monotonic()
    run.caption_log = CaptionLog(run.out, start, main=run.accelerator.is_main_process)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not (progress and run.accelerator.is_local_main_process),
               desc="train")
    try:  # the bar is closed before an error propagates, so the error stays the last line of the output
        logs = steps(run, range(start, cfg.train.steps), bar, log, validate, t0=t0)
    finally:
        bar.close()
    return {"seconds": time.monotonic() - t0, "last": logs}


def steps(run: Run, todo: range, bar, log: LossLog, validate, *, t0: float) -> dict:
    """The loop body: optimizer steps, log rows, snapshots, checkpoints, validation images (`t0`: the loop's start);
    every count is of optimizer steps."""
    cfg, per_epoch = run.cfg, validation_steps(run.cfg, run.schedule)
    logs, tic, last_ckpt = {}, time.monotonic(), time.monotonic()
    for step in todo:
        try:
            logs = optimizer_step(run, step)
        except torch.cuda.OutOfMemoryError as err:
            raise out_of_memory(step, "training step", run.plan) from err
        done, sec = step + 1, time.monotonic() - tic
        tic = time.monotonic()
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", s_it=f"{sec:.2f}")
        if done % max(1, cfg.train.log_every) == 0 or done == cfg.train.steps:
            log.write(done, logs, sec)
        if cfg.train.snapshot_every and done % cfg.train.snapshot_every == 0 and done < cfg.train.steps:
            snapshot(run, done, seconds=time.monotonic() - t0)  # before the checkpoint: a kill between them loses none
        by_steps = cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0
        by_time = cfg.train.checkpoint_minutes > 0 and time.monotonic() - last_ckpt > 60 * cfg.train.checkpoint_minutes
        if (by_steps or by_time) and done < cfg.train.steps:
            checkpoint(run, done)
            last_ckpt = time.monotonic()
        by_steps = cfg.train.validate_every and done % cfg.train.validate_every == 0
        if validate and (by_steps or (per_epoch and done % per_epoch == 0)) and done < cfg.train.steps:
            try:
                validate(run, done)
            except torch.cuda.OutOfMemoryError as err:
                raise out_of_memory(done, "validation images", run.plan) from err
    return logs


def out_path(cfg, output: str | Path | None) -> Path:
    """The artifact folder: --output, else train.output/NAME."""
    if output:
        return Path(output)
    name = cfg.name or "-".join(x for x in (cfg.method, cfg.data.style or Path(cfg.data.root).name) if x)
    return Path(cfg.train.output) / name
