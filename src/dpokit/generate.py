"""Generating replies: sampling settings, prompts, stop tokens, batched left-padded generation.

Shared by ``dpokit compare`` and ``dpokit chat``. A prompt is either a string (fed to the model
as plain text, the way dpokit trains on string-shaped pairs) or a list of ``{"role", "content"}``
messages (rendered with the tokenizer's chat template and its generation prompt). Generation
stops at the tokenizer's eos, the chat template's end-of-turn token (``<|im_end|>`` for ChatML)
and any eos id the model's own generation config names.

Only the settings in :class:`SamplingSettings` apply: the models' own ``generation_config``
defaults (``top_k``, ``repetition_penalty``, ...) are set aside, so two models given the same
settings and seed sample alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch

from dpokit.config import ConfigError, DataConfig, DataSource
from dpokit.data.formats import Message, to_pairs
from dpokit.data.sources import DataError, describe, load_rows
from dpokit.data.tokenize import end_of_turn_marker, template_refusal
from dpokit.modeling import text_config

Prompt = Union[str, list[Message]]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: ``temperature`` 0 means greedy; ``top_k`` 0 means no top-k cut."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 42

    def check(self) -> "SamplingSettings":
        """Return self; raise :class:`ConfigError` for a value out of range."""
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 is off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        return self

    def describe(self) -> str:
        sampling = "greedy" if self.temperature == 0 else f"temperature {self.temperature}, top_p {self.top_p}" + (
            f", top_k {self.top_k}" if self.top_k else "")
        return f"{sampling}, max_new_tokens {self.max_new_tokens}, seed {self.seed}"


# ----------------------------------------------------------------------------- prompts


def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def _prompt_field(value: Any, where: str) -> Prompt:
    """A prompt file's ``prompt`` value: a string (one user message) or a list of messages."""
    if isinstance(value, str) and value.strip():
        return _user(value)
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of {{\"role\", \"content\"}} messages")


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.txt`` file (one per non-empty line) or a ``.jsonl`` file (a ``prompt``
    per row: a string or messages). Every string becomes one user message."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise DataError(f"{path}, line {number}: each row needs a 'prompt' (a string or a list of messages)")
            prompts.append(_prompt_field(row["prompt"], f"{path}, line {number}"))
    elif path.suffix.lower() == ".txt":
        prompts = [_user(line) for line in lines if line.strip()]
    else:
        raise DataError(f"prompt file {path}: use a .txt file (one prompt per line) or .jsonl (a 'prompt' per row)")
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompt")
    return prompts


def prompts_from_data(path: str, n: int, split: str = "train", data: DataConfig | None = None
                      ) -> tuple[list[Prompt], list[dict[str, Any] | None]]:
    """The prompts of the first ``n`` pairs of a preference dataset dpokit reads, as trained on:
    strings stay plain text, conversations stay messages; and each one's chat template variables
    (``data.chat_template_kwargs`` updated by its row's ``tools`` and ``chat_template_kwargs``).
    ``data``: a run's data settings, read as ``dpokit eval`` reads its ``--data`` (``format``,
    ``columns``, ``system_prompt``, ``on_error``)."""
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    data = data or DataConfig()
    source = DataSource(path=path, split=split)
    pairs, _ = to_pairs(load_rows(source), describe(source), format=data.format, columns=data.columns,
                        system_prompt=data.system_prompt, on_error=data.on_error)
    variables = [pair.template_variables(data.chat_template_kwargs) or None for pair in pairs[:n]]
    return [pair.prompt for pair in pairs[:n]], variables


PLAIN_TEXT_FORMATS = ("standard", "standard-implicit")


def trained_on_plain_text(run_dir: Path | None) -> bool:
    """Whether the run in ``run_dir`` trained on plain-text pairs only (its ``data.json`` says each
    train source's format): its prompts were never rendered by a chat template. False for anything
    else, a run saved before dpokit kept ``data.json`` included."""
    from dpokit.checkpoint import DATA_FILE

    try:
        sources = json.loads((run_dir / DATA_FILE).read_text()) if run_dir is not None else {}
    except (OSError, ValueError):
        return False
    train = [s for label, s in sources.items() if label.startswith("train") and isinstance(s, dict)]
    return bool(train) and all(s.get("format") in PLAIN_TEXT_FORMATS for s in train)


def as_plain_text(prompts: list[Prompt]) -> list[Prompt]:
    """``prompts`` for a model trained on plain text: a lone user message becomes its text (encoded
    as training encoded its prompts, without a chat template); conversations stay messages."""
    return [p[0]["content"] if isinstance(p, list) and len(p) == 1 and p[0]["role"] == "user" else p for p in prompts]


def prompt_text(prompt: Prompt) -> str:
    """A prompt as readable text: a lone user message is its content, else ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------- tokens


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(prompt: Prompt, tokenizer, template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a prompt: messages through the chat template with its generation prompt and
    ``template_kwargs`` (a lone user message is plain text for a tokenizer without one); strings as
    plain text."""
    if isinstance(prompt, list) and has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
        except Exception as e:  # jinja errors: "System role not supported", "roles must alternate", ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = (" (this template takes no system message: leave the system prompt out)"
                    if any(m["role"] == "system" for m in prompt) else "")
            raise DataError(template_refusal(prompt, first) + hint) from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, list):
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            raise DataError(
                "the tokenizer has no chat template, so conversations cannot be rendered: "
                "use a chat/instruct model or give single plain-text prompts"
            )
        prompt = prompt[0]["content"]
    return list(tokenizer(prompt)["input_ids"])


