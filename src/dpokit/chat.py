"""``dpokit chat``: talk to a model in the terminal, through its chat template, tokens streamed.

Each line read is a user message, except the commands:

- ``/system TEXT``: set the system prompt (``/system`` alone removes it); the history stays;
- ``/reset``: clear the conversation (the system prompt stays);
- ``/save FILE``: write the conversation as a JSON list of ``{"role", "content"}`` messages
  (the system prompt first), ready to use as a prompt in ``dpokit compare --prompts``;
- ``/help``; ``/exit`` (end of input and Ctrl-C at the prompt exit too).

Lines come from stdin, so a pipe drives it as well as a terminal. When the conversation no
longer fits the model's context, the oldest exchanges are dropped (and that is said).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from dpokit.config import ConfigError
from dpokit.data.formats import Message
from dpokit.data.sources import DataError
from dpokit.generate import (
    SamplingSettings,
    context_limit,
    encode_prompt,
    generation_device,
    has_chat_template,
    prepare_for_generation,
    reply_tokens,
)
from dpokit.resolve import load_model, load_model_tokenizer, model_config, resolve_model, write_text_atomic

HELP = (
    "commands: /system TEXT (set the system prompt; /system alone removes it), /reset (clear the "
    "conversation), /save FILE (write it as JSON), /help, /exit"
)


@dataclass
class Conversation:
    """The system prompt (or None) and the user/assistant turns so far; ``template_kwargs``: the chat
    template's variables (a run's ``data.chat_template_kwargs``, e.g. ``enable_thinking``)."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)
    template_kwargs: dict[str, Any] | None = None

    def messages(self) -> list[Message]:
        """What the chat template renders: the system message first when there is one."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def _streamer(tokenizer, out: IO[str], stop_strings: list[str] | None = None):
    """A ``TextStreamer`` that writes the reply's text to ``out`` as it is generated, up to the first
    of ``stop_strings`` (text that could still become one is held back until it cannot)."""
    from transformers import TextStreamer

    markers = [m for m in stop_strings or [] if m]

    class _ToStream(TextStreamer):
        held, stopped = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.stopped:
                text, self.held = self.held + text, ""
                ends = [text.index(m) for m in markers if m in text]
                if ends:
                    text, self.stopped = text[:min(ends)], True
                elif not stream_end:  # keep back a tail that a marker may start with
                    keep = max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)
                    text, self.held = (text[:-keep], text[-keep:]) if keep else (text, "")
                out.write(text)
            if stream_end:
                out.write("\n")
            out.flush()

    return _ToStream(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _fit_context(conversation: Conversation, tokenizer, limit: int | None, max_new_tokens: int, out: IO[str]) -> list[int] | None:
    """Prompt ids of the conversation, dropping the oldest exchanges to leave room for the reply
    within ``limit`` positions; None when even the last message alone is too long (that message is
    removed, the earlier ones kept)."""
    ids = encode_prompt(conversation.messages(), tokenizer, conversation.template_kwargs)
    before = list(conversation.turns)
    dropped = 0
    while limit and len(ids) + max_new_tokens > limit and len(conversation.turns) > 1:
        del conversation.turns[:2]  # the oldest user message and its reply
        dropped += 1
        ids = encode_prompt(conversation.messages(), tokenizer, conversation.template_kwargs)
    if limit and len(ids) + max_new_tokens > limit:
        conversation.turns[:] = before[:-1]  # keep the conversation; refuse only the new message
        out.write(f"(that message is too long for the model's context of {limit} tokens with "
                  f"max_new_tokens {max_new_tokens}; say something shorter)\n")
        return None
    if dropped:
        out.write(f"(dropped the {dropped} oldest exchange(s) to fit the model's context of {limit} tokens)\n")
    return ids


def reply(model, tokenizer, conversation: Conversation, settings: SamplingSettings, out: IO[str]) -> str | None:
    """Generate and stream the assistant's answer to the conversation; append it and return it
    (None when the conversation could not fit the context)."""
    ids = _fit_context(conversation, tokenizer, context_limit(model.config), settings.max_new_tokens, out)
    if ids is None:
        return None
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), tokenizer=tokenizer,
                                streamer=_streamer(tokenizer, out, model.generation_config.stop_strings))
    text = tokenizer.decode(reply_tokens(output[0, len(ids):], model.generation_config, tokenizer), skip_special_tokens=True).strip()
    conversation.turns.append({"role": "assistant", "content": text})
    return text


def command(line: str, conversation: Conversation, out: IO[str]) -> bool:
    """Carry out one ``/command``; return False for ``/exit``."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name == "/exit":
        return False
    if name == "/system":
        conversation.system = arg or None
        out.write(f"(system prompt {'set' if arg else 'removed'})\n")
    elif name == "/reset":
        conversation.turns.clear()
        out.write("(conversation cleared)\n")
    elif name == "/save":
        _save(conversation, arg, out)
    elif name == "/help":
        out.write(HELP + "\n")
    else:
        out.write(f"unknown command {name}; {HELP}\n")
    return True


