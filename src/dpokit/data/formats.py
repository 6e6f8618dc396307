"""Dataset shapes -> :class:`Pair`: detect the shape from the first rows, normalize every row.

A shape is a row in :data:`SHAPES`: a name (the value of ``data.format``), a predicate that
recognizes a row of it, a converter that turns any row into a :class:`Pair` or says what is
wrong with it, and a one-line example. New shapes are new rows there. In detection order:

- ``sharegpt``: LLaMA-Factory ranking data, ``conversations`` (``from``/``value`` messages,
  roles human/gpt/user/assistant/system/observation/function_call) with ``chosen`` and
  ``rejected`` message objects; optional ``system``.
- ``align-anything``: PKU-Alignment/Align-Anything text-to-text, ``question``, ``response_1``,
  ``response_2`` and ``overall_response`` (1 or 2: the better one); other fields are ignored.
- ``hh-rlhf``: Anthropic/hh-rlhf raw transcripts, ``chosen``/``rejected`` strings of
  ``"\\n\\nHuman: "`` / ``"\\n\\nAssistant: "`` turns; the prompt is the shared leading turns
  and the reply the last assistant turn.
- ``standard`` (TRL): ``prompt``, ``chosen``, ``rejected`` strings; plain text, no template.
- ``standard-implicit`` (TRL): ``chosen``/``rejected`` strings only; the prompt is their common
  leading text, cut back to a whitespace boundary.
- ``conversational`` (TRL): ``prompt`` messages (a string is one user message) and
  ``chosen``/``rejected`` reply messages starting with the assistant's (a copy of the prompt at
  their start is removed).
- ``ultrafeedback``: HuggingFaceH4/ultrafeedback_binarized, ``prompt`` plus whole conversations
  in ``chosen``/``rejected`` and ``score_chosen``/``score_rejected`` (kept as metadata).
- ``conversational-implicit`` (TRL; MiniMind ``dpo.jsonl``, mlabonne/orpo-dpo-mix-40k):
  ``chosen``/``rejected`` are whole conversations; the prompt is the messages both start with.
  A ``prompt`` column next to them is not used.

Any conversational row may also carry, as TRL reads them, ``tools`` (the tool definitions the
chat template renders: a list of JSON schema objects, or that list as a JSON string) and
``chat_template_kwargs`` (an object of template variables, e.g. ``{"enable_thinking": false}``);
both go to the chat template with this pair (:attr:`Pair.template_kwargs`).

Before detection ``data.columns`` renames columns (``{prompt: question, chosen: good}``);
after conversion a ``system`` column, else ``data.system_prompt``, becomes the system message
of a conversational pair that has none (:attr:`Normalized.unused_system` counts the rows whose
column went unused). Every conversational pair is checked for role order:
an optional system message first, then user and assistant in turns (tool results only after an
assistant message), and the reply starts with the assistant.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from dpokit.data.sources import SKIP_HINT, DataError, Problems

Message = dict[str, str]  # {"role": ..., "content": ...}

DROP_SAME = "chosen_equals_rejected"
ROLES = ("system", "user", "assistant", "tool")
META_FIELDS = ("score_chosen", "score_rejected")


@dataclass(frozen=True)
class Pair:
    """One preference pair; the replies never include the prompt.

    ``prompt`` is a string for standard rows and a non-empty message list for
    conversational ones; ``chosen``/``rejected`` have the same kind (for conversational
    rows: the message(s) after the prompt, starting with an assistant message).
    ``meta`` holds optional per-row numbers (``score_chosen``, ``score_rejected``) and
    ``where`` the origin and row for messages; neither takes part in ``==``.
    """

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    meta: dict[str, Any] | None = field(default=None, compare=False)
    where: str = field(default="", compare=False)
    template_kwargs: dict[str, Any] | None = field(default=None, compare=False)
    """The row's own chat template variables: its ``tools`` and ``chat_template_kwargs`` columns."""

    def template_variables(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The chat template's variables for this pair: ``defaults`` (``data.chat_template_kwargs``)
        updated by the row's own (:attr:`template_kwargs`)."""
        return {**(defaults or {}), **(self.template_kwargs or {})}

    @property
    def is_chat(self) -> bool:
        """True when the pair is conversational (message lists, rendered by a chat template)."""
        return not isinstance(self.prompt, str)


class _RowProblem(Exception):
    """What is wrong with one row; :func:`normalize` adds the origin and row number.

    The message starts with the field in quotes; ``reason`` is what it is counted under."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


class _Drop(Exception):
    """The row is valid but carries no preference; the argument is the reason to count."""


# ----------------------------------------------------------------------------- field checks

_NEEDS = (
    "each row needs prompt, chosen and rejected as strings, or as lists of "
    '{"role", "content"} messages, or chosen and rejected as whole conversations without prompt'
)
_STRING_SHAPE = " (the dataset's format is standard: strings)"


def _get(row: dict[str, Any], field: str, needs: str = _NEEDS) -> Any:
    """Return ``row[field]``; a missing or null field is a problem naming the columns found."""
    value = row.get(field)
    if value is None:
        found = ", ".join(sorted(map(str, row))) or "none"
        state = "is missing" if field not in row else "is null"
        raise _RowProblem(f"'{field}' {state} ({needs}; this row has columns: {found})", "missing_field")
    return value


def _text(row: dict[str, Any], field: str, hint: str = _STRING_SHAPE, needs: str = _NEEDS) -> str:
    """Return a non-empty string field."""
    value = _get(row, field, needs)
    if not isinstance(value, str):
        raise _RowProblem(f"'{field}' must be a string{hint}, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise _RowProblem(f"'{field}' is empty; every pair needs a prompt and two non-empty replies", "empty")
    return value


def _messages(value: Any, field: str) -> list[Message]:
    """Return ``value`` as a list of ``{"role", "content"}`` string messages, with OpenAI-style
    ``tool_calls`` (an assistant's, content then may be null), ``tool_call_id`` and ``name`` (a tool
    result's) and an assistant's reasoning (:data:`REASONING_KEYS`) kept for the chat template;
    other keys dropped."""
    if not isinstance(value, list):
        raise _RowProblem(
            f"'{field}' must be a list of {{\"role\", \"content\"}} messages (the dataset's format is "
            f"conversational), got {type(value).__name__}",
            "wrong_type",
        )
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise _RowProblem(f"'{field}' message {i} must be an object with role and content, got {type(message).__name__}", "wrong_type")
        if message.get("function_call"):  # OpenAI's older single call: no chat template reads it
            raise _RowProblem(f"'{field}' message {i} has a function_call (OpenAI's older form): give it as "
                              "tool_calls, which chat templates render, or write the call into its content", "unsupported")
        calls = message.get("tool_calls") or None
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise _RowProblem(f"'{field}' message {i}: 'tool_calls' must be a list of call objects, got "
                              f"{type(calls).__name__}", "wrong_type")
        content = "" if message.get("content") is None and calls else message.get("content")
        for key, value in (("role", message.get("role")), ("content", content)):
            if not isinstance(value, str):
                reason = "missing_field" if value is None else "wrong_type"
                raise _RowProblem(f"'{field}' message {i}: '{key}' must be a string, got "
                                  f"{'nothing' if value is None else type(value).__name__}", reason)
        kept = {"role": message["role"], "content": content}
        if calls:
            kept["tool_calls"] = calls
        kept.update({key: message[key] for key in ("tool_call_id", "name") if isinstance(message.get(key), str)})
        kept.update({key: message[key] for key in REASONING_KEYS if isinstance(message.get(key), str) and message[key].strip()})
        messages.append(kept)
    return messages


def tool_call_names(message: Message) -> list[str]:
    """The function names of ``message``'s tool calls (OpenAI's ``{"function": {"name"}}``, or a bare ``name``)."""
    names = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        if isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


REASONING_KEYS = ("reasoning_content", "thinking")
"""Message keys chat templates read an assistant's reasoning from (Qwen3 and DeepSeek-R1's
``reasoning_content``, gpt-oss's ``thinking``)."""

TEMPLATE_ONLY_KEYS = ("tool_calls", *REASONING_KEYS)
"""Message keys only a chat template turns into text: a template that ignores one drops it silently."""


def _json_value(row: dict[str, Any], key: str, kind: type, example: str) -> Any:
    """Row field ``key`` as a ``kind`` (list/dict), parsed when written as JSON text (CSV, some
    parquet exports); None when absent, null or empty."""
    value = row.get(key)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError as e:
            raise _RowProblem(f"'{key}' is text but not JSON ({e}); give {example}", "wrong_type") from None
    if value is None or value == kind():
        return None
    if not isinstance(value, kind):
        raise _RowProblem(f"'{key}' must be {example}, got {type(value).__name__}", "wrong_type")
    return value


def _row_template_kwargs(row: dict[str, Any], pair: Pair) -> dict[str, Any] | None:
    """The row's ``tools`` and ``chat_template_kwargs`` as chat template arguments, or None."""
    tools = _json_value(row, "tools", list, "a list of tool definitions (JSON schema objects)")
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise _RowProblem("'tools' must be a list of tool definitions (JSON schema objects), got a list holding "
                          f"{type(next(t for t in tools if not isinstance(t, dict))).__name__}", "wrong_type")
    kwargs = _json_value(row, "chat_template_kwargs", dict, 'an object of template variables, e.g. {"enable_thinking": false}')
    if kwargs is not None:
        check_template_kwargs(kwargs, "'chat_template_kwargs'", _RowProblem)
    merged = {**(kwargs or {}), **({"tools": tools} if tools else {})}
    if merged and not pair.is_chat:
        given = " and ".join(f"'{key}'" for key in ("tools", "chat_template_kwargs") if row.get(key))
        raise _RowProblem(f"{given} need conversational pairs (a chat template renders them), but this row is plain "
                          "text, which is trained as written: give prompt and replies as messages", "unsupported")
    return merged or None


RESERVED_TEMPLATE_KWARGS = ("conversation", "messages", "add_generation_prompt", "continue_final_message", "tokenize",
                            "padding", "truncation", "max_length", "return_tensors", "return_dict",
                            "return_assistant_tokens_mask", "tokenizer_kwargs")
"""``apply_chat_template`` arguments dpokit sets itself: not chat template variables."""


def check_template_kwargs(kwargs: dict[str, Any], where: str, error: type[Exception]) -> None:
    """Refuse template variables that are ``apply_chat_template``'s own arguments (dpokit sets them)."""
    taken = [key for key in kwargs if key in RESERVED_TEMPLATE_KWARGS or not isinstance(key, str)]
    if taken:
        raise error(f"{where}: {taken[0]!r} is not a chat template variable (dpokit sets apply_chat_template's "
                    "own arguments); give template variables only, e.g. enable_thinking")


def _reply(messages: list[Message], field: str) -> list[Message]:
    """Return ``messages`` if they are a usable reply: non-empty, starting with the assistant."""
    if not messages:
        raise _RowProblem(f"'{field}' has no reply messages after the prompt", "empty")
    if messages[0]["role"] != "assistant":
        raise _RowProblem(
            f"'{field}' reply must start with an assistant message, got role '{messages[0]['role']}' "
            "(the reply is what the model writes after the prompt)",
            "roles_out_of_order",
        )
    if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise _RowProblem(f"'{field}' reply is empty; every pair needs two non-empty replies", "empty")
    return messages


# Which role may follow which: an optional system message first, user and assistant in turns,
# tool results only after an assistant message (and before the assistant's next message).
_NEXT = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


def _check_roles(entries: Sequence[tuple[str, str, str]]) -> None:
    """Check a conversation's role order; ``entries`` are ``(field, label, role)`` per message,
    the label saying where the message is (``"message 3"``)."""
    previous = None
    for field, label, role in entries:
        at = f"'{field}' {label}".rstrip()
        if role not in ROLES:
            raise _RowProblem(
                f"{at}: role '{role}' is not one of {', '.join(ROLES)}; rename it "
                "(or map a ShareGPT dataset's roles with data.format=sharegpt)",
                "unknown_role",
            )
        if role not in _NEXT[previous]:
            after = f"follows '{previous}'" if previous else "comes first"
            raise _RowProblem(
                f"{at}: role '{role}' {after}, expected {' or '.join(_NEXT[previous])}. Roles must go: an "
                "optional system message first, then user and assistant taking turns (tool results only "
                "after an assistant message), and the prompt ends with the user; merge or reorder the messages",
                "roles_out_of_order",
            )
        previous = role


def _numbered(field: str, messages: list[Message], first: int = 1, noun: str = "message") -> list[tuple[str, str, str]]:
    return [(field, f"{noun} {first + i}", m["role"]) for i, m in enumerate(messages)]


def _split_conversations(chosen: list[Message], rejected: list[Message], noun: str = "message") -> Pair:
    """Prompt = the messages both conversations start with; replies = what follows."""
    if chosen == rejected:
        raise _Drop(DROP_SAME)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise _RowProblem(
            f"'chosen' and 'rejected' share no leading {noun}s, so there is no prompt (without a "
            f"'prompt' column the prompt is the {noun}s both conversations start with); make their "
            "prompt turns identical, or add a 'prompt' column",
            "leading_turns_differ",
        )
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) == shared:
            raise _RowProblem(f"'{field}' has nothing after the {shared} prompt {noun}(s) it shares with the other reply", "empty")
    prompt = chosen[:shared]
    replies = []
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[shared]["role"] != "assistant":
            # The conversations differ before the last reply: the earlier turns are not a shared prompt.
            raise _RowProblem(
                f"'{field}' {noun} {shared + 1} differs from the other conversation at a "
                f"'{messages[shared]['role']}' turn: the leading turns of chosen and rejected must be "
                "the same, only the last assistant reply may differ",
                "leading_turns_differ",
            )
        reply = _reply(messages[shared:], field)
        later = next((k for k, m in enumerate(reply) if m["role"] == "user"), None)
        if later is not None:
            # The conversations differ at an earlier assistant turn, and go on after it: their
            # leading turns are not a shared prompt, and the reply would train on user turns.
            raise _RowProblem(
                f"'chosen' and 'rejected' differ at {noun} {shared + 1}, an assistant turn followed by more "
                f"turns ('{field}' {noun} {shared + later + 1} is the user's): the leading turns of chosen and "
                "rejected must be the same, only the last assistant reply may differ",
                "leading_turns_differ",
            )
        replies.append(reply)
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        _check_roles(_numbered(field, messages, noun=noun))
    return Pair(prompt, *replies)


