"""Captions as kohya's users write them: caption dropout, shuffled comma-separated tags with the first N kept in
place (kohya-ss/sd-scripts@48d368f, library/train_util.py `BaseDataset.process_caption`: caption_dropout_rate,
shuffle_caption, keep_tokens, caption_separator ","), each draw from the example's own generator (exact on resume)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

SEPARATOR = ","  # kohya's caption_separator default; tags are joined again with ", "


@dataclass(frozen=True)
class CaptionRules:
    """kohya's caption options: data.caption_dropout, data.shuffle_caption, data.keep_tokens."""

    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0

    @classmethod
    def of(cls, data) -> CaptionRules:
        return cls(data.caption_dropout, data.shuffle_caption, data.keep_tokens)

    @property
    def active(self) -> bool:
        """Whether captions change from step to step (else a caption is its record's, every time)."""
        return self.dropout > 0 or self.shuffle

    def apply(self, caption: str, generator: torch.Generator) -> str:
        """The caption an example trains with: "" at the dropout rate (drawn only when the rate is > 0, as kohya
        draws), else its tags shuffled after the first keep_tokens when shuffle is on."""
        if self.dropout > 0 and float(torch.rand((), generator=generator)) < self.dropout:
            return ""
        if not self.shuffle:
            return caption
        tags = [t.strip() for t in caption.strip().split(SEPARATOR)]
        fixed, flex = tags[: self.keep_tokens], tags[self.keep_tokens:]
        flex = [flex[i] for i in torch.randperm(len(flex), generator=generator).tolist()]
        return ", ".join(fixed + flex)
