"""Write the model configs shipped in src/customgen/models/configs/ (run once; the output is committed).

`tiny`: an SD v1.5-shaped model small enough for CPU tests (byte-level CLIP tokenizer, 514 tokens).
`sd15-random`: the SD v1.5 architecture (configs as published with stable-diffusion-v1-5); its
tokenizer is rebuilt at load time from the CLIP BPE file that open_clip ships (see models/tokenizer.py).
"""
import json
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode

ROOT = Path(__file__).resolve().parents[1] / "src" / "customgen" / "models" / "configs"

SCHEDULER = {  # SD v1.5's scheduler_config.json (PNDM for inference, same betas for DDPM training)
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}

SD15 = {
    "unet": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "layer_norm_eps": 1e-05,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "initializer_factor": 1.0,
        "initializer_range": 0.02, "attention_dropout": 0.0, "dropout": 0.0,
    },
}

TINY_VOCAB = [*bytes_to_unicode().values()]
TINY_VOCAB = TINY_VOCAB + [t + "</w>" for t in TINY_VOCAB] + ["<|startoftext|>", "<|endoftext|>"]

TINY = {
    "unet": {
        **SD15["unet"], "attention_head_dim": 4, "block_out_channels": [32, 64], "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "layers_per_block": 1,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "sample_size": 8,
    },
    "vae": {
        **SD15["vae"], "block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "sample_size": 64,
    },
    "text_encoder": {
        **SD15["text_encoder"], "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
        "num_hidden_layers": 2, "vocab_size": len(TINY_VOCAB), "projection_dim": 32,
        "bos_token_id": len(TINY_VOCAB) - 2, "eos_token_id": len(TINY_VOCAB) - 1, "pad_token_id": len(TINY_VOCAB) - 1,
    },
}

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>", "errors": "replace",
}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    for name, cfg in {"tiny": TINY, "sd15": SD15}.items():
        d = ROOT / name
        write(d / "unet" / "config.json", cfg["unet"])
        write(d / "vae" / "config.json", cfg["vae"])
        write(d / "text_encoder" / "config.json", cfg["text_encoder"])
        write(d / "scheduler" / "scheduler_config.json", SCHEDULER)
    tok = ROOT / "tiny" / "tokenizer"
    write(tok / "vocab.json", {t: i for i, t in enumerate(TINY_VOCAB)})
    (tok / "merges.txt").write_text("#version: 0.2\n")
    write(tok / "tokenizer_config.json", TOKENIZER_CONFIG)


if __name__ == "__main__":
    main()
