"""``dpokit compare``: replies of the reference and the policy to the same prompts, side by side.

Both models get the same prompts, the same :class:`~dpokit.generate.SamplingSettings` and the
same seed (reset before each model generates), one model in memory at a time. The result is
``compare.md`` (one section per prompt: the prompt, the reference's reply, the policy's reply)
and ``compare.jsonl`` (one row per prompt: ``prompt``, ``reference``, ``policy``), written into
the run directory, or ``--output-dir``.
"""

from __future__ import annotations

import gc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dpokit.config import ConfigError
from dpokit.generate import Prompt, SamplingSettings, generate_replies, generation_device, prompt_text
from dpokit.modeling import not_here
from dpokit.resolve import (
    ResolvedModel,
    default_reference,
    load_model,
    load_model_tokenizer,
    model_config,
    resolve_model,
    write_text_atomic,
)


@dataclass
class Comparison:
    """Replies of both models to ``prompts``, in order, and what produced them."""

    model: str
    reference: str
    settings: SamplingSettings
    prompts: list[Prompt]
    reference_replies: list[str]
    policy_replies: list[str]

    def rows(self) -> list[dict]:
        """One JSON-ready row per prompt: ``index``, ``prompt`` (as the models got it: plain text, or
        messages, which a prompt file's string or ``.txt`` line becomes), ``reference``, ``policy``."""
        return [
            {"index": i, "prompt": p, "reference": r, "policy": q}
            for i, (p, r, q) in enumerate(zip(self.prompts, self.reference_replies, self.policy_replies), start=1)
        ]

    def markdown(self) -> str:
        """One section per prompt with the prompt and both replies in fenced blocks."""
        out = [
            "# Reference vs policy",
            "",
            f"- policy: `{self.model}`",
            f"- reference: `{self.reference}`",
            f"- sampling: {self.settings.describe()}",
            "",
        ]
        for row in self.rows():
            text = prompt_text(row["prompt"])
            title = _title(row["prompt"])
            out += [f"## {row['index']}. {title[:80]}{'...' if len(title) > 80 else ''}", ""]
            out += ["**Prompt**", "", _fenced(text), "", "**Reference**", "", _fenced(row["reference"]), ""]
            out += ["**Policy**", "", _fenced(row["policy"]), ""]
        return "\n".join(out)


def _title(prompt) -> str:
    """A heading for ``prompt``: the first line of its last user message (what the reply answers;
    a conversation's first line is its system message or its first question), else of its text."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m["role"] == "user" and m["content"].strip()]
        text = users[-1] if users else prompt_text(prompt)
    else:
        text = prompt
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0].strip() if lines else "(empty prompt)"


def _fenced(text: str) -> str:
    """``text`` in a code fence longer than any backtick run inside it, so it shows verbatim."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text if text else '(empty reply)'}\n{fence}"


def _replies(model: ResolvedModel, dtype: str | None, prompts: list[Prompt], settings: SamplingSettings, batch_size: int,
             log: Callable[[str], object], template_kwargs: list[dict[str, Any] | None] | None) -> list[str]:
    """Load ``model``, generate one reply per prompt, free the model."""
    config = model_config(model, dtype)
    tokenizer = load_model_tokenizer(model, config)
    lm = load_model(model, config).to(generation_device())
    replies = generate_replies(lm, tokenizer, prompts, settings, batch_size, log, template_kwargs)
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return replies


def compare(
    model: str,
    prompts: list[Prompt],
    reference: str | None = None,
    settings: SamplingSettings = SamplingSettings(),
    batch_size: int = 8,
    dtype: str | None = None,
    log: Callable[[str], object] = print,
    template_kwargs: list[dict[str, Any] | None] | None = None,
) -> tuple[Comparison, ResolvedModel]:
    """Generate the reference's and then the policy's replies to ``prompts`` (their chat template
    variables: ``template_kwargs``, one per prompt).

    Returns the comparison and the resolved policy (see :func:`dpokit.resolve.output_dir`).
    """
    settings.check()
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    policy_model = resolve_model(model)
    ref_model = resolve_model(reference) if reference else default_reference(policy_model)
    if ref_model is None:
        raise ConfigError(f"{policy_model.name} is not a dpokit run{not_here(policy_model.name)}, so it has no default reference: pass --reference MODEL")
    log(f"compare: {len(prompts)} prompts, {settings.describe()}")
    log(f"compare: reference {ref_model.shown}")
    ref_replies = _replies(ref_model, dtype, prompts, settings, batch_size, log, template_kwargs)
    log(f"compare: policy {policy_model.shown}")
    policy_replies = _replies(policy_model, dtype, prompts, settings, batch_size, log, template_kwargs)
    return Comparison(policy_model.shown, ref_model.shown, settings, prompts, ref_replies, policy_replies), policy_model


def write_comparison(comparison: Comparison, folder: Path, suffix: str = "") -> tuple[Path, Path]:
    """Write ``compare{suffix}.md`` and ``compare{suffix}.jsonl`` into ``folder``, each atomically."""
    md, jsonl = folder / f"compare{suffix}.md", folder / f"compare{suffix}.jsonl"
    write_text_atomic(md, comparison.markdown())
    write_text_atomic(jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in comparison.rows()))
    return md, jsonl
