"""captions.jsonl in the run's folder: what the model was told in the first optimizer steps, one row per example
({"step", "image", "caption"}), so a user sees caption dropout and shuffling as trained (docs/training_guide.md)."""
from __future__ import annotations

import json
from pathlib import Path

CAPTION_FILE = "captions.jsonl"
CAPTION_STEPS = 100  # optimizer steps whose captions are written (the main process's examples)


class CaptionLog:
    """Rows of the first CAPTION_STEPS optimizer steps (1-based, as logs/loss.csv counts); a resumed run keeps the
    rows up to its checkpoint's step and writes the rest again (the same captions: they are seeded per example)."""

    def __init__(self, out: Path, start: int, *, main: bool = True):
        self.path, self.main = Path(out) / CAPTION_FILE, main
        if main and start < CAPTION_STEPS:
            self._truncate(start)

    def _truncate(self, step: int) -> None:
        """Keep the rows of steps ≤ `step` (atomically); unreadable rows go."""
        rows = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                    rows.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        tmp.replace(self.path)

    def add(self, step: int, images: list[str], captions: list[str]) -> None:
        """Append one micro-batch's rows for optimizer step `step` (only the first CAPTION_STEPS steps)."""
        if not self.main or step > CAPTION_STEPS:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for image, caption in zip(images, captions):
                f.write(json.dumps({"step": step, "image": image, "caption": caption}, ensure_ascii=False) + "\n")


def read_captions(out: Path) -> list[dict]:
    """The rows of a run's captions.jsonl (empty when it has none)."""
    path = Path(out) / CAPTION_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