# ----------------------------------------------------------------------------- shapes


def _standard(row: dict[str, Any]) -> Pair:
    return Pair(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))


def _no_prompt(row: dict[str, Any], shape: str) -> None:
    """Refuse a row with a prompt in a dataset whose shape has none: the prompt would be ignored."""
    if row.get("prompt") is not None:
        raise _RowProblem(
            f"'prompt' is set in this row, but the dataset's format is {shape}, whose rows have none (the prompt "
            "is what chosen and rejected start with), so this prompt would be ignored: give every row a prompt "
            "or none (with data.format=standard, rows without one are errors)",
            "mixed_shapes",
        )


def _standard_implicit(row: dict[str, Any]) -> Pair:
    _no_prompt(row, "standard-implicit")
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    if chosen == rejected:
        raise _Drop(DROP_SAME)
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    # Cut back to the last whitespace of the shared text: the replies start with it, as in TRL.
    # Shared text without whitespace (Chinese, Japanese) is cut where the two first differ.
    cut = max((m.start() for m in re.finditer(r"\s", chosen[:common])), default=common)
    if cut <= 0 or not chosen[:cut].strip():
        texts = [k for k, v in row.items() if k not in ("chosen", "rejected", "system") and isinstance(v, str) and v.strip()]
        fix = f"name the column that holds it: data.columns.prompt={texts[0]}" if texts else "add a 'prompt' column"
        raise _RowProblem(
            "'prompt' is missing (string chosen/rejected need a 'prompt' column, unless both start with "
            f"the same text, TRL's implicit prompt; these share none): {fix}",
            "leading_turns_differ",
        )
    for field, reply in (("chosen", chosen[cut:]), ("rejected", rejected[cut:])):
        if not reply.strip():
            raise _RowProblem(f"'{field}' is only whitespace after the text both replies start with (the implicit "
                              "prompt); every pair needs two non-empty replies", "empty")
    return Pair(chosen[:cut], chosen[cut:], rejected[cut:])