def _save(conversation: Conversation, path: str, out: IO[str]) -> None:
    if not path:
        out.write("usage: /save FILE\n")
        return
    try:
        write_text_atomic(path, json.dumps(conversation.messages(), indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        out.write(f"could not save to {path}: {e.strerror or e}; the conversation is kept\n")
        return
    n = len(conversation.messages())
    out.write(f"(saved {n} message{'' if n == 1 else 's'} to {path})\n")


def _read_line(stdin: IO[str], out: IO[str], interactive: bool) -> str | None:
    """The next line without its newline; None at end of input (or Ctrl-C at the prompt)."""
    try:
        if interactive:
            return input("> ")
        line = stdin.readline()
        return line.rstrip("\r\n") if line else None
    except (EOFError, KeyboardInterrupt):
        out.write("\n")
        return None


def chat_loop(model, tokenizer, conversation: Conversation, settings: SamplingSettings, stdin: IO[str], out: IO[str],
              interactive: bool = False) -> Conversation:
    """Read lines until ``/exit`` or end of input, answering each user message; returns the conversation."""
    prepare_for_generation(model, tokenizer, settings)
    torch.manual_seed(settings.seed)
    while (line := _read_line(stdin, out, interactive)) is not None:
        if not line.strip():
            continue
        if line.startswith("/"):
            if not command(line, conversation, out):
                break
            continue
        conversation.turns.append({"role": "user", "content": line})
        try:
            reply(model, tokenizer, conversation, settings, out)
        except KeyboardInterrupt:
            conversation.turns.pop()  # the unanswered message
            out.write("\n(interrupted; that message was dropped)\n")
        except DataError as e:  # the chat template refuses the conversation (a system message, say)
            conversation.turns.pop()
            out.write(f"({e}; that message was dropped, the conversation is kept)\n")
    return conversation


def chat(model: str, system: str | None = None, settings: SamplingSettings = SamplingSettings(), dtype: str | None = None,
         stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> Conversation:
    """Load ``model`` (any MODEL form, see :mod:`dpokit.resolve`) and chat on stdin/stdout."""
    settings.check()
    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    resolved = resolve_model(model)
    config = model_config(resolved, dtype)
    tokenizer = load_model_tokenizer(resolved, config)
    if not has_chat_template(tokenizer):
        raise ConfigError(
            f"the tokenizer of {resolved.shown} has no chat template: dpokit chat needs a chat/instruct model "
            "(or a tokenizer_config.json with a chat_template)"
        )
    variables = resolved.run_config.data.chat_template_kwargs if resolved.run_config else None  # as the run rendered its pairs
    if system:  # a template without a system role says so now, not at the first message
        try:
            encode_prompt([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}], tokenizer, variables)
        except DataError as e:
            raise ConfigError(f"--system: {e}") from None
    lm = load_model(resolved, config).to(generation_device())
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    out.write(f"chatting with {resolved.shown} ({settings.describe()}); {HELP}\n")
    return chat_loop(lm, tokenizer, Conversation(system=system or None, template_kwargs=variables), settings, stdin, out, interactive)
