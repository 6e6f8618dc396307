"""Shared test fixtures. Each fixture builds what it needs itself: no network, no hub."""

from __future__ import annotations

import os
import random

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker gets its share of the cores, and so do the processes
    a test starts, instead of every worker running as many threads as there are cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- chat tokenizer

# Qwen2's ChatML template without tool calls: a default system message when none is given.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = (
    "the a an cat dog bird sky sea model answer question reply helpful assistant user system "
    "why how what is are was blue green red big small good bad better worse because light "
    "water sun moon learns from human preference pairs which one you I we they say said "
    "hello hi thanks please sure here explain short long story poem about write tell me"
).split()


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "?", "!", ", 42.", " (7)."]))
    return out


def build_chat_tokenizer():
    """A tiny byte-level BPE ``PreTrainedTokenizerFast`` with ChatML specials and chat template.

    Specials: ``<|endoftext|>`` (pad, id 0), ``<|im_start|>`` (id 1), ``<|im_end|>`` (eos, id 2).
    Byte-level, so any text encodes; no BOS is added.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_sentences(400), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


@pytest.fixture(scope="session")
def chat_tokenizer():
    """Session-wide tiny ChatML tokenizer (see :func:`build_chat_tokenizer`); do not mutate it."""
    return build_chat_tokenizer()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A tiny model and quickstart-shaped train/eval files for end-to-end runs (see runs.py)."""
    from runs import make_workdir

    return make_workdir(tmp_path_factory.mktemp("train"))


@pytest.fixture
def no_second_model(monkeypatch):
    """Training that loads a reference model fails the test (LoRA's reference is the policy with
    its adapters off)."""
    import dpokit.train

    def refuse(*args, **kwargs):
        raise AssertionError("a second model was loaded")

    monkeypatch.setattr(dpokit.train, "load_reference", refuse)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Reference tables and built models go to a fresh cache, not the user's."""
    import os

    previous = os.environ.get("DPOKIT_CACHE")
    os.environ["DPOKIT_CACHE"] = str(tmp_path_factory.mktemp("dpokit-cache"))
    yield
    if previous is None:
        os.environ.pop("DPOKIT_CACHE", None)
    else:
        os.environ["DPOKIT_CACHE"] = previous
