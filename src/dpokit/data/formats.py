"""Dataset shapes -> :class:`Pair`: detect the shape from the first row, normalize every row.

Supported shapes (TRL's names):

- standard: ``prompt``, ``chosen``, ``rejected`` are strings; the replies do not repeat the
  prompt.
- conversational, explicit prompt: ``prompt`` is a list of ``{"role", "content"}`` messages
  (a plain string is taken as one user message), ``chosen``/``rejected`` are lists of
  messages holding the reply (if they start by repeating the prompt messages, those are
  removed, as in ``HuggingFaceH4/ultrafeedback_binarized``).
- conversational, implicit prompt: no ``prompt`` column; ``chosen``/``rejected`` are whole
  conversations, the prompt is the messages both start with and the replies are what follows.

A shape is a row in :data:`SHAPES`: a predicate that recognizes the first row and a converter
that turns any row into a :class:`Pair` or says what is wrong with it. New shapes are new
rows there.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from dpokit.data.sources import DataError

Message = dict[str, str]  # {"role": ..., "content": ...}

DROP_SAME = "chosen_equals_rejected"


@dataclass(frozen=True)
class Pair:
    """One preference pair; the replies never include the prompt.

    ``prompt`` is a string for standard rows and a non-empty message list for
    conversational ones; ``chosen``/``rejected`` have the same kind (for conversational
    rows: the message(s) after the prompt, starting with an assistant message).
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]

    @property
    def is_chat(self) -> bool:
        """True when the pair is conversational (message lists, rendered by a chat template)."""
        return not isinstance(self.prompt, str)


class _RowProblem(Exception):
    """What is wrong with one row; :func:`to_pairs` adds the origin and row number."""


class _Drop(Exception):
    """The row is valid but carries no preference; the argument is the reason to count."""


# ----------------------------------------------------------------------------- field checks

_NEEDS = (
    "each row needs prompt, chosen and rejected as strings, or as lists of "
    '{"role", "content"} messages, or chosen and rejected as whole conversations without prompt'
)


def _get(row: dict[str, Any], field: str, needs: str = _NEEDS) -> Any:
    """Return ``row[field]``; a missing or null field is a problem naming the columns found."""
    value = row.get(field)
    if value is None:
        found = ", ".join(sorted(map(str, row))) or "none"
        state = "is missing" if field not in row else "is null"
        raise _RowProblem(f"'{field}' {state} ({needs}; this row has columns: {found})")
    return value


def _text(row: dict[str, Any], field: str) -> str:
    """Return a non-empty string field of a standard row."""
    value = _get(row, field)
    if not isinstance(value, str):
        raise _RowProblem(
            f"'{field}' must be a string like in the first row (the dataset has the standard "
            f"string shape), got {type(value).__name__}"
        )
    if not value.strip():
        raise _RowProblem(f"'{field}' is empty; every pair needs a prompt and two non-empty replies")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    """Return ``value`` as a list of ``{"role", "content"}`` string messages (other keys dropped)."""
    if not isinstance(value, list):
        raise _RowProblem(
            f"'{field}' must be a list of {{\"role\", \"content\"}} messages like in the first row "
            f"(the dataset has the conversational shape), got {type(value).__name__}"
        )
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise _RowProblem(f"'{field}' message {i} must be an object with role and content, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "nothing" if message.get(key) is None else type(message[key]).__name__
                raise _RowProblem(f"'{field}' message {i}: '{key}' must be a string, got {got}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _reply(messages: list[Message], field: str) -> list[Message]:
    """Return ``messages`` if they are a usable reply: non-empty, starting with the assistant."""
    if not messages:
        raise _RowProblem(f"'{field}' has no reply messages after the prompt")
    if messages[0]["role"] != "assistant":
        raise _RowProblem(
            f"'{field}' reply must start with an assistant message, got role '{messages[0]['role']}' "
            "(the reply is what the model writes after the prompt)"
        )
    if not any(m["content"].strip() for m in messages):
        raise _RowProblem(f"'{field}' reply is empty; every pair needs two non-empty replies")
    return messages


# ----------------------------------------------------------------------------- shapes


def _standard(row: dict[str, Any]) -> Pair:
    return Pair(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))


def _conversational_explicit(row: dict[str, Any]) -> Pair:
    raw = _get(row, "prompt")
    prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise _RowProblem("'prompt' is empty; every pair needs a prompt")
    replies = []
    for field in ("chosen", "rejected"):
        messages = _messages(_get(row, field), field)
        if messages[: len(prompt)] == prompt:  # the reply repeats the prompt: keep what follows
            messages = messages[len(prompt) :]
        replies.append(_reply(messages, field))
    return Pair(prompt, *replies)


def _conversational_implicit(row: dict[str, Any]) -> Pair:
    chosen = _messages(_get(row, "chosen"), "chosen")
    rejected = _messages(_get(row, "rejected"), "rejected")
    if chosen == rejected:
        raise _Drop(DROP_SAME)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _RowProblem(
            "'chosen' and 'rejected' share no leading messages, so there is no prompt (without a "
            "'prompt' column the prompt is the messages both conversations start with); add a 'prompt' column"
        )
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == shared:
            raise _RowProblem(f"'{field}' has nothing after the {shared} prompt message(s) it shares with the other reply")
    return Pair(chosen[:shared], _reply(chosen[shared:], "chosen"), _reply(rejected[shared:], "rejected"))


@dataclass(frozen=True)
class Shape:
    """A dataset shape: ``matches`` recognizes it from the first row, ``convert`` reads any row."""

    name: str
    matches: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], Pair]