def _conversational_explicit(row: dict[str, Any]) -> Pair:
    raw = _get(row, "prompt")
    prompt = [{"role": "user", "content": raw}] if isinstance(raw, str) else _messages(raw, "prompt")
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise _RowProblem("'prompt' is empty; every pair needs a prompt", "empty")
    replies = []
    for field in ("chosen", "rejected"):
        messages = _messages(_get(row, field), field)
        first = 1
        if messages[: len(prompt)] == prompt:  # the reply repeats the prompt: keep what follows
            messages, first = messages[len(prompt) :], len(prompt) + 1
        reply = _reply(messages, field)
        _check_roles(_numbered("prompt", prompt) + _numbered(field, reply, first))
        replies.append(reply)
    return Pair(prompt, *replies)


def _conversations(row: dict[str, Any]) -> Pair:
    """``chosen``/``rejected`` hold whole conversations (or, with a prompt column, only replies)."""
    chosen = _messages(_get(row, "chosen"), "chosen")
    rejected = _messages(_get(row, "rejected"), "rejected")
    if chosen and chosen[0]["role"] == "assistant" and row.get("prompt") is not None:
        return _conversational_explicit(row)
    return _split_conversations(chosen, rejected)


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_NEEDS = 'hh-rlhf rows need chosen and rejected transcripts of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns'


