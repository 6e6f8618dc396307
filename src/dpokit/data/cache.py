"""Tokenized datasets on disk: the second run with the same data, tokenizer and settings skips
reading, normalizing and tokenizing.

One file per dataset, ``<cache>/datasets/<key>.npz`` (``<cache>`` is ``$DPOKIT_CACHE``, default
``~/.cache/dpokit``). The key is the SHA-256 of:

- the source's identity (:func:`dpokit.data.sources.open_source`): a file's resolved path, size
  and modification time; a hub dataset's id, subset, split, revision and ``datasets``
  fingerprint; a saved dataset folder's path, split and fingerprint;
- the tokenizer's fingerprint (:func:`tokenizer_fingerprint`): its full serialized vocabulary,
  merges, normalizer and post-processor, chat template and special tokens;
- every setting that changes the output (format, columns, system prompt, max_length,
  truncation); not ``num_proc``, whose output is identical, nor ``on_error`` (see
  :func:`dpokit.data.pipeline.prepare_source`);
- :data:`CACHE_VERSION` and a hash of the code of the data package, so a dpokit change that could
  change the output never reads an old file;
- the releases of transformers, tokenizers and jinja2, which render chat templates and tokenize,
  and of datasets and pyarrow, which read hub datasets, saved dataset folders and parquet files.

Files are written to a temporary name and renamed into place, so a killed run or two processes
writing at once never leave a half-written file behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from dpokit.data.tokenize import TokenizedPair
from dpokit.run_record import installed_versions

CACHE_VERSION = 1
_CODE_FILES = ("sources.py", "formats.py", "tokenize.py", "pipeline.py", "cache.py")
_LIBRARIES = ("transformers", "tokenizers", "jinja2", "datasets", "pyarrow")


def cache_root() -> Path:
    """``$DPOKIT_CACHE/datasets`` (default ``~/.cache/dpokit/datasets``)."""
    from dpokit.tiny import cache_dir

    return cache_dir() / "datasets"


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes token ids or the chat template's text."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: vocab, merges, normalizer, pre-tokenizer, post-processor
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special_tokens": getattr(tokenizer, "special_tokens_map", None),
        "ids": [getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")],
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(identity: dict[str, Any], tokenizer_id: str, settings: dict[str, Any]) -> str:
    """The cache key of one tokenized dataset (see the module docstring)."""
    blob = {"version": CACHE_VERSION, "code": _code_hash(), "libraries": installed_versions(_LIBRARIES), "source": identity,
            "tokenizer": tokenizer_id, "settings": settings}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_root() / f"{key}.npz"


def save(key: str, pairs: list[TokenizedPair], info: dict[str, Any], lengths: list[tuple[int, int, int]]) -> Path:
    """Write ``pairs`` with a JSON-able ``info`` dict and the untruncated ``lengths``; atomic."""
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.array([(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs], dtype=np.int64).reshape(-1, 3)
    flat = [t for p in pairs for part in (p.prompt_ids, p.chosen_ids, p.rejected_ids) for t in part]
    ids = np.array(flat, dtype=np.int64)
    if ids.size and 0 <= ids.min() and ids.max() < 2**31:
        ids = ids.astype(np.int32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                ids=ids,
                sizes=sizes,
                lengths=np.array(lengths, dtype=np.int64).reshape(-1, 3),
                info=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(key: str) -> tuple[list[TokenizedPair], dict[str, Any], list[tuple[int, int, int]]] | None:
    """Return ``(pairs, info, lengths)`` saved under ``key``, or None when absent or unreadable."""
    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = z["ids"].tolist()
            sizes = z["sizes"].tolist()
            lengths = [tuple(x) for x in z["lengths"].tolist()]
            info = json.loads(z["info"].tobytes().decode())
    except Exception:  # a damaged or foreign file is a miss; it gets rewritten
        return None
    pairs, pos = [], 0
    for p, c, r in sizes:
        pairs.append(TokenizedPair(ids[pos : pos + p], ids[pos + p : pos + p + c], ids[pos + p + c : pos + p + c + r]))
        pos += p + c + r
    return pairs, info, lengths
