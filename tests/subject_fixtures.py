"""Subject fixtures: a real tiny `dreambooth_lora_subject` artifact trained once with customgen.train, with the
snapshots training writes itself (train.snapshot_every=1: steps 1 and 2 of a 3-step run)."""
from __future__ import annotations

from pathlib import Path

from customgen import kinds
from customgen.config import load_config
from customgen.train import train
from tests.image_fixtures import make_instance_folder

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ["model.ref=tiny", "data.resolution=64", "data.min_size=32", "train.batch_size=1",
           "train.checkpoint_every=0", "train.validate_every=0", "validation.steps=2", "validation.num_images=1",
           "prompt.num_class_images=2", "prompt.class_steps=2", "train.lr=0.01", "lora.text_encoder_lr=0.01",
           "prompt.instance=a photo of sks dog", "prompt.class_prompt=a photo of dog",
           "validation.prompts=[a photo of sks dog]"]


def train_subject(folder: Path, photos: Path, *, steps: int = 3, class_dir: Path) -> Path:
    """The subject trained for `steps` into `folder`, a snapshot after every step before the last."""
    sets = SUBJECT + [f"data.root={photos}", f"prompt.class_dir={class_dir}", f"train.steps={steps}",
                      "train.snapshot_every=1"]
    train(load_config(ROOT / "configs" / "dreambooth_lora_subject.yaml", sets), output=folder, progress=False)
    assert [kinds.read_manifest(s).step for s in kinds.list_snapshots(folder)] == list(range(1, steps))
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