def _looks_hh(text: Any) -> bool:
    return isinstance(text, str) and text.lstrip("\n").startswith("Human:") and "\n\nAssistant:" in text


def _hh_turns(text: str, field: str) -> list[Message]:
    body = "\n\n" + text.lstrip("\n")
    parts = _HH_MARKER.split(body)
    if parts[0].strip() or len(parts) < 3:
        raise _RowProblem(f"'{field}' does not start with a \"\\n\\nHuman: \" turn ({_HH_NEEDS})", "wrong_type")
    return [
        {"role": "user" if who == "Human" else "assistant", "content": content.strip()}
        for who, content in zip(parts[1::2], parts[2::2])
    ]


def _hh_rlhf(row: dict[str, Any]) -> Pair:
    _no_prompt(row, "hh-rlhf")
    chosen_text = _text(row, "chosen", hint="", needs=_HH_NEEDS)
    rejected_text = _text(row, "rejected", hint="", needs=_HH_NEEDS)
    if chosen_text == rejected_text:
        raise _Drop(DROP_SAME)
    chosen, rejected = _hh_turns(chosen_text, "chosen"), _hh_turns(rejected_text, "rejected")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise _RowProblem(f"'{field}' ends with a Human turn; the last turn must be the Assistant's reply", "roles_out_of_order")
        if len(turns) < 2:
            raise _RowProblem(f"'{field}' has no Human turn before the Assistant's reply", "roles_out_of_order")
    if chosen[:-1] != rejected[:-1]:
        differs = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), min(len(chosen), len(rejected)) - 1)
        raise _RowProblem(
            f"'rejected' turn {differs + 1} differs from turn {differs + 1} of 'chosen' ({len(chosen)} vs "
            f"{len(rejected)} turns): the prompt is every turn before the last Assistant turn and must be the "
            "same in both transcripts",
            "leading_turns_differ",
        )
    if not any(turn["content"] for turn in chosen[:-1]):
        raise _RowProblem("the Human turns before the Assistant's reply are empty; every pair needs a prompt", "empty")
    reply_c = _reply(chosen[-1:], "chosen")
    reply_r = _reply(rejected[-1:], "rejected")
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        _check_roles(_numbered(field, turns, noun="turn"))
    return Pair(chosen[:-1], reply_c, reply_r)


