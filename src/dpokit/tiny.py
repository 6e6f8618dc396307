"""Tiny models dpokit builds itself: the default of ``dpokit train`` and the models of the tests.

Nothing here downloads anything. :func:`build_tokenizer` trains a small byte-level BPE
tokenizer on text dpokit generates (:func:`dpokit.quickstart_data.tokenizer_corpus`), with
a ChatML chat template like Qwen2's. :func:`build_tiny_model` writes a randomly initialised
Qwen2 or Llama model with that tokenizer to a folder in the usual Hugging Face layout, so the
rest of dpokit loads it with the same code that loads a hub model::

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)

:func:`resolve_builtin` maps ``builtin:tiny-qwen2`` (the quickstart model) and the other
names in :data:`BUILTIN_MODELS` to such a folder, built once into ``$DPOKIT_CACHE`` (default
``~/.cache/dpokit``) and reused after.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "builtin:"

EOT_TOKEN = "<|endoftext|>"  # padding, and the end of a plain-text document
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a chat turn: the eos of the chat model
SPECIAL_TOKENS = (EOT_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

TOKENIZER_VOCAB_SIZE = 3072
"""Target vocabulary size (specials + 256 bytes + merges). BPE stops early if the corpus runs out."""
MODEL_MAX_LENGTH = 2048

# ChatML, as Qwen2 renders it but without an implicit default system message. Content may be
# a string or a list of ``{"type": "text", "text": ...}`` parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Bump when the way built-in models are made changes in a way the spec hash does not see.
SPEC_VERSION = 1

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    # The quickstart model: a DPO step on 8 pairs of ~60 tokens in well under 0.2 s on 2 cores.
    "tiny-qwen2": dict(arch="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=384, seed=0),
    "tiny-llama": dict(arch="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=384, seed=0),
}
"""Named specs: keyword arguments of :func:`build_tiny_model`. Use as ``builtin:<name>``."""


# ----------------------------------------------------------------------------- tokenizer


def _train_tokenizer():
    """The raw ``tokenizers.Tokenizer``: byte-level BPE trained on dpokit's own corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dpokit.quickstart_data import tokenizer_corpus

    tok = Tokenizer(models.BPE())  # no unk: every byte is in the vocabulary
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tok


def build_tokenizer():
    """A deterministic byte-level BPE tokenizer with ChatML special tokens and chat template.

    ``<|endoftext|>`` is the pad token, ``<|im_end|>`` the eos; there is no bos and no unk
    (byte-level: any UTF-8 text encodes and decodes back unchanged). Building it twice gives
    byte-identical files from ``save_pretrained``.

    Returns:
        transformers.PreTrainedTokenizerFast
    """
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=IM_END,
        pad_token=EOT_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ----------------------------------------------------------------------------- model


def _default_intermediate(hidden_size: int) -> int:
    """About 8/3 of the hidden size (SwiGLU convention), rounded up to a multiple of 32."""
    return -(-(8 * hidden_size // 3) // 32) * 32


def _make_config(tok, *, arch, hidden_size, num_hidden_layers, num_attention_heads,
                 num_key_value_heads, intermediate_size, max_position_embeddings,
                 tie_word_embeddings):
    from transformers import LlamaConfig, Qwen2Config

    classes = {"qwen2": Qwen2Config, "llama": LlamaConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(classes)}")
    if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
            f"({num_attention_heads}), and that by num_key_value_heads ({num_key_value_heads})")
    kwargs = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or _default_intermediate(hidden_size),
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids(IM_END),
        pad_token_id=tok.convert_tokens_to_ids(EOT_TOKEN),
    )
    if arch == "qwen2":
        kwargs["use_sliding_window"] = False
    config = classes[arch](**kwargs)
    config.dtype = "float32"
    return config


