"""Pairs -> token ids: chat templates, end-of-turn handling, length limits.

A :class:`TokenizedPair` keeps the prompt and each reply apart; a reply's ids are exactly
the tokens the model is trained on (the loss mask is implied by the structure), and a reply
always ends with the end-of-turn token: the chat template's marker (``<|im_end|>`` for
ChatML) for conversational pairs, ``eos_token_id`` for string pairs.

Conversational pairs are rendered with the tokenizer's chat template; the reply text is the
part of ``template(prompt + reply)`` after ``template(prompt, add_generation_prompt=True)``,
cut right after the end-of-turn marker (whitespace the template writes after the marker,
such as ChatML's newline, belongs to no one and is not trained on).

Pairs longer than ``max_length`` are dropped (``truncation="drop"``) or fitted
(``"truncate"``): a multi-turn prompt first loses its oldest whole turns (a system message
stays), then the prompt is cut from the left and the replies from the right, each reply keeping
its end-of-turn token(s). :class:`TokenizeStats` counts what each step did.
"""

from __future__ import annotations

import math
import multiprocessing
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dpokit.data.formats import TEMPLATE_ONLY_KEYS, Message, Pair, tool_call_names
from dpokit.data.sources import DataError, Problems, RowError

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
    """Counts from :func:`tokenize_pairs`:
    ``kept = total - dropped_too_long - dropped_equal_tokens - problems.total``.

    Of the kept pairs, ``truncated`` were shortened (``truncation="truncate"``), by one or more
    of: ``turns_dropped`` (the prompt lost its oldest whole turns), ``prompt_cut`` (prompt
    tokens cut from the left), ``replies_cut`` (reply tokens cut from the right).
    """

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_equal_tokens: int = 0
    """Pairs whose chosen and rejected ids are the same once cut to ``max_length`` (they differ only
    past it) or tokenized: nothing to prefer."""
    turns_dropped: int = 0
    prompt_cut: int = 0
    replies_cut: int = 0
    problems: Problems = field(default_factory=Problems)
    """Pairs the chat template could not render (only under ``on_error="skip"``)."""
    lengths: list[tuple[int, int, int]] = field(default_factory=list)
    """``(prompt, chosen, rejected)`` token counts of every rendered pair before any truncation."""

    def add(self, other: TokenizeStats) -> None:
        """Add ``other``'s counts into this one (``other`` comes after it)."""
        for name in ("total", "kept", "truncated", "dropped_too_long", "dropped_equal_tokens", "turns_dropped", "prompt_cut",
                     "replies_cut"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.extend(other.problems)
        self.lengths.extend(other.lengths)

    def drops(self) -> dict[str, int]:
        """Pairs dropped here, by reason (``too_long``, ``equal_tokens``), the ones that happened."""
        return {reason: n for reason, n in (("too_long", self.dropped_too_long), ("equal_tokens", self.dropped_equal_tokens)) if n}

    def truncation_summary(self) -> str:
        """``"3 truncated (2 dropped old turns, 1 cut the prompt, 1 cut replies)"``, or ``"0 truncated"``."""
        parts = [f"{n} {what}" for n, what in ((self.turns_dropped, "dropped old turns"), (self.prompt_cut, "cut the prompt"),
                                               (self.replies_cut, "cut replies")) if n]
        return f"{self.truncated} truncated" + (f" ({', '.join(parts)})" if parts else "")


# ----------------------------------------------------------------------------- chat templates


NO_CHAT_TEMPLATE = "the pairs are chat messages (roles and turns) but the tokenizer has no chat template"


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn_marker(tokenizer: Any, template_kwargs: dict[str, Any] | None = None) -> str:
    """Return the text the chat template writes right after an assistant message's content.

    Found by rendering a dummy conversation whose assistant content is a sentinel and taking
    what follows it, trailing whitespace stripped (ChatML: ``"<|im_end|>"``). May be ``""``
    for a template that writes nothing after the reply; then replies get ``eos_token_id``.
    """
    if not _has_chat_template(tokenizer):
        raise DataError(f"{NO_CHAT_TEMPLATE}: use the tokenizer of a chat/instruct model (model.name_or_path), or "
                        "plain-text pairs (prompt, chosen and rejected as strings: format standard)")
    dummy = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(dummy, tokenize=False, **(template_kwargs or {}))
    except Exception as e:
        raise DataError(f"the tokenizer's chat template fails on a plain user/assistant exchange: {e}") from None
    if _SENTINEL not in text:
        raise DataError("the tokenizer's chat template does not write the assistant's message content as given")
    return text.split(_SENTINEL)[-1].rstrip()


def template_refusal(messages: list[Message], error: object) -> str:
    """What to say when a chat template refuses ``messages`` (jinja's ``error``: "System role not
    supported", "roles must alternate", ...)."""
    return f"the chat template cannot render messages with roles [{', '.join(m['role'] for m in messages)}]: {error}"


def _apply_template(tokenizer: Any, messages: list[Message], generation_prompt: bool, where: str, field: str,
                    template_kwargs: dict[str, Any]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs)
    except Exception as e:  # jinja errors, "roles must alternate", ...
        raise RowError(
            f"{where}: '{field}': {template_refusal(messages, e)}. "
            "Use a tokenizer whose chat template accepts these roles (for a template without a system "
            "role, leave data.system_prompt unset)",
            "template_error",
        ) from None


def _check_template_only_keys_rendered(messages: list[Message], text: str, render: Callable[[list[Message]], str],
                                      keys: Sequence[str], where: str, field: str) -> None:
    """Refuse ``messages`` whose tool calls or reasoning (``keys``) the chat template leaves out of
    ``text``, their rendering: ``render`` of the messages without them must give another text.
    Templates without tool support drop calls silently, and a call is what the reply says."""
    for key in keys:
        if any(key in message for message in messages):
            without = [{k: v for k, v in message.items() if k != key} for message in messages]
            if render(without) == text:
                names = [name for message in messages for name in tool_call_names(message)]
                what = (f"tool calls (the call to {names[0] if names else 'a tool'} is left out)" if key == "tool_calls"
                        else f"an assistant's reasoning ('{key}')")
                raise RowError(
                    f"{where}: '{field}': the chat template does not render {what}: its text is the same without "
                    f"them. Use a tokenizer whose template renders '{key}', or write it into the content",
                    "unsupported",
                )


def render_chat(pair: Pair, tokenizer: Any, marker: str, where: str = "pair",
                template_kwargs: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """Return ``(prompt_text, chosen_text, rejected_text)`` for a conversational ``pair``.

    ``prompt_text`` ends with the generation prompt (e.g. ``<|im_start|>assistant\\n``); each
    reply text runs from there to the end of ``marker``'s last occurrence (all of it when
    ``marker`` is ``""``). ``prompt_text + reply_text`` is a prefix of the rendered conversation.
    The template gets ``template_kwargs`` (``data.chat_template_kwargs``), updated by the pair's own
    (its row's ``tools`` and ``chat_template_kwargs``).
    """
    kwargs = pair.template_variables(template_kwargs)
    prompt = _apply_template(tokenizer, pair.prompt, True, where, "prompt", kwargs)
    # a prompt's earlier reasoning may be left out by design (Qwen3 keeps only the last turn's)
    _check_template_only_keys_rendered(pair.prompt, prompt, lambda m: _apply_template(tokenizer, m, True, where, "prompt", kwargs),
                                       ("tool_calls",), where, "prompt")
    replies = []
    for field, reply in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        full = _apply_template(tokenizer, pair.prompt + reply, False, where, field, kwargs)
        _check_template_only_keys_rendered(
            reply, full, lambda m: _apply_template(tokenizer, pair.prompt + m, False, where, field, kwargs),
            TEMPLATE_ONLY_KEYS, where, field)
        if not full.startswith(prompt):
            raise RowError(
                f"{where}: '{field}': the chat template does not put the reply at the end: the conversation "
                "with the reply does not start with the prompt rendered with add_generation_prompt=True "
                "(templates that rewrite earlier turns, e.g. strip reasoning, are not supported yet). "
                "Use a tokenizer whose template renders earlier turns the same with or without a reply",
                "reply_not_at_end",
            )
        rest = full[len(prompt) :]
        if marker:
            end = rest.rfind(marker)
            if end < 0:
                raise RowError(
                    f"{where}: '{field}': the chat template does not end the reply with its end-of-turn "
                    f"marker {marker!r}; use a template that closes every assistant turn the same way",
                    "no_end_marker",
                )
            rest = rest[: end + len(marker)]
        replies.append(rest)
    return prompt, replies[0], replies[1]


# ----------------------------------------------------------------------------- tokens


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]]


