"""Add-ons: ControlNet structure guidance and the IP-Adapter for style images, from local files or the Hub.

A request's local files (`controlnet`, `ip_adapter` + `image_encoder`: Kaggle inputs with Internet off) are checked
by `local_addons` before the base model loads (customgen.models.addons) and loaded once per session. Without them,
real models use lllyasviel's SD v1.5 ControlNets and h94/IP-Adapter from the Hugging Face Hub (one actionable line
when they cannot be had), and the reserved `tiny` model gets seeded random tiny versions built here, so the same
code paths run offline in tests; their outputs mean nothing.
"""
from __future__ import annotations

import contextlib

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline
from huggingface_hub import snapshot_download
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, pipeline

from customgen.errors import UserError
from customgen.inference.images import canny_edges
from customgen.inference.session import quiet_diffusers
from customgen.memory import seeded
from customgen.models import build_reserved
from customgen.models.addons import (ControlNetFile, IPAdapterFile, controlnet_file, ip_adapter_file,
                                     load_controlnet_file, load_ip_adapter_file)
from customgen.models.loading import hub_cached, hub_reachable
from customgen.models.weightfile import family

CONTROLNETS = {"canny": "lllyasviel/control_v11p_sd15_canny", "depth": "lllyasviel/control_v11f1p_sd15_depth"}
DEPTH_ESTIMATOR = "depth-anything/Depth-Anything-V2-Small-hf"
IP_ADAPTER = ("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", "models/image_encoder")
# InstantStyle (Wang et al. 2024) for SD v1.5: inject the image only into up_blocks.1, the style block.
STYLE_BLOCKS = {"up": {"block_1": 1.0}}
TINY_SEED = 1234
UNREACHABLE = ("{what} needs {repo} from the Hugging Face Hub, which is not cached here and cannot be reached: "
               "turn on Internet (Kaggle: notebook settings → Internet) or run once online to cache it{local}{alt}")


def _is_tiny(session) -> bool:
    return session.comps.kind == "tiny"


def _hub_kwargs(repo: str, what: str, alt: str = "", local: str = "") -> dict:
    """local_files_only when cached and offline; one actionable line when neither cached nor reachable."""
    online = hub_reachable()
    if not online and not hub_cached(repo):
        local = f"; or pass the weights as a local file ({local})" if local else ""
        raise UserError(UNREACHABLE.format(what=what, repo=repo, alt=alt, local=local))
    return {"local_files_only": not online}


def local_addons(req) -> tuple[ControlNetFile | None, IPAdapterFile | None]:
    """The request's local ControlNet and IP-Adapter, checked against the base model's family before it loads
    (already checked ones pass through: the demo checks its files once)."""
    net, ip = req.controlnet, req.ip_adapter
    if net is None and ip is None:
        return None, None
    fam = family(req.model)
    if net is not None and not isinstance(net, ControlNetFile):
        net = controlnet_file(net, fam)
    if ip is not None and not isinstance(ip, IPAdapterFile):
        ip = ip_adapter_file(ip, req.image_encoder, fam)
    return net, ip


def _placed(module, unet):
    """`module` on the UNet's device and dtype (a no-op dtype .to() still warns)."""
    module.to(unet.device)
    return module if module.dtype == unet.dtype else module.to(unet.dtype)


def _same_width(source, width: int, unet) -> None:
    """A local add-on was checked against the family; a base model of another width (an SD 2 model) is refused here."""
    if width != unet.config.cross_attention_dim:
        raise UserError(f"{source} has cross-attention width {width}, this base model's UNet "
                        f"{unet.config.cross_attention_dim}: use an add-on made for this base model")


# --- ControlNet ---------------------------------------------------------------------------------------
def tiny_controlnet(unet):
    """A ControlNet copied from the tiny UNet, its zero convolutions randomised (seeded) so control has an effect."""
    with seeded(TINY_SEED):
        net = ControlNetModel.from_unet(build_reserved("tiny").unet)  # a fresh copy: ours may carry LoRA layers
        zero_convs = [net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks, net.controlnet_mid_block]
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.05)
    return _placed(net, unet)


def controlnet_key(structure: str, source: ControlNetFile | None) -> str:
    """The session's key of a ControlNet: the Hub's (or tiny's) per structure, a local one per path."""
    return f"controlnet-{structure}" if source is None else f"controlnet:{source.path}"


def load_controlnet(session, structure: str, source: ControlNetFile | None = None):
    """The ControlNet for `structure` (canny | depth): the local one when given, loaded once per session."""
    if structure not in CONTROLNETS:
        raise UserError(f"unknown structure {structure!r}; choose from {', '.join(CONTROLNETS)}")
    key = controlnet_key(structure, source)
    if key not in session.extra:
        unet = session.comps.unet
        if source is not None:
            with quiet_diffusers():
                net = load_controlnet_file(source)
            _same_width(source, net.config.cross_attention_dim, unet)
            session.extra[key] = _placed(net, unet)
        elif _is_tiny(session):
            session.extra[key] = tiny_controlnet(unet)
        else:
            repo = CONTROLNETS[structure]
            kwargs = _hub_kwargs(repo, f"--structure {structure}", "; or leave out --structure", "--controlnet PATH")
            with quiet_diffusers():
                session.extra[key] = ControlNetModel.from_pretrained(repo, dtype=unet.dtype, **kwargs).to(unet.device)
    return session.extra[key]