def _write_model(out: Path, *, seed: int, tokenizer=None, **spec) -> None:
    """Write config, weights, generation config and tokenizer files into the folder ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    tok = tokenizer if tokenizer is not None else build_tokenizer()
    if tok.model_max_length != spec["max_position_embeddings"]:
        tok = copy.deepcopy(tok)  # leave the caller's tokenizer as it was
        tok.model_max_length = spec["max_position_embeddings"]
    config = _make_config(tok, **spec)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    # transformers 5 writes weights only on rank 0 of a process group; every process of a run may build
    # its machine's copy (each into its own folder), so this one writes them wherever it runs
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for a one-file model
    try:
        model.save_pretrained(out)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(out)
    if not _is_complete(out):
        raise OSError(f"building a tiny model wrote only {sorted(f.name for f in out.iterdir())} into {out}")
    for f in out.iterdir():  # safetensors writes 0600; make the folder readable like the rest
        os.chmod(f, 0o644)


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Build a randomly initialised float32 ``arch`` model with the built-in tokenizer.

    Writes ``config.json``, ``model.safetensors``, ``generation_config.json`` (eos
    ``<|im_end|>``, pad ``<|endoftext|>``) and the tokenizer files into ``out_dir``, built in
    a temporary folder beside it and renamed into place, so a reader never sees half a model.
    ``out_dir`` may be absent or an empty folder; a non-empty one raises ``FileExistsError``
    unless ``overwrite=True``. ``tokenizer`` (from :func:`build_tokenizer`) skips training a
    new one; ``intermediate_size=None`` means about 8/3 of ``hidden_size``.

    Returns the path of ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_model(tmp, arch=arch, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads,
                     num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
                     max_position_embeddings=max_position_embeddings,
                     tie_word_embeddings=tie_word_embeddings, seed=seed, tokenizer=tokenizer)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if overwrite and out.is_dir() and any(out.iterdir()):  # swap the old folder out first
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            # atomic; onto an empty folder too. A folder another process filled meanwhile makes it
            # fail (OSError) rather than be replaced under a reader.
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- builtins


def cache_dir() -> Path:
    """Where built-in models live: ``$DPOKIT_CACHE`` or ``~/.cache/dpokit``."""
    env = os.environ.get("DPOKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpokit"


def is_builtin(name_or_path: str) -> bool:
    """Whether a model name means a built-in tiny model (``builtin:<name>``)."""
    return isinstance(name_or_path, str) and name_or_path.startswith(BUILTIN_PREFIX)


def _cache_key(name: str) -> str:
    """``<name>-v<SPEC_VERSION>-<hash>``; the hash covers the spec and the tokenizer's corpus."""
    import tokenizers
    import transformers

    from dpokit.quickstart_data import tokenizer_corpus

    h = hashlib.sha256()
    h.update(json.dumps(BUILTIN_MODELS[name], sort_keys=True).encode())
    h.update(json.dumps([TOKENIZER_VOCAB_SIZE, MODEL_MAX_LENGTH, CHAT_TEMPLATE, SPECIAL_TOKENS,
                         tokenizers.__version__, transformers.__version__.split(".")[0]]).encode())
    h.update("\n".join(tokenizer_corpus()).encode())
    return f"{name}-v{SPEC_VERSION}-{h.hexdigest()[:12]}"


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def resolve_builtin(name: str) -> str:
    """The local folder of a built-in model (``builtin:tiny-qwen2``, ...), built on first use.

    The folder is ``<cache_dir()>/models/<name>-v<version>-<hash>``; a changed spec gets a new
    folder. Two processes building at once are safe: each builds in its own temporary folder
    and renames it into place; the loser uses the winner's folder.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = name[len(BUILTIN_PREFIX):] if is_builtin(name) else name
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {name!r}; known built-in models: {known}")
    target = cache_dir() / "models" / _cache_key(key)
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        build_tiny_model(target, **BUILTIN_MODELS[key])
    except OSError as e:
        if not _is_complete(target):  # not a lost race: a real failure
            raise OSError(f"could not build {name} into {target}: {e}. If that folder is left "
                          "over from an interrupted build, delete it and try again.") from e
    return str(target)
