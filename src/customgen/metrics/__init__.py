"""Evaluation metrics: CLIP-content/style, Style Strength, SSIM, LPIPS, FID/KID, ArtFID, cost; for subjects DINO,
CLIP-I, CLIP-T, DIV and PRES (DreamBooth's).

Every metric returns a ``MetricResult`` (value, sample sizes, ``smoke`` flag, degenerate-output flag);
``summarize`` averages rows while leaving flagged ones out. See docs/evaluation_metrics.md.
"""
from customgen.metrics.clip import clip_content, clip_result, clip_style, cosine_distance, style_strength
from customgen.memory import peak_memory
from customgen.metrics.cost import artifact_bytes, time_per_image
from customgen.metrics.dino_network import DINO_MODEL, DinoEncoder, build_dino_encoder
from customgen.metrics.distribution import art_fid, fid, fid_images, frechet_distance, kid, kid_images
from customgen.metrics.features import FeatureCache, ImageEncoder, encode_images
from customgen.metrics.images import image_digest, is_degenerate, load_image, to_array
from customgen.metrics.networks import (
    LpipsScorer, MetricNetworks, OpenClipEmbedder, SmokeCNN, build_clip_embedder, build_inception_encoder,
    build_lpips_scorer, get_default_networks, set_default_networks,
)
from customgen.metrics.perceptual import lpips, lpips_many, ssim, ssim_many
from customgen.metrics.result import MetricResult, Summary, summarize
from customgen.metrics.subject import (clip_i, clip_t, dino, div, fidelity_prompt, pairwise_distances, pres,
                                      similarity_result)

__all__ = [
    "clip_content", "clip_style", "clip_result", "style_strength", "ssim", "ssim_many", "lpips", "lpips_many",
    "fid", "kid", "art_fid",
    "fid_images", "kid_images", "frechet_distance", "cosine_distance",
    "time_per_image", "peak_memory", "artifact_bytes",
    "is_degenerate", "summarize", "MetricResult", "Summary",
    "FeatureCache", "ImageEncoder", "encode_images", "image_digest", "load_image", "to_array",
    "MetricNetworks", "get_default_networks", "set_default_networks",
    "OpenClipEmbedder", "LpipsScorer", "SmokeCNN",
    "build_clip_embedder", "build_lpips_scorer", "build_inception_encoder",
    "dino", "clip_i", "clip_t", "div", "pres", "fidelity_prompt", "similarity_result", "pairwise_distances",
    "DinoEncoder", "build_dino_encoder", "DINO_MODEL",
]
