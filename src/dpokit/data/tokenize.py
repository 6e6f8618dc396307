"""Pairs -> token ids: chat templates, end-of-turn handling, length limits.

A :class:`TokenizedPair` keeps the prompt and each reply apart; a reply's ids are exactly
the tokens the model is trained on (the loss mask is implied by the structure), and a reply
always ends with the end-of-turn token: the chat template's marker (``<|im_end|>`` for
ChatML) for conversational pairs, ``eos_token_id`` for string pairs.

Conversational pairs are rendered with the tokenizer's chat template; the reply text is the
part of ``template(prompt + reply)`` after ``template(prompt, add_generation_prompt=True)``,
cut right after the end-of-turn marker (whitespace the template writes after the marker,
such as ChatML's newline, belongs to no one and is not trained on).
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from typing import Any, Sequence

from dpokit.data.formats import Message, Pair
from dpokit.data.sources import DataError

_SENTINEL = "\u2063dpokit-sentinel-reply\u2063"


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair; ``chosen_ids``/``rejected_ids`` are reply tokens only, each ending
    with the end-of-turn token. ``prompt_ids + chosen_ids`` is the full chosen sequence."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_pairs`: ``kept = total - dropped_too_long``; ``truncated`` of the kept."""

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0

    def add(self, other: TokenizeStats) -> None:
        """Add ``other``'s counts into this one."""
        self.total += other.total
        self.kept += other.kept
        self.truncated += other.truncated
        self.dropped_too_long += other.dropped_too_long


# ----------------------------------------------------------------------------- chat templates


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_marker(tokenizer: Any) -> str:
    """Return the text the chat template writes right after an assistant message's content.

    Found by rendering a dummy conversation whose assistant content is a sentinel and taking
    what follows it, trailing whitespace stripped (ChatML: ``"<|im_end|>"``). May be ``""``
    for a template that writes nothing after the reply; then replies get ``eos_token_id``.
    """
    if not _has_chat_template(tokenizer):
        raise DataError(
            "the data is conversational (lists of messages) but the tokenizer has no chat template: "
            "use the tokenizer of a chat/instruct model, or give prompt/chosen/rejected as strings"
        )
    dummy = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(dummy, tokenize=False)
    except Exception as e:
        raise DataError(f"the tokenizer's chat template fails on a plain user/assistant exchange: {e}") from None
    if _SENTINEL not in text:
        raise DataError("the tokenizer's chat template does not write the assistant's message content as given")
    return text.split(_SENTINEL)[-1].rstrip()


def _apply_template(tokenizer: Any, messages: list[Message], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors, "roles must alternate", ...
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"{where}: the chat template cannot render messages with roles [{roles}]: {e}") from None


def render_chat(pair: Pair, tokenizer: Any, marker: str, where: str = "pair") -> tuple[str, str, str]:
    """Return ``(prompt_text, chosen_text, rejected_text)`` for a conversational ``pair``.

    ``prompt_text`` ends with the generation prompt (e.g. ``<|im_start|>assistant\\n``); each
    reply text runs from there to the end of ``marker``'s last occurrence (all of it when
    ``marker`` is ``""``). ``prompt_text + reply_text`` is a prefix of the rendered conversation.
    """
    prompt = _apply_template(tokenizer, pair.prompt, True, where)
    replies = []
    for reply in (pair.chosen, pair.rejected):
        full = _apply_template(tokenizer, pair.prompt + reply, False, where)
        if not full.startswith(prompt):
            raise DataError(
                f"{where}: the chat template does not put the reply at the end: the conversation with "
                "the reply does not start with the prompt rendered with add_generation_prompt=True "
                "(templates that rewrite earlier turns, e.g. strip reasoning, are not supported yet)"
            )
        rest = full[len(prompt) :]
        if marker:
            end = rest.rfind(marker)
            if end < 0:
                raise DataError(f"{where}: the chat template does not end the reply with its end-of-turn marker {marker!r}")
            rest = rest[: end + len(marker)]
        replies.append(rest)
    return prompt, replies[0], replies[1]


# ----------------------------------------------------------------------------- tokens


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]]