_AA_NEEDS = "align-anything rows need question, response_1, response_2 and overall_response"


def _align_anything(row: dict[str, Any]) -> Pair:
    question = _text(row, "question", hint="", needs=_AA_NEEDS)
    better = _get(row, "overall_response", _AA_NEEDS)
    try:
        better_id = int(better) if not isinstance(better, bool) and float(better) == int(float(better)) else None
    except (TypeError, ValueError, OverflowError):  # OverflowError: "inf"
        better_id = None
    if better_id not in (1, 2):
        raise _RowProblem(
            f"'overall_response' must be 1 or 2 (which of response_1 / response_2 is better), got {better!r}",
            "bad_value",
        )
    chosen = _text(row, f"response_{better_id}", hint="", needs=_AA_NEEDS)
    rejected = _text(row, f"response_{3 - better_id}", hint="", needs=_AA_NEEDS)
    prompt = [{"role": "user", "content": question}]
    return Pair(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}])


SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "observation": "tool", "tool": "tool", "function_call": "assistant",
}
"""LLaMA-Factory's role names -> chat roles (a function call is the assistant's, its result a tool message)."""


def _sharegpt_message(message: Any, field: str, label: str) -> Message:
    at = f"'{field}' {label}".rstrip()
    if not isinstance(message, dict):
        raise _RowProblem(f"{at} must be an object like {{\"from\": \"gpt\", \"value\": \"...\"}}, got {type(message).__name__}", "wrong_type")
    role = message.get("from", message.get("role"))
    content = message.get("value", message.get("content"))
    if not isinstance(role, str):
        raise _RowProblem(f"{at}: 'from' must be a string (human, gpt, system, observation, function_call), got {type(role).__name__ if role is not None else 'nothing'}", "missing_field" if role is None else "wrong_type")
    if role not in SHAREGPT_ROLES:
        raise _RowProblem(f"{at}: 'from' is '{role}', not one of {', '.join(SHAREGPT_ROLES)}; rename it", "unknown_role")
    if not isinstance(content, str):
        raise _RowProblem(f"{at}: 'value' must be a string, got {type(content).__name__ if content is not None else 'nothing'}", "missing_field" if content is None else "wrong_type")
    return {"role": SHAREGPT_ROLES[role], "content": content}


