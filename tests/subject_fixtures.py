"""Subject fixtures: a real tiny `dreambooth_lora_subject` artifact trained with customgen.train, with snapshots.

Until training writes snapshots itself (train.snapshot_every), each snapshot is a run of the same config stopped
at an earlier step, trained into <artifact>/snapshots/step-NNNNNN. The subject recipe uses a constant learning
rate and data order, noise and timesteps are functions of (seed, step), so a run of k steps ends with exactly
the weights the longer run has after step k: these are the intermediate weights, not look-alikes.
"""
from __future__ import annotations

from pathlib import Path

from customgen import kinds
from customgen.config import load_config
from customgen.kinds import snapshot_folder
from customgen.train import train
from tests.image_fixtures import make_instance_folder

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ["model.ref=tiny", "data.resolution=64", "data.min_size=32", "train.batch_size=1",
           "train.checkpoint_every=0", "train.validate_every=0", "validation.steps=2", "validation.num_images=1",
           "prompt.num_class_images=2", "prompt.class_steps=2", "train.lr=0.01", "lora.text_encoder_lr=0.01",
           "prompt.instance=a photo of sks dog", "prompt.class_prompt=a photo of dog",
           "validation.prompts=[a photo of sks dog]"]


def train_subject(folder: Path, photos: Path, *, steps: int = 3, snapshots=(1, 2), class_dir: Path) -> Path:
    """The subject trained for `steps` into `folder`, plus a snapshot at each step in `snapshots`."""
    base = SUBJECT + [f"data.root={photos}", f"prompt.class_dir={class_dir}"]
    cfg = load_config(ROOT / "configs" / "dreambooth_lora_subject.yaml", base + [f"train.steps={steps}"])
    train(cfg, output=folder, progress=False)
    for step in snapshots:
        snap = snapshot_folder(folder, step)
        cfg = load_config(ROOT / "configs" / "dreambooth_lora_subject.yaml", base + [f"train.steps={step}"])
        train(cfg, output=snap, progress=False)
        manifest = kinds.read_manifest(snap)
        manifest.steps = steps  # as a snapshot of the long run records it: its run's steps, its own step
        kinds.write_manifest(snap, manifest)
    return folder


_BUILT: dict[str, dict[str, Path]] = {}


def shared_subject_env(tmp_path_factory) -> dict[str, Path]:
    """Instance photos and a library holding one subject (final step 3, snapshots at 1 and 2), built once."""
    if "env" not in _BUILT:
        root = tmp_path_factory.mktemp("subject_env")
        photos = make_instance_folder(root / "photos", n=4, size=(72, 72))
        library = root / "library"
        train_subject(library / "sks_dog", photos, class_dir=root / "class_images")
        _BUILT["env"] = {"photos": photos, "library": library, "subject": library / "sks_dog"}
    return _BUILT["env"]
