"""Training: `train(config)` runs the one loop for any method and returns the artifact folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from customgen import artifacts
from customgen.errors import UserError

OWNED = ("checkpoints", "samples", "logs", "config.yaml", artifacts.MANIFEST, artifacts.LORA_WEIGHTS,
         artifacts.KOHYA_WEIGHTS, artifacts.TI_WEIGHTS, artifacts.DREAMBOOTH_WEIGHTS)


def prepare_output(out: Path, *, resume: str, overwrite: bool) -> None:
    """Refuse to replace a finished artifact unless --overwrite (which clears only files a run writes)."""
    if overwrite:
        for name in OWNED:
            p = out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    elif (out / artifacts.MANIFEST).exists():
        raise UserError(f"{out} already holds a trained artifact; pass --overwrite to retrain or choose another --output")
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    out.mkdir(parents=True, exist_ok=True)


def build_run(cfg, out: Path):
    """Components, method, data, optimizer and accelerator for `cfg` (see train.setup.Run)."""
    from customgen.memory import make_optimizer, plan_memory, probe
    from customgen.methods import make_method
    from customgen.models import load_components
    from customgen.models.loading import place
    from customgen.train import setup as S
    from customgen.train.data import ensure_class_images, image_set, training_records
    from customgen.train.perceptual import Perceptual

    torch.manual_seed(cfg.train.seed)  # adapter initialisation is seeded too
    method, info = make_method(cfg), probe(dtype=cfg.model.dtype)
    plan = plan_memory(cfg.train, info)
    acc = S.make_accelerator(cfg, out, method, plan)
    acc.print(plan.describe(info))
    records = training_records(cfg)
    comps = load_components(cfg.model.ref, device="cpu", dtype=torch.float32)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.mixed_precision, torch.float32)
    for m in (comps.unet, comps.vae, comps.text_encoder):
        place(m, acc.device, weight_dtype)
    classes = None
    if cfg.prompt.prior:  # the *base* model makes the class images, before any adapter exists
        folder = Path(cfg.prompt.class_dir or out / "class_images")
        ensure_class_images(comps, cfg, folder, is_main=acc.is_main_process)
        acc.wait_for_everyone()
        classes = image_set(ensure_class_images(comps, cfg, folder, is_main=False), cfg, comps.vae)
    images = image_set(records, cfg, comps.vae, cache_dir=cfg.train.latent_cache_dir)
    contents = S.content_set(cfg, comps.vae)
    groups = method.setup(comps)
    S.place_components(cfg, comps, acc, plan, method)
    acc.print(method_report(method, comps))
    perceptual = None
    if cfg.loss.lpips > 0 or cfg.loss.gram > 0:
        perceptual = Perceptual(cfg, S.style_pixels(images), acc.device)
    optimizer = make_optimizer(groups, plan, weight_decay=cfg.train.weight_decay)
    lr_scheduler = S.make_lr_scheduler(cfg, optimizer, acc.num_processes)
    unet, text_encoder, optimizer, lr_scheduler = prepare(acc, comps, optimizer, lr_scheduler)
    return S.Run(cfg=cfg, out=out, accelerator=acc, comps=comps, method=method, plan=plan, images=images,
                 classes=classes, contents=contents, unet=unet, text_encoder=text_encoder, optimizer=optimizer,
                 lr_scheduler=lr_scheduler, perceptual=perceptual, weight_dtype=weight_dtype)


def prepare(acc, comps, optimizer, lr_scheduler):
    """accelerate.prepare the modules that hold trainable parameters (DDP wraps only those)."""
    trains = lambda m: any(p.requires_grad for p in m.parameters())  # noqa: E731
    unet = acc.prepare(comps.unet) if trains(comps.unet) else comps.unet
    te = acc.prepare(comps.text_encoder) if trains(comps.text_encoder) else comps.text_encoder
    optimizer, lr_scheduler = acc.prepare(optimizer, lr_scheduler)
    return unet, te, optimizer, lr_scheduler


def method_report(method, comps) -> str:
    from customgen.freeze import parameter_report

    return f"method {method.name}: {method.trainable_count(comps):,} trainable parameters\n" + parameter_report(
        unet=comps.unet, text_encoder=comps.text_encoder)


def offload_unused(run) -> None:
    """Cache every fixed prompt, then move the VAE and text encoder off the GPU when nothing needs them."""
    from customgen.train.loop import encode_prompts

    if not run.method.trains_text_encoder:
        captions = {run.method.caption(run.images.dataset.caption_of(i), torch.Generator())
                    for i in range(len(run.images.dataset.records))}
        captions |= {run.cfg.prompt.class_prompt} if run.classes is not None else set()
        encode_prompts(run, sorted(captions))
        if run.accelerator.device.type == "cuda":
            run.comps.text_encoder.to("cpu")
    cached = run.images.latents is not None and (run.classes is None or run.classes.latents is not None)
    if cached and run.perceptual is None and run.contents is None and run.accelerator.device.type == "cuda":
        run.comps.vae.to("cpu")
        torch.cuda.empty_cache()


def finish(run, seconds: float, peak_bytes: int) -> Path:
    """Save weights, config, manifest and final samples (main process)."""
    from customgen.config import config_hash, save_config
    from customgen.train.validation import validate

    acc, cfg, out = run.accelerator, run.cfg, run.out
    acc.wait_for_everyone()
    if acc.is_main_process:
        fields = run.method.save(out, run.comps)
        save_config(cfg, out / "config.yaml")
        validate(run, cfg.train.steps)
        artifacts.write_manifest(out, artifacts.Manifest(
            name=out.name, method=cfg.method, kind=run.method.kind, base_model=cfg.model.ref,
            prompt=run.method.default_prompt(), class_prompt=cfg.prompt.class_prompt if cfg.prompt.prior else "",
            token=fields.pop("token", "") or _trigger(cfg), resolution=cfg.data.resolution, steps=cfg.train.steps,
            trainable_params=run.method.trainable_count(run.comps), train_seconds=round(seconds, 2),
            peak_memory_bytes=peak_bytes, config_hash=config_hash(cfg), **fields))
    acc.end_training()
    return out


def _trigger(cfg) -> str:
    """The trigger word of an instance prompt ('sks' in 'a photo of sks person'), if any."""
    rare = [w for w in cfg.prompt.instance.split() if w.lower() in ("sks", "ohwx", "zwx", "xyz")]
    return rare[0] if rare else ""


def train(cfg, *, output: str | Path | None = None, resume: str = "auto", overwrite: bool = False,
          progress: bool = True) -> Path:
    """Train `cfg.method` on `cfg.data` and return the artifact folder (see customgen.artifacts)."""
    from customgen.memory import peak_memory
    from customgen.train.loop import out_path, resume as resume_from, run_loop
    from customgen.train.validation import validate

    out = out_path(cfg, output)
    prepare_output(out, resume=resume, overwrite=overwrite)
    torch_state = torch.random.get_rng_state()
    try:
        run = build_run(cfg, out)
        run.accelerator.init_trackers("customgen")
        offload_unused(run)
        start = resume_from(run, resume)
        with peak_memory() as peak:
            stats = run_loop(run, start=start, progress=progress, validate=validate)
        return finish(run, stats["seconds"], peak["bytes"])
    finally:
        torch.random.set_rng_state(torch_state)  # the loop seeds per step; leave the caller's RNG as it was