_SHAREGPT_NEEDS = "sharegpt rows need conversations (a list of from/value messages) and chosen/rejected message objects"


def _sharegpt(row: dict[str, Any]) -> Pair:
    conversations = _get(row, "conversations", _SHAREGPT_NEEDS)
    if not isinstance(conversations, list):
        raise _RowProblem(f"'conversations' must be a list of {{\"from\", \"value\"}} messages, got {type(conversations).__name__}", "wrong_type")
    prompt = [_sharegpt_message(m, "conversations", f"message {i}") for i, m in enumerate(conversations, start=1)]
    if not prompt or not any(m["content"].strip() for m in prompt):
        raise _RowProblem("'conversations' is empty; every pair needs a prompt", "empty")
    replies = []
    for field in ("chosen", "rejected"):
        value = _get(row, field, _SHAREGPT_NEEDS)
        items = value if isinstance(value, list) else [value]
        reply = [_sharegpt_message(m, field, f"message {i}" if isinstance(value, list) else "") for i, m in enumerate(items, start=1)]
        reply = _reply(reply, field)
        replies.append(reply)
        _check_roles(_numbered("conversations", prompt) + [(field, "", m["role"]) for m in reply])
    return Pair(prompt, *replies)


@dataclass(frozen=True)
class Shape:
    """A dataset shape: ``matches`` recognizes a row of it, ``convert`` reads any row."""

    name: str
    matches: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Any]], Pair]
    example: str
    """One row of this shape, as JSON (shown in the README and in errors)."""


def _first_role(value: Any) -> Any:
    return value[0].get("role") if isinstance(value, list) and value and isinstance(value[0], dict) else None


SHAPES: list[Shape] = [
    Shape(
        "sharegpt",
        lambda r: isinstance(r.get("conversations"), list) and isinstance(r.get("chosen"), (dict, list)),
        _sharegpt,
        '{"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"}, '
        '"rejected": {"from": "gpt", "value": "What?"}, "system": "Be kind."}',
    ),
    Shape(
        "align-anything",
        lambda r: all(k in r for k in ("question", "response_1", "response_2", "overall_response")),
        _align_anything,
        '{"question": "Hi", "response_1": "Hello!", "response_2": "What?", "overall_response": 1, ...}',
    ),
    Shape(
        "hh-rlhf",
        lambda r: r.get("prompt") is None and _looks_hh(r.get("chosen")),
        _hh_rlhf,
        '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: What?"}',
    ),
    Shape(
        "standard",
        lambda r: r.get("prompt") is not None and isinstance(r.get("chosen"), str),
        _standard,
        '{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}',
    ),
    Shape(
        "standard-implicit",
        lambda r: r.get("prompt") is None and isinstance(r.get("chosen"), str),
        _standard_implicit,
        '{"chosen": "The sky is blue.", "rejected": "The sky is green."}',
    ),
    Shape(
        "conversational",
        lambda r: r.get("prompt") is not None and isinstance(r.get("chosen"), list) and _first_role(r["chosen"]) == "assistant",
        _conversational_explicit,
        '{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], '
        '"rejected": [{"role": "assistant", "content": "What?"}]}',
    ),
    Shape(
        "ultrafeedback",
        lambda r: r.get("prompt") is not None and isinstance(r.get("chosen"), list) and "score_chosen" in r and "score_rejected" in r,
        _conversations,
        '{"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], '
        '"rejected": [..., {"role": "assistant", "content": "What?"}], "score_chosen": 8.0, "score_rejected": 3.0}',
    ),
    Shape(
        "conversational-implicit",
        lambda r: isinstance(r.get("chosen"), list),
        _conversations,
        '{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], '
        '"rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "What?"}]}',
    ),
]
SHAPES_BY_NAME = {shape.name: shape for shape in SHAPES}