SHAPES: list[Shape] = [
    Shape("standard", lambda r: r.get("prompt") is not None and isinstance(r.get("chosen"), str), _standard),
    Shape(
        "conversational",
        lambda r: r.get("prompt") is not None and isinstance(r.get("chosen"), list),
        _conversational_explicit,
    ),
    Shape(
        "conversational (implicit prompt)",
        lambda r: "prompt" not in r and isinstance(r.get("chosen"), list),
        _conversational_implicit,
    ),
]


def _undetected(row: dict[str, Any]) -> _RowProblem:
    """Explain why no shape in :data:`SHAPES` recognizes ``row`` (the first row)."""
    for field in ("chosen", "rejected"):
        try:
            _get(row, field)
        except _RowProblem as problem:
            return problem
    chosen = row["chosen"]
    if isinstance(chosen, str):
        return _RowProblem(
            f"'prompt' {'is null' if 'prompt' in row else 'is missing'} (string chosen/rejected need a "
            "'prompt' column; for an implicit prompt give chosen and rejected as lists of messages)"
        )
    return _RowProblem(f"'chosen' must be a string or a list of {{\"role\", \"content\"}} messages, got {type(chosen).__name__}")


def detect_shape(row: dict[str, Any], origin: str) -> Shape:
    """Return the :class:`Shape` the first ``row`` has; raise :class:`DataError` if none fits."""
    for shape in SHAPES:
        if shape.matches(row):
            return shape
    raise DataError(f"{origin}, row 1: {_undetected(row)}")


def to_pairs(rows: list[dict[str, Any]], origin: str) -> tuple[list[Pair], dict[str, int]]:
    """Normalize ``rows`` (all of one shape, detected from the first) into pairs.

    Returns the pairs in row order and the number of rows dropped per reason (only
    ``"chosen_equals_rejected"`` for now; reasons with no drops are absent). Raises
    :class:`DataError` naming ``origin``, the 1-based row number and the field for any
    invalid row.
    """
    if not rows:
        raise DataError(f"{origin} has no rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{origin}, row {number}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    shape = detect_shape(rows[0], origin)
    pairs: list[Pair] = []
    dropped: Counter[str] = Counter()
    for number, row in enumerate(rows, start=1):
        try:
            pair = shape.convert(row)
        except _RowProblem as problem:
            raise DataError(f"{origin}, row {number}: {problem}") from None
        except _Drop as drop:
            dropped[str(drop)] += 1
            continue
        if pair.chosen == pair.rejected:
            dropped[DROP_SAME] += 1
            continue
        pairs.append(pair)
    return pairs, dict(dropped)
