"""What every metric-network builder shares: the default device, cached torch.hub checkpoints, quiet loading."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def hub_checkpoint(url_or_name: str) -> Path | None:
    """Path of a torch.hub checkpoint (torchvision/torch-fidelity weights) if it is already cached."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url_or_name)
    return path if path.is_file() else None


@contextlib.contextmanager
def quiet():
    """Silence the libraries' own 'random init' / deprecation chatter: the builders log one line themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