def _encode_pairs(
    pairs: Sequence[Pair], tokenizer: Any, marker: str | None, first: int, on_error: str = "raise", problems: Problems | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[TokenizedPair | None]:
    """Return the untruncated :class:`TokenizedPair` of each pair; ``first`` numbers them in errors;
    ``template_kwargs`` go to the chat template (:func:`render_chat`).

    A pair the chat template cannot render raises :class:`RowError`, or under ``on_error="skip"``
    is counted in ``problems`` and comes back as None. A string pair's prompt gets the tokenizer's
    special tokens (BOS) unless it starts with BOS, each reply EOS unless it ends with a special
    token (text a chat template wrote).
    """
    prompts, chosen, rejected, special, add_eos, rendered = [], [], [], [], [], []
    bos_text, written_ends = tokenizer.bos_token, _special_texts(tokenizer)
    for i, pair in enumerate(pairs, start=first):
        if pair.is_chat:
            try:
                texts = render_chat(pair, tokenizer, marker or "", where=pair.where or f"pair {i}", template_kwargs=template_kwargs)
            except RowError as e:
                if on_error != "skip" or problems is None:
                    raise RowError(f"{e} (or set data.on_error=skip to drop such pairs, counted)", e.reason) from None
                problems.add(e.reason, str(e))
                rendered.append(False)
                continue
        else:
            texts = (pair.prompt, pair.chosen, pair.rejected)
        rendered.append(True)
        for column, text in zip((prompts, chosen, rejected), texts):
            column.append(text)
        # a chat template writes its own BOS, and so did a text that starts with it
        special.append(not pair.is_chat and not (bos_text and texts[0].startswith(bos_text)))
        if pair.is_chat:
            add_eos.append((not marker, not marker))
        else:  # a text that ends with a special token (<|im_end|>, written by a template) has its end
            add_eos.append(tuple(not text.rstrip().endswith(written_ends) for text in texts[1:]))
    eos = tokenizer.eos_token_id
    if any(any(flags) for flags in add_eos) and eos is None:
        raise DataError("the tokenizer has no eos_token, needed to end each reply: set tokenizer.eos_token")
    # Batch calls per flag value: fast tokenizers encode a batch in parallel.
    prompt_ids = [None] * len(prompts)
    for flag in (True, False):
        idx = [i for i, s in enumerate(special) if s == flag]
        for i, ids in zip(idx, _encode(tokenizer, [prompts[i] for i in idx], add_special_tokens=flag)):
            prompt_ids[i] = ids
    chosen_ids = _encode(tokenizer, chosen, add_special_tokens=False)
    rejected_ids = _encode(tokenizer, rejected, add_special_tokens=False)
    encoded = []
    for p, c, r, (eos_c, eos_r) in zip(prompt_ids, chosen_ids, rejected_ids, add_eos):
        encoded.append(TokenizedPair(p, c + [eos] * eos_c, r + [eos] * eos_r))
    it = iter(encoded)
    return [next(it) if ok else None for ok in rendered]


def _special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts of ``tokenizer``'s special tokens (EOS, ``<|im_end|>``, ``<|eot_id|>``, ...)."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    texts.update(token.content for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                 if getattr(token, "special", False))
    return tuple(text for text in texts if text)


def _cut_left(ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` ids; a leading BOS token stays first (it counts toward ``keep``) where at
    least one other id fits beside it (with ``keep`` 1 the last id is kept, not a lone BOS)."""
    if len(ids) <= keep:
        return ids
    if bos is not None and ids and ids[0] == bos and keep >= 2:
        return ids[:1] + ids[len(ids) - keep + 1 :]
    return ids[len(ids) - keep :]


def _cut_right(ids: list[int], keep: int, tail: int = 1) -> list[int]:
    """``keep`` ids: the first ones, then the last ``tail`` (the reply's end-of-turn tokens)."""
    if len(ids) <= keep:
        return ids
    tail = min(tail, keep)
    return ids[: keep - tail] + ids[len(ids) - tail :]


def end_tokens(ids: list[int], marker: str, tokenizer: Any, most: int = 32) -> int:
    """How many of a chat reply's last ``ids`` hold its end-of-turn ``marker``: the fewest whose text
    ends with it (a marker may be several tokens, as Phi-3's ``<|end|>`` newline EOS). 1 when
    ``marker`` is empty (the reply ends with EOS) or not found within ``most`` tokens."""
    if marker:
        for k in range(1, min(most, len(ids)) + 1):
            if tokenizer.decode(ids[-k:]).endswith(marker):
                return k
    return 1


def _prompt_budget(prompt_len: int, longest: int, max_length: int) -> int:
    """Prompt tokens a too-long pair keeps: ``max(max_length - longest_reply, min(prompt_len, max_length // 2))``."""
    return max(max_length - longest, min(prompt_len, max_length // 2))


def _fit(
    pair: TokenizedPair, max_length: int, truncation: str, bos: int | None, tails: tuple[int, int] = (1, 1)
) -> tuple[TokenizedPair | None, bool, bool]:
    """:func:`fit_length`, saying which parts were cut: ``(pair or None, prompt_cut, replies_cut)``."""
    longest = max(len(pair.chosen_ids), len(pair.rejected_ids))
    if len(pair.prompt_ids) + longest <= max_length:
        return pair, False, False
    if truncation == "drop":
        return None, False, False
    if truncation != "truncate":
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    prompt = _cut_left(pair.prompt_ids, _prompt_budget(len(pair.prompt_ids), longest, max_length), bos)
    budget = max_length - len(prompt)
    chosen, rejected = _cut_right(pair.chosen_ids, budget, tails[0]), _cut_right(pair.rejected_ids, budget, tails[1])
    replies_cut = len(chosen) < len(pair.chosen_ids) or len(rejected) < len(pair.rejected_ids)
    return TokenizedPair(prompt, chosen, rejected), len(prompt) < len(pair.prompt_ids), replies_cut


def fit_length(
    pair: TokenizedPair, max_length: int, truncation: str, bos: int | None = None, tails: tuple[int, int] = (1, 1)
) -> tuple[TokenizedPair | None, bool]:
    """Return ``(pair or None, truncated)`` with ``len(prompt) + max(len(replies)) <= max_length``.

    A pair that fits comes back unchanged. Otherwise ``"drop"`` returns None, and
    ``"truncate"`` keeps the last ``max(max_length - longest_reply, min(len(prompt), max_length // 2))``
    prompt tokens (a leading ``bos`` stays) and cuts each reply from the right to the rest,
    keeping its end-of-turn tokens: the last ``tails[0]`` of chosen and ``tails[1]`` of rejected
    (:func:`end_tokens`; 1, the EOS, for string pairs). (Dropping whole old turns first needs the messages:
    :func:`tokenize_pairs` does it.)
    """
    fitted, prompt_cut, replies_cut = _fit(pair, max_length, truncation, bos, tails)
    return fitted, prompt_cut or replies_cut


def _drop_old_turns(pair: Pair, encoded: TokenizedPair, tokenizer: Any, marker: str | None, max_length: int, number: int,
                    template_kwargs: dict[str, Any] | None = None) -> TokenizedPair | None:
    """Re-encode a too-long chat ``pair`` without its oldest whole turns, or None if that is not needed.

    The prompt's budget is the one :func:`fit_length` gives it; turns (a user message and what
    follows it up to the next user message) are removed oldest first until the prompt fits, a
    leading system message always staying. If even the last turn alone is over budget, the
    pair comes back with only that turn (its tokens get cut after).
    """
    longest = max(len(encoded.chosen_ids), len(encoded.rejected_ids))
    budget = _prompt_budget(len(encoded.prompt_ids), longest, max_length)
    if len(encoded.prompt_ids) <= budget:
        return None
    head = pair.prompt[:1] if pair.prompt[0]["role"] == "system" else []
    body = pair.prompt[len(head) :]
    starts = [k for k in range(1, len(body)) if body[k]["role"] == "user"]
    if not starts:
        return None

    def encoded_from(start: int) -> TokenizedPair:
        (shorter,) = _encode_pairs([dataclasses.replace(pair, prompt=head + body[start:])], tokenizer, marker, number,
                                   template_kwargs=template_kwargs)
        return shorter

    # the prompt shrinks as turns go: binary search for the most turns that fit (a 1000-turn
    # prompt took minutes re-rendered one turn at a time), else the last turn alone
    low, high, best = 0, len(starts) - 1, None
    while low <= high:
        middle = (low + high) // 2
        candidate = encoded_from(starts[middle])
        if len(candidate.prompt_ids) <= budget:
            best, high = candidate, middle - 1
        else:
            low = middle + 1
    return best if best is not None else encoded_from(starts[-1])


def _tokenize_chunk(args: tuple) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize and fit one chunk of pairs; top-level so a process pool can run it."""
    pairs, tokenizer, max_length, truncation, marker, first, on_error, template_kwargs = args
    stats = TokenizeStats(total=len(pairs))
    bos = tokenizer.bos_token_id
    out = []
    encoded_pairs = _encode_pairs(pairs, tokenizer, marker, first, on_error, stats.problems, template_kwargs)
    for i, (pair, encoded) in enumerate(zip(pairs, encoded_pairs)):
        if encoded is None:
            continue
        stats.lengths.append((len(encoded.prompt_ids), len(encoded.chosen_ids), len(encoded.rejected_ids)))
        turns_dropped = False
        too_long = len(encoded.prompt_ids) + max(len(encoded.chosen_ids), len(encoded.rejected_ids)) > max_length
        if too_long and truncation == "truncate" and pair.is_chat:
            shorter = _drop_old_turns(pair, encoded, tokenizer, marker, max_length, first + i, template_kwargs)
            if shorter is not None:
                encoded, turns_dropped = shorter, True
        tails = (1, 1)
        if too_long and truncation == "truncate" and pair.is_chat and marker:  # the marker's tokens stay last
            tails = (end_tokens(encoded.chosen_ids, marker, tokenizer), end_tokens(encoded.rejected_ids, marker, tokenizer))
        fitted, prompt_cut, replies_cut = _fit(encoded, max_length, truncation, bos, tails)
        if fitted is None:
            stats.dropped_too_long += 1
            continue
        if fitted.chosen_ids == fitted.rejected_ids:  # the cut kept only what the replies share
            stats.dropped_equal_tokens += 1
            continue
        stats.turns_dropped += turns_dropped
        stats.prompt_cut += prompt_cut
        stats.replies_cut += replies_cut
        stats.truncated += turns_dropped or prompt_cut or replies_cut
        out.append(fitted)
    stats.kept = len(out)
    return out, stats


def tokenize_pairs(
    pairs: Sequence[Pair],
    tokenizer: Any,
    max_length: int,
    truncation: str,
    num_proc: int | None = None,
    on_error: str = "raise",
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Tokenize ``pairs`` and apply the length rule; return the kept pairs in order and counts.

    A pair is too long when ``len(prompt) + max(len(chosen), len(rejected)) > max_length``;
    ``truncation`` is ``"drop"`` or ``"truncate"`` (old whole turns first, then see
    :func:`fit_length`). ``num_proc > 1`` spreads the work over a process pool; the output is
    identical to ``num_proc=None``. Raises :class:`DataError` for conversational pairs when the
    tokenizer has no usable chat template, and :class:`RowError` (naming the pair's file and row)
    when the template cannot render a pair; under ``on_error="skip"`` such pairs are counted in
    ``stats.problems`` instead. ``template_kwargs`` (``data.chat_template_kwargs``) go to the chat
    template with every conversational pair, updated by the pair's own.
    """
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    marker = end_of_turn_marker(tokenizer, template_kwargs) if any(p.is_chat for p in pairs) else None
    if not num_proc or num_proc <= 1 or len(pairs) < 2 * num_proc:
        return _tokenize_chunk((list(pairs), tokenizer, max_length, truncation, marker, 1, on_error, template_kwargs))
    size = math.ceil(len(pairs) / (4 * num_proc))
    chunks = [(list(pairs[s : s + size]), tokenizer, max_length, truncation, marker, s + 1, on_error, template_kwargs)
              for s in range(0, len(pairs), size)]
    # spawn, not fork: the parent may hold torch and tokenizers threads, which fork can deadlock.
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        results = pool.map(_tokenize_chunk, chunks)
    out, stats = [], TokenizeStats()
    for chunk_out, chunk_stats in results:
        out.extend(chunk_out)
        stats.add(chunk_stats)
    return out, stats