def _encode_pairs(pairs: Sequence[Pair], tokenizer: Any, marker: str | None, first: int) -> list[TokenizedPair]:
    """Return the untruncated :class:`TokenizedPair` of each pair; ``first`` numbers them in errors."""
    prompts, chosen, rejected, special, add_eos = [], [], [], [], []
    for i, pair in enumerate(pairs, start=first):
        if pair.is_chat:
            texts = render_chat(pair, tokenizer, marker or "", where=f"pair {i}")
        else:
            texts = (pair.prompt, pair.chosen, pair.rejected)
        for column, text in zip((prompts, chosen, rejected), texts):
            column.append(text)
        special.append(not pair.is_chat)  # a chat template writes its own BOS
        add_eos.append(not pair.is_chat or not marker)
    eos = tokenizer.eos_token_id
    if any(add_eos) and eos is None:
        raise DataError("the tokenizer has no eos_token, needed to end each reply: set tokenizer.eos_token")
    # Batch calls per flag value: fast tokenizers encode a batch in parallel.
    prompt_ids = [None] * len(pairs)
    for flag in (True, False):
        idx = [i for i, s in enumerate(special) if s == flag]
        for i, ids in zip(idx, _encode(tokenizer, [prompts[i] for i in idx], add_special_tokens=flag)):
            prompt_ids[i] = ids
    chosen_ids = _encode(tokenizer, chosen, add_special_tokens=False)
    rejected_ids = _encode(tokenizer, rejected, add_special_tokens=False)
    out = []
    for p, c, r, e in zip(prompt_ids, chosen_ids, rejected_ids, add_eos):
        if e:
            c, r = c + [eos], r + [eos]
        out.append(TokenizedPair(p, c, r))
    return out


def _cut_left(ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` ids; a leading BOS token stays first (it counts toward ``keep``)."""
    if len(ids) <= keep:
        return ids
    if bos is not None and ids and ids[0] == bos and keep >= 2:
        return ids[:1] + ids[len(ids) - keep + 1 :]
    return ids[len(ids) - keep :]


def _cut_right(ids: list[int], keep: int) -> list[int]:
    """The first ``keep - 1`` ids and the last one (the end-of-turn token)."""
    if len(ids) <= keep:
        return ids
    return ids[: keep - 1] + ids[-1:]


def fit_length(pair: TokenizedPair, max_length: int, truncation: str, bos: int | None = None) -> tuple[TokenizedPair | None, bool]:
    """Return ``(pair or None, truncated)`` with ``len(prompt) + max(len(replies)) <= max_length``.

    A pair that fits comes back unchanged. Otherwise ``"drop"`` returns None, and
    ``"truncate"`` keeps the last ``max(max_length - longest_reply, min(len(prompt), max_length // 2))``
    prompt tokens (a leading ``bos`` stays) and cuts each reply from the right to the rest,
    keeping its final end-of-turn token.
    """
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= max_length:
        return pair, False
    if truncation == "drop":
        return None, False
    if truncation != "truncate":
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    keep = max(max_length - longest, min(len(pair.prompt_ids), max_length // 2))
    prompt = _cut_left(pair.prompt_ids, keep, bos)
    budget = max_length - len(prompt)
    return TokenizedPair(prompt, _cut_right(pair.chosen_ids, budget), _cut_right(pair.rejected_ids, budget)), True


def _tokenize_chunk(args: tuple) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize and fit one chunk of pairs; top-level so a process pool can run it."""
    pairs, tokenizer, max_length, truncation, marker, first = args
    stats = TokenizeStats(total=len(pairs))
    out = []
    for encoded in _encode_pairs(pairs, tokenizer, marker, first):
        fitted, truncated = fit_length(encoded, max_length, truncation, tokenizer.bos_token_id)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += truncated
        out.append(fitted)
    stats.kept = len(out)
    return out, stats


def tokenize_pairs(
    pairs: Sequence[Pair],
    tokenizer: Any,
    max_length: int,
    truncation: str,
    num_proc: int | None = None,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize ``pairs`` and apply the length rule; return the kept pairs in order and counts.

    A pair is too long when ``len(prompt) + max(len(chosen), len(rejected)) > max_length``;
    ``truncation`` is ``"drop"`` or ``"truncate"`` (see :func:`fit_length`). ``num_proc > 1``
    spreads the work over a process pool; the output is identical to ``num_proc=None``.
    Raises :class:`DataError` for conversational pairs when the tokenizer has no usable chat
    template, or when the template cannot render a pair.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    marker = end_of_turn_marker(tokenizer) if any(p.is_chat for p in pairs) else None
    if not num_proc or num_proc <= 1 or len(pairs) < 2 * num_proc:
        return _tokenize_chunk((list(pairs), tokenizer, max_length, truncation, marker, 1))
    size = math.ceil(len(pairs) / (4 * num_proc))
    chunks = [(list(pairs[s : s + size]), tokenizer, max_length, truncation, marker, s + 1) for s in range(0, len(pairs), size)]
    # spawn, not fork: the parent may hold torch and tokenizers threads, which fork can deadlock.
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        results = pool.map(_tokenize_chunk, chunks)
    out, stats = [], TokenizeStats()
    for chunk_out, chunk_stats in results:
        out.extend(chunk_out)
        stats.add(chunk_stats)
    return out, stats