DETECT_ROWS = 100


def detect_shape(rows: Sequence[dict[str, Any]]) -> Shape | None:
    """The shape most of the first :data:`DETECT_ROWS` ``rows`` have (a row's shape: the first in
    :data:`SHAPES` that recognizes it), ties to the earliest row's; None if none is recognized.
    A dataset whose first row is broken (a null prompt) is read as the rest of it is, and that row
    is reported with what is wrong with it."""
    votes: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows[:DETECT_ROWS]):
        shape = next((s for s in SHAPES if s.matches(row)), None)
        if shape is not None:
            votes[shape.name] += 1
            first_seen.setdefault(shape.name, i)
    if not votes:
        return None
    return SHAPES_BY_NAME[max(votes, key=lambda name: (votes[name], -first_seen[name]))]


def _undetected(row: dict[str, Any]) -> _RowProblem:
    """Explain why no shape in :data:`SHAPES` recognizes ``row``."""
    for field in ("chosen", "rejected"):
        try:
            _get(row, field)
        except _RowProblem as problem:
            return problem
    chosen = row["chosen"]
    if isinstance(chosen, str):
        return _RowProblem(
            f"'prompt' {'is null' if 'prompt' in row else 'is missing'} (string chosen/rejected need a "
            "'prompt' column; for an implicit prompt give chosen and rejected as lists of messages)",
            "missing_field",
        )
    return _RowProblem(f"'chosen' must be a string or a list of {{\"role\", \"content\"}} messages, got {type(chosen).__name__}", "wrong_type")


_FORMATS_HINT = (
    f"The formats dpokit reads are {', '.join(SHAPES_BY_NAME)} (see the README); map other column names "
    "with data.columns, e.g. data.columns={prompt: question, chosen: good, rejected: bad}"
)


# ----------------------------------------------------------------------------- normalize


def column_map(columns: Any) -> dict[str, str]:
    """``data.columns`` (a :class:`dpokit.config.Columns` or a dict) -> {target: source column}."""
    if columns is None:
        return {}
    items = columns.items() if isinstance(columns, dict) else vars(columns).items()
    return {target: source for target, source in items if source}


def _rename(row: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    if not mapping:
        return row
    out = {k: v for k, v in row.items() if k not in mapping.values()}
    for target, source in mapping.items():
        if source not in row:
            found = ", ".join(sorted(map(str, row))) or "none"
            raise _RowProblem(f"'{source}' is missing (data.columns.{target} names it; this row has columns: {found})", "missing_field")
        out[target] = row[source]
    return out


def _with_system(pair: Pair, row: dict[str, Any], system_prompt: str | None) -> Pair:
    """Give a conversational pair the row's ``system`` column, else ``system_prompt``, if it has none."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise _RowProblem(f"'system' must be a string (the system message), got {type(system).__name__}", "wrong_type")
    text = system if system and system.strip() else system_prompt
    if not text or not pair.is_chat or pair.prompt[0]["role"] == "system":
        return pair
    return Pair([{"role": "system", "content": text}] + pair.prompt, pair.chosen, pair.rejected)


def _check_unicode(pair: Pair) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (``"\\ud83d"``, half of an emoji cut
    in two, which JSON can carry) cannot be encoded, so no tokenizer can read it."""
    for field in ("prompt", "chosen", "rejected"):
        value = getattr(pair, field)
        texts = [value] if isinstance(value, str) else [m["content"] for m in value]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _RowProblem(
                    f"'{field}' is not valid Unicode text: it holds a lone surrogate ({text[e.start]!r} at character "
                    f"{e.start + 1}, e.g. half of an emoji cut in two); fix the text or remove the row",
                    "invalid_unicode",
                ) from None


def _meta(row: dict[str, Any]) -> dict[str, Any] | None:
    meta = {k: row[k] for k in META_FIELDS if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)}
    return meta or None


@dataclass
class Normalized:
    """What :func:`normalize` made of a dataset's rows."""

    pairs: list[Pair]
    dropped: dict[str, int]
    """Rows dropped per reason: ``chosen_equals_rejected`` always, problem reasons under ``skip``."""
    problems: Problems
    format: str
    """The shape's name (:data:`SHAPES`)."""
    detected: bool
    """True when the format was detected from the rows, False when ``data.format`` named it."""
    unused_system: dict[str, int] = field(default_factory=dict)
    """Rows whose ``system`` column was not used, per why: ``plain_text`` (no roles to give it),
    ``own_system_message`` (the prompt starts with a system message of its own)."""


