"""Whether a Hugging Face hub id can be loaded from this machine, asked before loading it.

Without a network, huggingface_hub retries each file request five times (about 30 s and ten log
lines per file, and a model is several files) before transformers or datasets says it could not
connect. One connection to the hub's host, with a short timeout, tells that at once. It is not
tried when the id is in the local Hugging Face cache (the libraries load it from there), under
``HF_HUB_OFFLINE`` (they fail fast themselves) or behind a proxy (the host is reached through it).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
OFFLINE_HINT = "set HF_HUB_OFFLINE=1 to load it from a Hugging Face cache this check does not know of"


@functools.lru_cache(maxsize=4)
def _probe(host: str, port: int, timeout: float = 5.0) -> str:
    """Why ``host:port`` takes no connection (``name lookup failed: ...``), or ``""`` when it does.
    Asked once per process."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except socket.gaierror as e:
        return f"name lookup failed: {e.strerror or e}"
    except OSError as e:
        return f"no connection to port {port}: {e.strerror or e}"


def in_cache(repo_id: str, kind: str) -> bool:
    """Whether the hub cache holds files of ``repo_id``, a ``"model"`` or ``"dataset"``."""
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"{kind}s--{repo_id.replace('/', '--')}").is_dir()


def unreachable(repo_id: str, kind: str) -> str | None:
    """Why the hub id ``repo_id`` (a ``"model"`` or ``"dataset"``) cannot be loaded from here, or
    None when it may be (the hub answers, or see the module docstring for when it is not asked)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in PROXY_VARIABLES) or in_cache(repo_id, kind):
        return None
    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return None
    why = _probe(url.hostname, url.port or (443 if url.scheme == "https" else 80))
    if not why:
        return None
    return (f"{url.hostname} cannot be reached from this machine ({why}) and the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) has no {repo_id}")