def _turn_marker_ids(tokenizer) -> tuple[str, list[int]]:
    """The chat template's end-of-turn marker and its token ids ("" and [] without one)."""
    if not has_chat_template(tokenizer):
        return "", []
    try:
        marker = end_of_turn_marker(tokenizer)
    except DataError:
        return "", []
    return marker, (tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else [])


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a reply: eos, the chat template's end-of-turn token, the model's own eos ids."""
    ids = [tokenizer.eos_token_id]
    _, marker_ids = _turn_marker_ids(tokenizer)
    if len(marker_ids) == 1:
        ids.append(marker_ids[0])
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += own if isinstance(own, list) else [own]
    return sorted({i for i in ids if i is not None})


def stop_strings(tokenizer) -> list[str] | None:
    """The end-of-turn marker where it is several tokens (``<|eot|>`` not in the vocabulary): text that
    ends a reply, as a stop id cannot (None where there is none, or it is one token: a stop id)."""
    marker, marker_ids = _turn_marker_ids(tokenizer)
    return [marker] if len(marker_ids) > 1 else None


def prepare_for_generation(model, tokenizer, settings: SamplingSettings) -> None:
    """Give ``model`` a generation config holding only ``settings``, the stop ids and strings and the
    pad id. A config with stop strings needs ``tokenizer=`` in ``generate``."""
    from transformers import GenerationConfig

    stops = stop_token_ids(tokenizer, model)
    sample = settings.temperature > 0
    model.generation_config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sample,
        temperature=settings.temperature if sample else None,
        top_p=settings.top_p if sample else None,
        top_k=settings.top_k if sample else None,
        eos_token_id=stops,
        stop_strings=stop_strings(tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    model.config.use_cache = True


def new_tokens(ids: torch.Tensor, stops: list[int]) -> list[int]:
    """Generated ids [L] up to (not including) the first stop token."""
    out = ids.tolist()
    for k, token in enumerate(out):
        if token in stops:
            return out[:k]
    return out


def reply_tokens(ids: torch.Tensor, generation_config, tokenizer) -> list[int]:
    """A reply's ids from its generated ids [L]: up to the first stop token, or the first stop string
    (``generation_config.stop_strings``: a marker of several tokens), not including either."""
    out = new_tokens(ids, generation_config.eos_token_id)
    for marker in generation_config.stop_strings or []:
        if marker not in tokenizer.decode(out):
            continue
        low, high = 1, len(out)  # the fewest leading tokens whose text holds the marker
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if marker not in tokenizer.decode(out[:mid]) else (low, mid)
        start = max(k for k in range(high) if marker in tokenizer.decode(out[k:high]))  # where the marker starts
        out = out[:start]
    return out


def context_limit(config) -> int | None:
    """How many positions the model takes (its language model's, in an image-text model), or None."""
    return getattr(text_config(config), "max_position_embeddings", None)


def fit_prompts(encoded: list[list[int]], limit: int | None, max_new_tokens: int, log: Callable[[str], object]) -> list[list[int]]:
    """Prompt ids that leave room for ``max_new_tokens`` within the model's ``limit`` positions: a
    longer prompt keeps its last tokens (as training cuts a long prompt's start), and says so."""
    if not limit:
        return encoded
    room = limit - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                          f"{limit} positions: give at most {limit - 1}")
    long = [k for k, ids in enumerate(encoded, start=1) if len(ids) > room]
    if long:
        log(f"note: {len(long)} prompt(s) (number {', '.join(map(str, long[:5]))}{', ...' if len(long) > 5 else ''}) are "
            f"longer than the {room} tokens the model's context of {limit} leaves beside --max-new-tokens "
            f"{max_new_tokens}: they keep their last {room} tokens")
    return [ids[-room:] if len(ids) > room else ids for ids in encoded]


def _encode_numbered(number: int, prompt: Prompt, tokenizer, template_kwargs: dict[str, Any] | None) -> list[int]:
    try:
        return encode_prompt(prompt, tokenizer, template_kwargs)
    except DataError as e:
        raise DataError(f"prompt {number}: {e}") from None


def generate_replies(model, tokenizer, prompts: list[Prompt], settings: SamplingSettings, batch_size: int = 8,
                     log: Callable[[str], object] = print, template_kwargs: list[dict[str, Any] | None] | None = None) -> list[str]:
    """One reply per prompt, in order, generated in left-padded batches of ``batch_size``; the chat
    template renders prompt ``k`` with ``template_kwargs[k]`` (none when not given).

    The torch RNG is seeded with ``settings.seed`` first, so two models of one vocabulary given
    the same prompts and settings draw the same random stream. Replies are decoded from the new
    tokens only, special tokens stripped. A prompt too long for the model's context keeps its end
    (:func:`fit_prompts`).
    """
    prepare_for_generation(model, tokenizer, settings)
    pad = model.generation_config.pad_token_id
    device = next(model.parameters()).device
    variables = template_kwargs or [None] * len(prompts)
    encoded = fit_prompts([_encode_numbered(k, p, tokenizer, v) for k, (p, v) in enumerate(zip(prompts, variables), start=1)],
                          context_limit(model.config), settings.max_new_tokens, log)
    torch.manual_seed(settings.seed)
    replies = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, tokenizer=tokenizer)
        for row in out[:, width:]:
            replies.append(tokenizer.decode(reply_tokens(row, model.generation_config, tokenizer), skip_special_tokens=True).strip())
    return replies


def generation_device() -> torch.device:
    """The device Accelerate would use in this process (a GPU when there is one)."""
    from accelerate import PartialState

    return PartialState().device