def normalize(
    rows: Sequence[dict[str, Any]],
    origin: str,
    *,
    format: str | None = "auto",
    columns: Any = None,
    system_prompt: str | None = None,
    on_error: str = "raise",
    lines: Sequence[int] | None = None,
) -> Normalized:
    """Turn ``rows`` (all of one shape) into pairs, in row order.

    The shape is ``format`` (a name in :data:`SHAPES`), or, for ``"auto"``/None, the one most of
    the first :data:`DETECT_ROWS` readable rows have (:func:`detect_shape`): one bad first row does
    not decide it.
    ``columns`` renames columns first; ``system_prompt`` is the system message of conversational
    pairs with none. A bad row raises :class:`DataError` naming ``origin``, the row (``line N``
    when ``lines`` gives .jsonl line numbers, else ``row N``), the field and the fix; under
    ``on_error="skip"`` it is counted in ``dropped`` and ``problems`` instead. Rows whose chosen
    equals rejected are dropped and counted as ``chosen_equals_rejected``.
    """
    if not rows:
        raise DataError(f"{origin} has no rows")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    where = (lambda i: f"line {lines[i]}") if lines is not None else (lambda i: f"row {i + 1}")
    mapping = column_map(columns)
    problems = Problems()
    dropped: Counter[str] = Counter()
    unused_system: Counter[str] = Counter()

    def fail(i: int, problem: _RowProblem) -> None:
        message = f"{origin}, {where(i)}: {problem}"
        if on_error == "skip":
            problems.add(problem.reason, message)
            dropped[problem.reason] += 1
        else:
            raise DataError(f"{message}. {SKIP_HINT}") from None

    renamed: list[dict[str, Any] | None] = []
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise _RowProblem(f"expected an object with prompt/chosen/rejected, got {type(row).__name__}", "not_an_object")
            renamed.append(_rename(row, mapping))
        except _RowProblem as problem:
            renamed.append(None)
            fail(i, problem)

    if format and format != "auto":
        if format not in SHAPES_BY_NAME:
            raise DataError(f"data.format '{format}' is not a known format. {_FORMATS_HINT}")
        shape, detected = SHAPES_BY_NAME[format], False
    else:
        candidates = [r for r in renamed if r is not None]
        if not candidates:
            raise DataError(f"{origin}: no row could be read ({problems.total} skipped, first: {problems.examples[:1]})")
        shape = detect_shape(candidates)
        if shape is None:
            first = next(i for i, r in enumerate(renamed) if r is not None)
            raise DataError(f"{origin}, {where(first)}: {_undetected(candidates[0])}. {_FORMATS_HINT}")
        detected = True

    pairs: list[Pair] = []
    for i, row in enumerate(renamed):
        if row is None:
            continue
        try:
            converted = shape.convert(row)
            pair = _with_system(converted, row, system_prompt)
            _check_unicode(pair)
            template_kwargs = _row_template_kwargs(row, pair)
        except _RowProblem as problem:
            fail(i, problem)
            continue
        except _Drop as drop:
            dropped[str(drop)] += 1
            continue
        if pair.chosen == pair.rejected:
            dropped[DROP_SAME] += 1
            continue
        if pair is converted and (row.get("system") or "").strip():
            unused_system["own_system_message" if pair.is_chat else "plain_text"] += 1
        elif pair is converted and system_prompt and pair.is_chat:  # data.system_prompt not given to this pair
            unused_system["system_prompt_own_message"] += 1
        pairs.append(Pair(pair.prompt, pair.chosen, pair.rejected, meta=_meta(row), where=f"{origin}, {where(i)}",
                          template_kwargs=template_kwargs))
    return Normalized(pairs, dict(dropped), problems, shape.name, detected, dict(unused_system))


def to_pairs(rows: list[dict[str, Any]], origin: str, **options: Any) -> tuple[list[Pair], dict[str, int]]:
    """Normalize ``rows`` into pairs (see :func:`normalize`, which takes the same options).

    Returns the pairs in row order and the number of rows dropped per reason (reasons with no
    drops are absent). Raises :class:`DataError` naming ``origin``, the 1-based row number and
    the field for any invalid row.
    """
    result = normalize(rows, origin, **options)
    return result.pairs, result.dropped
