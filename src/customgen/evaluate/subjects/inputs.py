"""What a subject evaluation runs on: each subject's steps (its snapshots and the final artifact), its prompts and
class prompt, and its instance photos.

- Steps: every complete snapshot (`<artifact>/snapshots/step-NNNNNN`, customgen.kinds.list_snapshots) and the
  final artifact, by the optimizer step their manifest records (a snapshot at the final step is the final one).
- Token and class: the manifest's token; the class noun from `eval.class_noun`, else the manifest's class prompt
  (`a photo of dog` → dog), else the config.yaml's prompt.class_prompt, else the word after the token in the
  instance prompt (`a photo of sks person` → person).
- Prompts: `eval.prompts` (templates with {token} and {noun}), else the set `eval.subject_prompts`.
- Instance photos: `eval.instance_root`, else `data.root` (with its layout) of the config.yaml training saved beside
  the artifact; images with a shorter side below eval.min_size (else the training's data.min_size) are skipped; at
  most eval.max_references of them (seeded).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from customgen.data.select import sample_paths
from customgen.errors import UserError
from customgen.evaluate.inputs import _scan, artifact_config
from customgen.evaluate.subjects.prompts import CLASS_PROMPT, class_noun, fill, prompt_templates
from customgen.kinds import Manifest, list_snapshots, read_manifest

_STEP = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class SubjectStep:
    """One set of weights of a subject: the final artifact or a snapshot, at its optimizer step."""

    step: int
    folder: Path
    manifest: Manifest

    @property
    def identity(self) -> str:
        """What made these weights (name, step, creation time): an image of other weights is never reused."""
        return f"{self.manifest.name}:{self.step}:{self.manifest.created}"


@dataclass
class Subject:
    """One subject artifact under evaluation."""

    name: str  # library (folder) name
    folder: Path
    manifest: Manifest
    token: str  # the rare token ("" when the manifest has none)
    noun: str  # its class, e.g. dog
    prompts: tuple[str, ...]  # filled prompts (with the token)
    class_prompt: str  # the PRES prompt, e.g. a photo of dog
    instances: list[Path]
    steps: list[SubjectStep] = field(default_factory=list)  # by step, the final artifact last


def step_of(folder: Path, manifest: Manifest, *, final: bool) -> int:
    """The optimizer step of an artifact: its manifest's `step`; older manifests: `steps` (final) or the folder."""
    if manifest.step:
        return int(manifest.step)
    match = _STEP.search(folder.name)
    return int(match[1]) if match and not final else int(manifest.steps)


def subject_steps(style) -> list[SubjectStep]:
    """The snapshots and the final artifact of a subject, by step (the final one wins a shared step)."""
    steps = {}
    for folder in list_snapshots(style.folder):
        manifest = read_manifest(folder)
        steps[step_of(folder, manifest, final=False)] = SubjectStep(0, folder, manifest)
    steps[step_of(style.folder, style.manifest, final=True)] = SubjectStep(0, style.folder, style.manifest)
    return [SubjectStep(k, s.folder, s.manifest) for k, s in sorted(steps.items())]


def instance_photos(style, e, data: dict) -> list[Path]:
    """The subject's real photos (module docstring), each problem as one line naming the key to set."""
    root = e.instance_root or (data.get("data") or {}).get("root") or ""
    if not root:
        raise UserError(f"subject {style.name}: no instance photos (its config.yaml names no data.root); "
                        "set eval.instance_root to the folder of its photos")
    key = "eval.instance_root" if e.instance_root else f"data.root of {style.folder / 'config.yaml'}"
    layout = "folder" if e.instance_root else (data.get("data") or {}).get("layout") or "folder"
    min_size = e.min_size if e.min_size is not None else (data.get("data") or {}).get("min_size")
    if not Path(root).expanduser().is_dir():
        raise UserError(f"subject {style.name}: instance photos folder {root} ({key}) does not exist; "
                        "set eval.instance_root to the folder of its photos")
    paths = [r.path for r in _scan(str(root), layout=layout, min_size=min_size, key=key)]
    if not paths:
        raise UserError(f"subject {style.name}: no usable instance photos in {root} ({key}); "
                        "check the folder or lower eval.min_size")
    return [Path(p) for p in sample_paths(paths, e.max_references, f"{e.seed}:{style.name}")]


def resolve_subject(style, e) -> Subject:
    """One library artifact → Subject (steps, prompts, instance photos)."""
    data = artifact_config(style.folder)
    m = style.manifest
    trained_class = str((data.get("prompt") or {}).get("class_prompt") or "")
    noun = e.class_noun or class_noun(class_prompt=m.class_prompt or trained_class, instance_prompt=m.prompt,
                                      token=m.token)
    if not noun:
        raise UserError(f"subject {style.name}: cannot tell its class (no class prompt; instance prompt "
                        f"{m.prompt!r}); set eval.class_noun, e.g. dog")
    templates = list(e.prompts) or prompt_templates(e.subject_prompts, noun)
    prompts = tuple(dict.fromkeys(fill(t, token=m.token, noun=noun) for t in templates))
    own_class = m.class_prompt or trained_class
    class_prompt = own_class if own_class and not e.class_noun else fill(CLASS_PROMPT, token="", noun=noun)
    return Subject(style.name, style.folder, m, m.token, noun, prompts, class_prompt,
                   instance_photos(style, e, data), subject_steps(style))


def resolve_subjects(cfg, styles: list) -> list[Subject]:
    """The library's subject artifacts → Subjects, every problem reported before anything is generated."""
    return [resolve_subject(s, cfg.eval) for s in styles]