def controlnet_pipeline(session, structure: str, source: ControlNetFile | None = None):
    """StableDiffusionControlNetImg2ImgPipeline sharing the session's modules (built once per ControlNet)."""
    c = session.comps

    def build():
        return StableDiffusionControlNetImg2ImgPipeline(
            vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
            controlnet=load_controlnet(session, structure, source), scheduler=c.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    return session.pipeline(f"img2img-{controlnet_key(structure, source)}", build)


def depth_map(session, img: Image.Image) -> Image.Image:
    """Monocular depth (Depth Anything V2 small, via transformers) as a 3-channel image at img's size."""
    if "depth-estimator" not in session.extra:
        kwargs = _hub_kwargs(DEPTH_ESTIMATOR, "--structure depth", "; or use --structure canny")
        session.extra["depth-estimator"] = pipeline(
            "depth-estimation", model=DEPTH_ESTIMATOR, device=session.comps.unet.device,
            model_kwargs={"local_files_only": kwargs["local_files_only"]})
    depth = session.extra["depth-estimator"](img)["depth"].convert("L").resize(img.size)
    return Image.merge("RGB", [depth] * 3)


def control_image(session, structure: str, img: Image.Image) -> Image.Image:
    """The conditioning image for `structure`, computed from the working-size content."""
    if structure == "canny":
        return canny_edges(img)
    if structure == "depth":
        if _is_tiny(session):
            raise UserError("--structure depth needs a depth estimator; the tiny test model has none (use canny)")
        return depth_map(session, img)
    raise UserError(f"unknown structure {structure!r}; choose from {', '.join(CONTROLNETS)}")


# --- IP-Adapter ---------------------------------------------------------------------------------------
def tiny_ip_adapter(unet) -> tuple[dict, object, object]:
    """A seeded random IP-Adapter (state dict, CLIP vision encoder, processor) shaped for the tiny UNet."""
    cad, channels = unet.config.cross_attention_dim, list(unet.config.block_out_channels)
    with seeded(TINY_SEED):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=32)).eval()
        state = {"image_proj": {"proj.weight": torch.randn(cad * 4, 32) * 0.2, "proj.bias": torch.zeros(cad * 4),
                                "norm.weight": torch.ones(cad), "norm.bias": torch.zeros(cad)}, "ip_adapter": {}}
        cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        for i, name in enumerate(cross):  # the IP-Adapter numbers cross-attention layers 1, 3, 5, ...
            block = int(name.split(".")[1]) if not name.startswith("mid") else -1
            width = channels[-1] if block < 0 else (channels[::-1] if name.startswith("up") else channels)[block]
            for part in ("to_k_ip", "to_v_ip"):
                state["ip_adapter"][f"{2 * i + 1}.{part}.weight"] = torch.randn(width, cad) * 0.3
    return state, encoder, CLIPImageProcessor(size=32, crop_size=32)


def hub_ip_adapter(unet) -> tuple[dict, object, object]:
    """h94/IP-Adapter for SD v1.5 (ViT-H image encoder) from the Hub or the local cache."""
    repo, weights, encoder_dir = IP_ADAPTER
    if unet.config.cross_attention_dim != 768:
        raise UserError("--style-image with the IP-Adapter needs an SD v1.5 model (cross-attention width 768)")
    kwargs = _hub_kwargs(repo, "--style-image (IP-Adapter)", "; or use --style-image-mode nearest",
                         "--ip-adapter FILE")
    root = snapshot_download(repo, allow_patterns=[weights, f"{encoder_dir}/*"], **kwargs)
    flat = load_file(f"{root}/{weights}")
    state = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
             for part in ("image_proj", "ip_adapter")}
    encoder = CLIPVisionModelWithProjection.from_pretrained(f"{root}/{encoder_dir}", dtype=unet.dtype)
    return state, encoder, CLIPImageProcessor()


def ip_adapter_weights(session, source: IPAdapterFile | None = None) -> tuple[dict, object, object]:
    """The IP-Adapter (state dict, image encoder, processor) on the UNet's device and dtype, loaded once: the local
    file when given, else the Hub's (tiny: a seeded random one)."""
    key = "ip-adapter" if source is None else f"ip-adapter:{source.path}:{source.encoder}"
    if key not in session.extra:
        unet = session.comps.unet
        if source is not None:
            with quiet_diffusers():
                state, encoder, processor = load_ip_adapter_file(source)
            _same_width(source, state["ip_adapter"]["1.to_k_ip.weight"].shape[1], unet)
        else:
            state, encoder, processor = (tiny_ip_adapter if _is_tiny(session) else hub_ip_adapter)(unet)
        state = {part: {k: v.to(unet.device, unet.dtype) for k, v in d.items()} for part, d in state.items()}
        session.extra[key] = (state, _placed(encoder, unet), processor)
    return session.extra[key]


@contextlib.contextmanager
def ip_adapter(session, pipe, scale: float, source: IPAdapterFile | None = None):
    """IP-Adapter loaded into `pipe` for one call, style blocks only (InstantStyle); unloaded afterwards."""
    state, encoder, processor = ip_adapter_weights(session, source)
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    with quiet_diffusers():
        pipe.load_ip_adapter(state, subfolder=None, weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale({part: {b: s * scale for b, s in blocks.items()} for part, blocks in STYLE_BLOCKS.items()})
    try:
        yield
    finally:
        pipe.unload_ip_adapter()  # restores the plain attention processors: later calls are unaffected
        pipe.register_modules(image_encoder=None, feature_extractor=None)


def ip_adapter_available(session, source: IPAdapterFile | None = None) -> bool:
    """Whether the IP-Adapter can be had without error (a local file or tiny: always; else cached or Hub
    reachable)."""
    if source is not None or _is_tiny(session) or "ip-adapter" in session.extra:
        return True
    return session.comps.unet.config.cross_attention_dim == 768 and (hub_cached(IP_ADAPTER[0]) or hub_reachable())

