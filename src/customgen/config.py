"""Typed configs: dataclass defaults (each with a comment), YAML files of overrides, `--set k=v`.

Unknown keys and wrong types are errors naming the key. The resolved config is saved beside every
output (`save_config`), and its hash goes into manifests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from customgen.errors import UserError
from customgen.limits import check_limits
from customgen.request import DEFAULT_MODEL, DEFAULT_SCALE, DEFAULT_STRENGTH, DEFAULTS, Request

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet attention projections LoRA adapts (one constant)
# CLIP text-encoder modules a subject LoRA adapts: attention and MLP, what kohya's SD1 LoRA trains (72 modules)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
# What lora.type locon, loha and lokr add in the UNet's ResNet blocks and samplers (LyCORIS's ResnetBlock2D,
# Downsample2D and Upsample2D): the Linear and the 1×1 convolution take lora.rank, the 3×3 convolutions lora.conv_rank
RESNET_TARGETS = ("time_emb_proj", "conv_shortcut")
CONV_TARGETS = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")


@dataclasses.dataclass
class ModelConfig:
    ref: str = DEFAULT_MODEL  # Hub id, local diffusers folder, .safetensors file, tiny or sd15-random
    dtype: str | None = None  # fp32 | fp16 | bf16; None: bf16 where supported, fp16 on T4/P100, fp32 on CPU


@dataclasses.dataclass
class DataConfig:
    root: str = ""  # WikiArt root, COCO folder, instance-photo folder or kohya root
    layout: Literal["wikiart", "coco", "folder", "kohya"] = "wikiart"  # how data.root is organised
    style: str = ""  # WikiArt style folder to learn, e.g. Analytical_Cubism ("" for folder/kohya layouts)
    max_images: int = 100  # at most this many training images (seeded choice)
    resolution: int = 512  # training resolution: square crops of this side, or buckets of at most its square in pixels
    center_crop: bool = True  # center crop (False: random crop; turns train.cache_latents off, as kohya does)
    # Aspect-ratio buckets, kohya's sd-scripts' options (customgen.data.buckets; docs/training_guide.md "Buckets and
    # captions"): each image is trained whole at the bucket closest to its aspect ratio instead of a square crop
    buckets: bool = False  # kohya's enable_bucket (the style recipes turn it on)
    min_bucket: int = 256  # kohya's min_bucket_reso: shortest bucket side (a 128-px run sets 64)
    max_bucket: int = 1024  # kohya's max_bucket_reso: longest bucket side
    bucket_step: int = 64  # kohya's bucket_reso_steps: bucket sides are multiples of it (a multiple of 64)
    bucket_no_upscale: bool = False  # kohya's bucket_no_upscale: the bucket is the image's own size, shrunk to fit
    # Captions, kohya's options with kohya's meaning, seeded per example (exact under resume)
    caption_extension: Literal["", ".txt", ".caption"] = ""  # the sidecar caption file to read ("": either, .txt first)
    caption_dropout: float = 0.0  # kohya's caption_dropout_rate: an empty caption at this rate
    shuffle_caption: bool = False  # kohya's shuffle_caption: shuffle the comma-separated tags ...
    keep_tokens: int = 0  # ... except the first N, kept in place (kohya's keep_tokens)
    random_flip: bool | None = None  # horizontal flip; None: on for styles, off for subjects (a mirrored face differs)
    min_size: int = 64  # images with a shorter side below this are listed as small and skipped
    max_pixels: int = 89_478_485  # decompression-bomb cap (PIL's default limit)
    seed: int = 0  # seed of the image selection


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1500  # optimizer steps, each of grad_accum micro-batches (--max-steps N overrides)
    epochs: int = 0  # > 0: train N epochs, steps counted as kohya does (customgen.train.schedule), printed
    batch_size: int = 2  # images per micro-batch per GPU (prior preservation adds as many class images)
    # micro-batches per optimizer step (effective batch = batch_size × grad_accum × processes); None: 1, or what
    # memory auto splits batch_size into on a GPU that needs it (the same effective batch)
    grad_accum: int | None = None
    memory: Literal["auto", "manual"] = "auto"  # auto: on a GPU, the cheapest settings predicted to fit (customgen plan)
    lr: float = 1e-4  # learning rate of the trainable parameters
    lr_scheduler: str = "cosine"  # constant | linear | cosine | cosine_with_restarts | polynomial | constant_with_warmup
    warmup_steps: int = 0  # LR warm-up steps
    # auto: memory decides (8-bit Adam only where it works); adamw: torch's AdamW, fused on CUDA; prodigy: Prodigy
    # (prodigyopt), which estimates its step size: set train.lr=1.0 with it (docs/training_guide.md)
    optimizer: Literal["auto", "adamw", "adamw8bit", "prodigy"] = "auto"
    weight_decay: float = 1e-2  # decoupled weight decay (AdamW's and Prodigy's)
    max_grad_norm: float = 1.0  # gradient clipping (0: off)
    seed: int = 0  # seeds data order, noise and timesteps (stateless per step, so resume is exact)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 if supported, fp16 on T4/P100, none on CPU
    gradient_checkpointing: bool | None = None  # None: memory auto decides (manual: off)
    attention_slicing: bool = False  # UNet attention in slices (diffusers' SlicedAttnProcessor) instead of SDPA
    vae_slicing: bool = False  # the VAE encodes/decodes one image at a time (class images, latent cache, validation)
    vae_tiling: bool = False  # the VAE works in tiles: changes nothing up to its tile size (SD v1.5: 512 px)
    cache_latents: bool = True  # VAE-encode each image once (re-encoding dominates small datasets)
    latent_cache_dir: str = ""  # "" keeps the latent cache in memory
    checkpoint_every: int = 500  # steps between checkpoints (0: none)
    checkpoint_minutes: float = 30.0  # also checkpoint after this many minutes (Kaggle sessions end)
    keep_checkpoints: int = 2  # at most this many checkpoints are kept
    snapshot_every: int = 0  # steps between snapshots, whole artifacts in OUTPUT/snapshots/step-NNNNNN (0: none)
    keep_snapshots: int = 0  # at most this many snapshots are kept, the newest (0: all)
    validate_every: int = 500  # steps between validation images (0: only at the end)
    validate_every_epochs: int = 0  # also validation images every N epochs (see epochs; 0: none)
    log_every: int = 10  # steps between log rows
    output: str = "outputs/styles"  # artifacts go to OUTPUT/NAME unless --output names the folder


@dataclasses.dataclass
class LoraSettings:
    rank: int = 4  # LoRA rank r
    alpha: float | None = None  # LoRA alpha (None: = rank, i.e. scale 1)
    targets: list[str] = dataclasses.field(default_factory=lambda: list(LORA_TARGETS))  # adapted Linear layers
    text_encoder: bool = False  # also adapt the text encoder (subject LoRA)
    text_encoder_targets: list[str] = dataclasses.field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))  # its modules
    text_encoder_lr: float = 5e-5  # its own learning rate
    init: str = "gaussian"  # peft init_lora_weights of types lora/locon (B = 0 either way: step 0 is the base model)
    # lora: LoRA on the targets; locon: LoRA also on the ResNet blocks' layers and convolutions; loha: LoHa (Hadamard
    # product of two low-rank pairs); lokr: LoKr (Kronecker product), LyCORIS's algorithms trained through peft
    type: Literal["lora", "locon", "loha", "lokr"] = "lora"
    dora: bool = False  # DoRA (weight-decomposed LoRA, output axis: peft's use_dora) for types lora and locon
    conv_rank: int | None = None  # rank of the 3×3 convolutions (locon/loha/lokr; 0: none); None: = rank (LyCORIS)
    conv_alpha: float | None = None  # their alpha; None: = alpha (LyCORIS's conv_alpha default)


@dataclasses.dataclass
class PivotalConfig:
    # Pivotal tuning (diffusers' advanced DreamBooth-LoRA script, --train_text_encoder_ti; cloneofsimo's lora_pti): new
    # tokens <s0><s1>... in place of the trigger word, trained as text-encoder embeddings beside the LoRA
    tokens: int = 0  # how many new tokens (0: off); diffusers' --num_new_tokens_per_abstraction (2 there)
    trigger: str = "TOK"  # the word of prompt.instance the tokens replace (diffusers' --token_abstraction)
    init: str = "random"  # random: N(0, σ²), σ the table's std (diffusers); or a word: token i from its token i mod n
    lr: float = 5.0e-4  # the embeddings' learning rate (lora_pti's learning_rate_ti; the textual_inversion recipe's)
    frac: float = 0.5  # they train the first ⌈frac × train.steps⌉ optimizer steps (--train_text_encoder_ti_frac)


@dataclasses.dataclass
class LossConfig:
    l2: float = 1.0  # α: noise-prediction MSE
    lpips: float = 0.0  # β: LPIPS between decoded x0 prediction and its source image
    gram: float = 0.0  # γ: Gram-matrix style loss (VGG features, Gatys et al. 2016) against the style set
    lpips_net: Literal["vgg", "alex"] = "vgg"  # LPIPS backbone
    perceptual_every: int = 1  # run the decoder-based terms every N steps
    perceptual_max_timestep: int = 600  # ... only for timesteps below this (x0 is a blur at high t)
    decode_crop: int = 0  # decode a random latent crop of this size (0: whole latent)
    content_root: str = ""  # optional COCO content images: perceptual terms on content noised to content_strength
    content_strength: float = 0.6  # img2img strength the content pairs are noised to
    snr_gamma: float = 0.0  # Min-SNR weighting of the L2 term (0: off)
    noise_offset: float = 0.0  # noise + offset·N(0, 1) per image and latent channel (crosslabs 2023; 0: off)
    adaptive_noise_scale: float = 0.0  # kohya's: offset + this × |mean of each latent channel| (needs noise_offset)


@dataclasses.dataclass
class PromptConfig:
    instance: str = ""  # instance prompt ("" for prompt-free LoRA styles: one cached empty conditioning)
    class_prompt: str = ""  # prior-preservation class prompt, e.g. "a photo of person"
    prior: bool = False  # prior preservation (DreamBooth): adds class images to every batch
    prior_weight: float = 1.0  # weight of the prior term
    num_class_images: int = 100  # class images generated by the base model when missing
    class_dir: str = ""  # where class images live / are cached ("" → OUTPUT/class_images)
    class_steps: int = 25  # inference steps for generating class images


@dataclasses.dataclass
class DreamBoothConfig:
    scope: Literal["attention", "cross_attention", "full"] = "attention"  # which UNet parameters train


@dataclasses.dataclass
class TextualInversionConfig:
    token: str = "<style>"  # placeholder token added to the tokenizer
    init_word: str = "painting"  # its vectors start from this word's embedding
    num_vectors: int = 1  # vectors per token (token, token_1, ...)
    templates: Literal["style", "object"] = "style"  # prompt templates ("a painting in the style of {}")
    caption: str = ""  # one caption for every image instead, {} where the token goes, e.g. "{} painting"


@dataclasses.dataclass
class ValidationConfig:
    content: list[str] = dataclasses.field(default_factory=list)  # content images for img2img validation
    content_root: str = ""  # or the first num_images of this folder ("" for styles on Kaggle: COCO if attached)
    prompts: list[str] = dataclasses.field(default_factory=list)  # txt2img prompts (subjects)
    strength: float = DEFAULT_STRENGTH  # img2img strength of validation images
    steps: int = DEFAULTS.steps  # inference steps
    guidance: float = DEFAULTS.guidance  # classifier-free guidance scale
    num_images: int = 2  # images per validation prompt

    def request(self) -> Request:
        """The sampling request validation images are made with (checked)."""
        return Request(strength=self.strength, steps=self.steps, guidance=self.guidance).check()


@dataclasses.dataclass
class EvalConfig:
    styles: str = ""  # style library: a folder of artifacts (and loose style files), one artifact's folder, or a file
    methods: list[str] = dataclasses.field(default_factory=list)  # only these methods ([] = every style found)
    content_root: str = ""  # content images (COCO val2017 or any folder); or...
    content_paths: str = ""  # ... a content_paths.json from `customgen data scan`
    style_root: str = ""  # style reference images (WikiArt root: one folder per style); or...
    style_paths: str = ""  # ... a style_paths.json from `customgen data scan`
    # style name → its reference style (a style of style_root / style_paths) or a folder of reference images: what a
    # file from elsewhere, which names no data.style, is scored against ({}: matched by name, else content metrics only)
    references: dict[str, str] = dataclasses.field(default_factory=dict)
    max_contents: int = 20  # at most this many content images (seeded choice)
    max_references: int = 20  # at most this many reference images per style (seeded choice)
    min_size: int | None = None  # content/reference images with a shorter side below this are skipped (None: 256)
    output: str = "results/metrics"  # CSV/JSON/plots go here; stylized images under OUTPUT/images
    strength: float = DEFAULT_STRENGTH  # img2img strength for every method and the baseline
    style_scale: float = DEFAULT_SCALE  # adapter scale of kinds that have one (LoRA); others run at 1
    steps: int = DEFAULTS.steps  # inference steps
    guidance: float = DEFAULTS.guidance  # classifier-free guidance scale
    scheduler: str = DEFAULTS.scheduler  # dpm++ | ddim | euler | pndm | ddpm | lcm | tcd
    size: int = 512  # working resolution (short side); fixed so every method and the baseline match
    seed: int = 0  # the same seed for every method and the baseline
    cap_gib: float | None = None  # plan VAE slicing/tiling for this much GPU memory (None: the GPU in use)
    structure: str = ""  # ControlNet structure guidance for every point, the baseline too: "" (none) | canny | depth
    structure_scale: float = DEFAULTS.structure_scale  # ControlNet conditioning scale
    controlnet: str = ""  # a local ControlNet for eval.structure: diffusers folder or single file ("": the Hub's)
    ip_adapter: str = ""  # a local ip-adapter_sd15 file: adds an ip-adapter row per reference style ("": none)
    image_encoder: str = ""  # the IP-Adapter's image encoder folder ("": image_encoder/ beside the file)
    style_image_scale: float = DEFAULTS.style_image_scale  # IP-Adapter scale of the ip-adapter rows
    clip_model: str = "ViT-B-32"  # open_clip model for CLIP-content / CLIP-style
    clip_pretrained: str = "openai"  # open_clip weights tag (or a local checkpoint path)
    lpips_net: Literal["alex", "vgg"] = "alex"  # LPIPS backbone
    smoke: bool = False  # force random-weight metric networks (tests, `tiny`); rows are marked smoke anyway
    kid_subset: int = 50  # KID subset size (clipped to the sample size)
    sweep: bool = False  # also run the strength × style-scale trade-off sweep
    sweep_strengths: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.45, 0.6, 0.75])
    sweep_scales: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75, 1.0])
    # Subjects (artifacts whose recipe learns a subject): txt2img per training step, DreamBooth's metrics
    instance_root: str = ""  # instance photos of the subjects ("" → data.root of each artifact's config.yaml)
    subject_prompts: Literal["project", "dreambooth"] = "project"  # the project's 5 prompts, or DreamBooth's 25
    prompts: list[str] = dataclasses.field(default_factory=list)  # templates with {token}, {noun}; [] = the set
    class_noun: str = ""  # the subject's class ("" → from the manifest's class prompt, else its instance prompt)
    samples_per_prompt: int = 4  # images per prompt and step, one batch (DIV needs at least 2)
    dino_model: str = "facebook/dino-vits16"  # DINO ViT-S/16: Hub id or a local save_pretrained folder
    fidelity_margin: float = 0.02  # best step: its CLIP-T may fall at most this far below the baseline's

    def request(self, model: str, *, strength: float | None = None, scale: float | None = None,
                dtype: str | None = None) -> Request:
        """The sampling request of one evaluation point (strength and scale default to this config's)."""
        return Request(model=model, strength=self.strength if strength is None else strength,
                       scales=scale, steps=self.steps, guidance=self.guidance, scheduler=self.scheduler,
                       seed=self.seed, size=self.size, dtype=dtype, cap_gib=self.cap_gib,
                       structure=self.structure or None, structure_scale=self.structure_scale,
                       controlnet=self.controlnet or None)


@dataclasses.dataclass
class Config:
    """Root config: one section per concern."""

    name: str = ""  # artifact name ("" → derived from method and style)
    preset: str = ""  # the study this config reproduces (configs/studies/<preset>.yaml); recorded in style.json
    method: str = ""  # lora_style | dreambooth_style | textual_inversion | dreambooth_lora_subject | lora_anime_kohya
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)
    pivotal: PivotalConfig = dataclasses.field(default_factory=PivotalConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    dreambooth: DreamBoothConfig = dataclasses.field(default_factory=DreamBoothConfig)
    textual_inversion: TextualInversionConfig = dataclasses.field(default_factory=TextualInversionConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


SMOKE_OVERRIDES = (  # notebooks' SMOKE mode: a few tiny steps so every cell runs in seconds on a CPU
    "data.resolution=64", "data.min_size=32", "data.min_bucket=64", "data.max_images=8", "train.steps=2",
    "train.epochs=0", "train.batch_size=1", "train.checkpoint_every=0", "train.validate_every=0", "train.validate_every_epochs=0",
    "validation.steps=2", "prompt.num_class_images=2", "prompt.class_steps=2", "loss.perceptual_every=1",
    "loss.decode_crop=0", "eval.smoke=true", "eval.size=64", "eval.steps=4", "eval.min_size=32", "eval.max_contents=4",
    "eval.max_references=4",
)
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # configs/ of an editable install (Kaggle: the clone)
STUDIES = "studies"  # configs/studies/: presets that reproduce the source studies' settings


def find_config(name: str | Path) -> Path:
    """A config by path, or by name from the repository's configs/: a recipe (`lora_style` → configs/lora_style.yaml)
    or a study preset (`subject_report` → configs/studies/subject_report.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    folders = (REPO_CONFIGS, REPO_CONFIGS / STUDIES)
    found = [f / f"{path.stem}.yaml" for f in folders if (f / f"{path.stem}.yaml").is_file()]
    if found:
        return found[0]
    known = [f"{f}: {', '.join(sorted(p.stem for p in f.glob('*.yaml'))) or 'none found'}" for f in folders]
    raise UserError(f"no config {name!r}; recipes in {known[0]}; study presets in {known[1]}")


# --- checking -----------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; int→float and '1e-4'→float are the only conversions."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        if isinstance(value, bool):  # YAML 1.1 reads `no`/`off`/`yes`/`on` as booleans: `mixed_precision=no`
            value = next((a for a in args if str(a).lower() in (("yes", "on") if value else ("no", "off"))), value)
        if value not in args:
            raise UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, data: dict, prefix: str = ""):
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"unknown config key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}")
    return cls(**{k: _coerce(v, fields[k], prefix + k) for k, v in data.items()})


# --- loading and saving -------------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value parsed as YAML)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set(data: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {'.'.join(path)}: {part} is not a section")
        data = node
    data[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from `path` (one-line errors for missing or malformed files)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), **sets: Any) -> Config:
    """Defaults ← YAML file ← `--set` overrides ← keyword overrides like `model__ref="tiny"`; limits checked."""
    data = read_yaml(path) if path else {}
    for text in overrides:
        _set(data, *parse_override(text))
    for key, value in sets.items():
        _set(data, key.split("__"), value)
    return check_limits(_build(Config, data))


def to_dict(cfg) -> dict:
    """The config as plain data (for YAML/JSON)."""
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> Path:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def config_hash(cfg) -> str:
    """A short stable hash of the resolved config (goes into manifests)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
