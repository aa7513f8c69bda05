"""Is the network there? Fast answers, so a machine without internet falls back in seconds, not after
minutes of library retries."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def is_offline(offline: bool | None = None) -> bool:
    """Explicit `offline` wins; otherwise HF_HUB_OFFLINE=1 means no download attempts at all."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(host: str, *, timeout: float = 3.0) -> bool:
    """Quick TCP probe of host:443 (True behind a proxy, where a direct connect says nothing)."""
    if any(os.environ.get(k) for k in PROXY_VARS):
        return True
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub (HF_ENDPOINT) can be reached now (False at once when offline)."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    return not is_offline() and reachable(host, timeout=timeout)
