"""dpokit vs TRL's DPOTrainer: the same model, pairs, order and hyper-parameters, side by side.

One invocation builds a random-init Qwen2 model and a one-word-one-token tokenizer, generates
multi-turn chat preference pairs with a realistic length profile, then trains each framework in
its own subprocess (separate peak memory) and prints a Markdown table (JSON to ``--output``)::

    python benchmarks/dpo_vs_trl.py                                  # CPU, float32, cpu-bench model
    python benchmarks/dpo_vs_trl.py --model-size tiny-test --steps 4 --warmup 1   # smoke test
    python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --model-size 0.5b
    python benchmarks/dpo_vs_trl.py --device cuda --dtype bfloat16 --model-size 0.5b --also-attn flex_attention dpokit_varlen

Columns: dpokit with its defaults (padding-free, prefix sharing, chunked log-probs, reference
log-probs precomputed before training), dpokit with a live reference model
(``precompute_ref_log_probs=false``), and TRL with its defaults (padded batches, a separate
reference model in memory, gradient checkpointing on). ``--ablation`` adds dpokit with each of its
other speed switches off (``prefix_sharing``, ``padding_free``, both, ``chunked_logps``), each
compared with dpokit's defaults; ``--ablation dpokit-full-logits`` (for one) adds only that column.
``--also-attn ATTN...`` adds dpokit's defaults under each named attention (GPU attentions side by side);
``--ablation dpokit-checkpointing`` adds dpokit with gradient checkpointing on (TRL's default), for
memory like for like; ``--ablation dpokit-compile`` dpokit with ``torch_compile: true``;
``--ablation dpokit-autocast`` dpokit with float32 weights under bfloat16 autocast (``dtype: float32,
bf16: true``, the precision dpokit recommends for full training; TRL keeps ``--dtype``'s weights).
``--pairs-per-step N`` (default 4) sets the micro-batch: a GPU needs more to be busy. ``--profile``
runs dpokit's defaults once more under torch.profiler (not timed) and writes its top operators;
``--profile dpokit-compile`` (any dpokit column) profiles that column's settings instead.
``--logging-steps 10`` has both frameworks log (a host copy of their metrics, on a GPU a
synchronisation) every 10 steps, their default, and times each step as its logged row's average.
``--recount FILE.json`` prints a saved result's share of the matmul peak with the output layer
counted only where both frameworks apply it (reply positions).
Needs ``pip install -e ".[bench]"`` (TRL).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LENGTH, BATCH, LR, BETA, MAX_GRAD_NORM = 512, 4, 1e-6, 0.1, 1.0  # BATCH: default pairs per step
MODEL_SIZES = {  # Qwen2 architecture, random weights
    "tiny-test": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=176, vocab_size=2048),
    "cpu-bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1408, vocab_size=32000),
    "cpu-bench-152k": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                           intermediate_size=1408, vocab_size=151936),  # cpu-bench with Qwen2.5's vocabulary
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),  # Qwen2.5-0.5B
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn start, end of turn (eos)
ROLE_WORDS = ["system", "user", "assistant"]
LETTERS = string.ascii_letters
CHAT_TEMPLATE = (  # ChatML as Qwen2 writes it, without a default system message
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MESSAGE_OVERHEAD, GENERATION_PROMPT = 5, 3  # <|im_start|> role \n ... <|im_end|> \n ; <|im_start|> assistant \n
COLUMNS = {"dpokit": "dpokit (defaults)", "dpokit-live": "dpokit (live ref)", "dpokit-no-prefix": "dpokit, prefix_sharing off",
           "dpokit-no-packing": "dpokit, padding_free off", "dpokit-padded": "dpokit, both off (padded)",
           "dpokit-full-logits": "dpokit, chunked_logps off",
           "dpokit-checkpointing": "dpokit, gradient checkpointing", "dpokit-compile": "dpokit, torch_compile",
           "dpokit-autocast": "dpokit, float32 weights + bf16 autocast", "trl": "TRL DPOTrainer",
           "trl-precompute": "TRL, precompute_ref_log_probs", "trl-no-cudnn": "TRL, sdpa kept off cuDNN",
           "profile": "a dpokit column under torch.profiler"}
DPOKIT_SWITCHES = {  # column -> the dpokit settings it changes from the defaults
    "dpokit": [], "dpokit-live": ["precompute_ref_log_probs=false"], "dpokit-no-prefix": ["prefix_sharing=false"],
    "dpokit-no-packing": ["padding_free=false"], "dpokit-padded": ["padding_free=false", "prefix_sharing=false"],
    "dpokit-full-logits": ["chunked_logps=false"], "dpokit-checkpointing": ["gradient_checkpointing=true"],
    "dpokit-compile": ["torch_compile=true"],
    "dpokit-autocast": ["dtype=float32", "bf16=true"],  # the precision dpokit recommends for full training on a GPU
}
ABLATION = ["dpokit-no-prefix", "dpokit-no-packing", "dpokit-padded", "dpokit-full-logits"]
NAMED_ONLY = ["dpokit-checkpointing", "dpokit-compile", "dpokit-autocast"]
"""Columns ``--ablation`` adds only when named: a setting turned on rather than a speed switch off."""
TRL_VARIANTS = {  # column -> what it changes from TRL's defaults
    "trl-precompute": "precompute_ref_log_probs=True: the reference scored once before training (timed as its precompute), "
                      "no reference model during the steps",
    "trl-no-cudnn": "trainer.train() under the sdpa backends dpokit trains with (cuDNN's sdpa left out; GPU only)",
}
"""TRL columns ``--trl-variants`` adds: TRL as a user who tunes it would run it."""


def is_trl(name: str) -> bool:
    return name == "trl" or name in TRL_VARIANTS


ATTN_COLUMN = "dpokit-attn-"
"""Prefix of the columns ``--also-attn`` adds: dpokit's defaults under another attention."""


def column_label(name: str) -> str:
    """A column's heading."""
    return f"dpokit, {name.removeprefix(ATTN_COLUMN)}" if name.startswith(ATTN_COLUMN) else COLUMNS[name]


# ----------------------------------------------------------------------------- model, tokenizer, data


def build_tokenizer(vocab_size: int):
    """Byte-level BPE tokenizer in which every synthetic word is exactly one token.

    Words are 3-letter strings (``aaa``, ``aab``, ...) written with a leading space, so each is one
    pre-token ``Ġxyz`` that merges build whole. It is a ``Qwen2Tokenizer`` because transformers 5
    loads any folder whose config.json says ``qwen2`` as one (rebuilding a byte-level BPE from the
    vocabulary and merges); a WordLevel tokenizer saved there would silently encode words to nothing.
    Returns (tokenizer, words).
    """
    import transformers
    from transformers import Qwen2Tokenizer

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["Ġ", "Ċ"] + list(LETTERS))}  # Ġ = space, Ċ = newline
    merges: list[tuple[str, str]] = []

    def pieces(word: str) -> list[str]:
        return [word[:i] for i in range(2, len(word) + 1) if word[:i] not in vocab]

    def add(word: str) -> None:  # the merges that build ``word`` left to right
        for piece in pieces(word):
            vocab[piece] = len(vocab)
            merges.append((piece[:-1], piece[-1]))

    words, budget = [], vocab_size - sum(len(w) - 1 for w in ROLE_WORDS)
    for letters in itertools.product(LETTERS, repeat=3):
        word = "".join(letters)
        if len(vocab) + len(pieces("Ġ" + word)) > budget:
            break
        add("Ġ" + word)
        words.append(word)
    for word in ROLE_WORDS:  # after the word merges, so they never take precedence inside a word
        add(word)
    specials = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, model_max_length=32768)
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=["<|im_start|>"], **specials)
    else:  # transformers 4 builds it from files
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("\n".join(" ".join(pair) for pair in merges) + "\n")
            tokenizer = Qwen2Tokenizer(vocab_file=f"{tmp}/vocab.json", merges_file=f"{tmp}/merges.txt",
                                       additional_special_tokens=["<|im_start|>"], **specials)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, words


def build_model(folder: Path, size: str, dtype: str, seed: int) -> tuple[dict, list[str]]:
    """Write a random-init Qwen2 model (fixed seed) and its tokenizer to ``folder``; return its shape, N and the words."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = MODEL_SIZES[size]
    tokenizer, words = build_tokenizer(min(shape["vocab_size"], 32000))
    config = Qwen2Config(**shape, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    embed = model.get_input_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not embed)  # includes an untied lm_head
    n_flop = body + model.get_output_embeddings().weight.numel() * config.tie_word_embeddings
    return {**shape, "parameters": sum(p.numel() for p in model.parameters()), "N_flop_params": n_flop,
            "tokenizer_size": len(tokenizer), "words": len(words)}, words


def make_pair(rng: random.Random, words: list[str]) -> dict:
    """One conversational pair. The templated prompt length is lognormal (median 100 tokens, sigma 0.73:
    p90 ~260, ~1.4% over 512), spread over 0-3 earlier user/assistant exchanges; reply content is
    lognormal (median 30 words, sigma 0.8: mean ~41, long tail), plus the ``<|im_end|>`` token."""
    text = lambda n: "".join(" " + rng.choice(words) for _ in range(max(1, n)))  # noqa: E731  one word = one token
    total = round(rng.lognormvariate(math.log(100), 0.73))
    exchanges = rng.choices([0, 1, 2, 3], weights=[60, 20, 12, 8])[0]
    n_msgs = 1 + 2 * exchanges
    budget = max(n_msgs, total - MESSAGE_OVERHEAD * n_msgs - GENERATION_PROMPT)
    weights = [rng.random() + 0.3 for _ in range(n_msgs)]
    sizes = [max(1, round(budget * w / sum(weights))) for w in weights]
    prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": text(n)} for i, n in enumerate(sizes)]
    reply = lambda: text(round(rng.lognormvariate(math.log(30), 0.8)))  # noqa: E731
    chosen, rejected = reply(), reply()
    while rejected == chosen:
        rejected = reply()
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def token_lengths(pairs: list[dict], tokenizer) -> list[tuple[int, int, int]]:
    """(templated prompt incl. generation prompt, chosen, rejected) token counts, replies with ``<|im_end|>``.

    Prompts are measured with the tokenizer and checked against the word count, so a tokenizer
    that does not give one token per word stops the benchmark instead of skewing it."""
    prompts = [tokenizer.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True) for p in pairs]
    measured = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    count = lambda msgs: sum(len(m["content"].split()) for m in msgs)  # noqa: E731
    expected = [count(p["prompt"]) + MESSAGE_OVERHEAD * len(p["prompt"]) + GENERATION_PROMPT for p in pairs]
    if measured != expected:
        sys.exit(f"tokenizer check failed: prompt tokens {measured[:5]} != words + template {expected[:5]}")
    return [(m, count(p["chosen"]) + 1, count(p["rejected"]) + 1) for m, p in zip(measured, pairs)]


def profile(lengths: list[tuple[int, int, int]]) -> dict:
    """Percentiles (tokens) of prompts, replies and longest sides: the length profile of the data."""
    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q / 100 * len(values)))]
    prompts = [p for p, _, _ in lengths]
    replies = [x for _, c, r in lengths for x in (c, r)]
    longest = [p + max(c, r) for p, c, r in lengths]
    return {"pairs": len(lengths),
            "prompt": {f"p{q}": pct(prompts, q) for q in (50, 90, 99)} | {"mean": round(statistics.mean(prompts), 1),
                                                                       "share_over_512": round(sum(p > 512 for p in prompts) / len(prompts), 4)},
            "reply": {f"p{q}": pct(replies, q) for q in (50, 90, 99)} | {"mean": round(statistics.mean(replies), 1)},
            "prompt_plus_longest_reply": {f"p{q}": pct(longest, q) for q in (50, 90, 99)}}


def make_data(workdir: Path, tokenizer, words: list[str], num_pairs: int, seed: int) -> dict:
    """Generate a pool of pairs, keep the first ``num_pairs`` whose prompt fits ``MAX_LENGTH`` (TRL drops the
    others, so both get the same pairs), and write them for TRL (training order) and for dpokit (permuted so
    that dpokit's epoch-0 shuffle visits them in that same order)."""
    from dpokit.data.batching import epoch_order

    rng = random.Random(seed)
    pool = [make_pair(rng, words) for _ in range(max(2000, 2 * num_pairs))]
    lengths = token_lengths(pool, tokenizer)
    keep = [i for i, (p, _, _) in enumerate(lengths) if p < MAX_LENGTH][:num_pairs]
    pairs, used = [pool[i] for i in keep], [lengths[i] for i in keep]
    order = epoch_order(num_pairs, seed, 0)  # dpokit trains on file row order[k] at position k
    dpokit_rows = [None] * num_pairs
    for k, row in enumerate(order):
        dpokit_rows[row] = pairs[k]
    assert [dpokit_rows[i] for i in order] == pairs
    for name, rows in (("trl.jsonl", pairs), ("dpokit.jsonl", dpokit_rows)):
        with open(workdir / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return {"generated": profile(lengths), "used": profile(used), "used_lengths": used,
            "dropped_prompt_over_max_length": sum(p >= MAX_LENGTH for p, _, _ in lengths[: keep[-1] + 1])}


def matmul_flops(device: str, dtype: str, seconds: float = 1.0) -> dict:
    """Measured FLOP/s of a large square matmul (CPU: 2048, GPU: 8192) in ``dtype``: the machine's reference peak."""
    import torch

    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device).to(getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(1 if device == "cpu" else 10):
            a @ b
            iters += 1
        sync()
    return {"size": n, "dtype": dtype, "flops_per_s": 2 * n**3 * iters / (time.perf_counter() - start)}


# ----------------------------------------------------------------------------- the children


def peak_memory(device: str) -> int:
    """Peak bytes of this process: GPU memory allocated by torch, or the CPU resident set (ru_maxrss),
    as dpokit's logged rows count them (:func:`dpokit.metrics.peak_memory_bytes`)."""
    import torch

    from dpokit.metrics import peak_memory_bytes

    device_peak, host_peak = peak_memory_bytes(torch.device(device))
    return device_peak if device.startswith("cuda") else host_peak


def run_dpokit(spec: dict, name: str, workdir: Path) -> dict:
    """Train with dpokit's public API (defaults, except the shared settings and the column's
    :data:`DPOKIT_SWITCHES`); timings from metrics.jsonl."""
    from dpokit.config import load_config
    from dpokit.train import train

    os.environ["DPOKIT_CACHE"] = str(workdir / f"cache-{name}")  # no reference/data cache hit from another run
    column = spec["profile_column"] if name == "profile" else name  # the settings this run takes
    overrides = [
        f"model.name_or_path={spec['model_dir']}", f"dtype={spec['dtype']}", f"data.train={workdir / 'dpokit.jsonl'}",
        f"output_dir={workdir / ('run-' + name)}", f"max_length={MAX_LENGTH}", f"learning_rate={LR}", f"beta={BETA}",
        "loss_type=[sigmoid]", f"max_steps={spec['steps']}", f"per_device_train_batch_size={spec['batch']}",
        "gradient_accumulation_steps=1", f"max_grad_norm={MAX_GRAD_NORM}", f"logging_steps={spec['logging_steps']}", f"seed={spec['seed']}",
        "progress_bar=false", "save_steps=null", "report_to=[none]",
        *DPOKIT_SWITCHES.get(column, []),
    ]
    attn = column.removeprefix(ATTN_COLUMN) if column.startswith(ATTN_COLUMN) else spec.get("dpokit_attn") or spec["attn"]
    if attn:
        overrides.append(f"attn_implementation={attn}")
        if "flash" in attn:
            overrides.append("prefix_sharing=false")  # flash-attention takes no custom mask
    config = load_config(None, overrides)
    log = io.StringIO()  # dpokit prints its precompute time
    try:
        with contextlib.redirect_stdout(log), profiled(spec, workdir) if name == "profile" else contextlib.nullcontext():
            run_dir = train(config)
    finally:
        print(log.getvalue())
    found = re.search(r"reference: train log-probs of \d+ pairs computed in ([\d.]+)s", log.getvalue())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "seconds" in r]
    t = config.training
    precompute = t.precompute_ref_log_probs
    seconds, tokens = per_step(rows)
    return {"step_seconds": seconds, "step_tokens": tokens, "logging_steps": spec["logging_steps"],
            "ref_tokens_per_step": tokens if not precompute else [0] * len(tokens),
            "precompute_seconds": float(found.group(1)) if found else 0.0, "loss": [r["loss"] for r in rows],
            "settings": {"padding_free": t.padding_free, "prefix_sharing": t.prefix_sharing,
                         "precompute_ref_log_probs": t.precompute_ref_log_probs, "chunked_logps": t.chunked_logps,
                         "logps_chunk_size": t.logps_chunk_size,
                         "gradient_checkpointing": t.gradient_checkpointing, "torch_compile": t.torch_compile,
                         "attn_implementation": config.model.attn_implementation, "dtype": config.model.dtype, "bf16": t.bf16}}


def per_step(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Each step's seconds and tokens from dpokit's logged rows: a row covers the steps since the previous
    one (``logging_steps``), each of which gets the row's average."""
    seconds, tokens, previous = [], [], 0
    for row in rows:
        n = row["step"] - previous
        seconds += [row["seconds"] / n] * n
        tokens += [row["tokens"] / n if n > 1 else row["tokens"]] * n
        previous = row["step"]
    return seconds, tokens


def window_averages(values: list[float], every: int) -> list[float]:
    """``values`` with each run of ``every`` (the last one possibly shorter) replaced by its average."""
    out = []
    for start in range(0, len(values), every):
        window = values[start:start + every]
        out += [sum(window) / len(window)] * len(window)
    return out


@contextlib.contextmanager
def profiled(spec: dict, workdir: Path, active: int = 5):
    """torch.profiler over ``active`` optimizer steps after the warm-up (one profiler step per optimizer
    step, through a global optimizer hook); writes the top operators by self device time and by self
    host time to ``profile.txt``."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = spec["device"].startswith("cuda")
    wait = max(spec["warmup"] - 1, 0)
    active = max(1, min(active, spec["steps"] - wait - 1))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=wait, warmup=1, active=active, repeat=1))
    hook = register_optimizer_step_post_hook(lambda *args: prof.step())
    try:
        with prof:
            yield
    finally:
        hook.remove()
    table = prof.key_averages()
    sections = [("self_cuda_time_total", "self device time")] if cuda else []
    sections.append(("self_cpu_time_total", "self host time"))
    text = [f"torch.profiler over {active} optimizer steps after step {wait + 1} "
            f"({column_label(spec['profile_column'])})\n"]
    for key, title in sections:
        text += [f"## by {title}", table.table(sort_by=key, row_limit=30, max_name_column_width=70), ""]
    (workdir / "profile.txt").write_text("\n".join(text))


def run_trl(spec: dict, workdir: Path, name: str = "trl") -> dict:
    """Train with TRL's DPOTrainer (defaults, except the shared settings and sequential sampling; a
    :data:`TRL_VARIANTS` column changes what it says)."""
    from contextlib import nullcontext

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpokit.modeling import sdpa_without_cudnn

    class StepTimer(TrainerCallback):
        """Step time from the end of one step to the end of the next (batch assembly and TRL's logging included;
        dpokit's step time stops before it builds its logged row, a few milliseconds), and on_step_begin -> on_step_end."""

        def __init__(self):
            self.ends, self.inner, self.begin = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())
            self.inner.append(self.ends[-1] - self.begin)

    class CountingDPOTrainer(DPOTrainer):
        """Records the non-padding and padded tokens of every micro-batch, and the time of the reference
        precompute (which TRL runs while the trainer is built)."""

        bench_precompute = 0.0

        def training_step(self, model, inputs, *args, **kwargs):
            self.bench_tokens.append((int(inputs["attention_mask"].sum()), inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            if self.args.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            self.bench_precompute += time.perf_counter() - start
            return out

    rows = [json.loads(line) for line in (workdir / "trl.jsonl").read_text().splitlines()]
    model_kwargs = {"dtype": spec["dtype"]} | ({"attn_implementation": spec["attn"]} if spec["attn"] else {})
    args = DPOConfig(
        output_dir=str(workdir / "run-trl"), max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH,
        max_grad_norm=MAX_GRAD_NORM, logging_steps=spec["logging_steps"], save_strategy="no", eval_strategy="no", report_to="none",
        seed=spec["seed"], train_sampling_strategy="sequential", bf16=spec["dtype"] == "bfloat16",
        use_cpu=spec["device"] == "cpu", model_init_kwargs=model_kwargs, disable_tqdm=True,
        precompute_ref_log_probs=name == "trl-precompute",
        **({_checkpointing_field(DPOConfig): False} if spec["trl_no_gradient_checkpointing"] else {}),
    )
    timer = StepTimer()
    backends = sdpa_without_cudnn() if name == "trl-no-cudnn" else nullcontext()
    with backends:
        trainer = CountingDPOTrainer(model=spec["model_dir"], args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=AutoTokenizer.from_pretrained(spec["model_dir"]), callbacks=[timer])
        trainer.bench_tokens = []
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    settings = {k: getattr(args, k) for k in ("padding_free", "precompute_ref_log_probs", "gradient_checkpointing", "bf16",
                                              "pad_to_multiple_of", "truncation_mode", "train_sampling_strategy", "disable_dropout")}
    reference = "log-probs precomputed, model not kept" if args.precompute_ref_log_probs else "separate copy loaded from the same folder"
    settings.update(optim=args.optim.value, lr_scheduler_type=args.lr_scheduler_type.value, ref_model=reference,
                    attn_implementation=trainer.model.config._attn_implementation,
                    sdpa_backends="cuDNN left out" if name == "trl-no-cudnn" else "torch's defaults")
    every = spec["logging_steps"]  # steps between syncs: time them as dpokit's logged rows are timed
    return {"step_seconds": window_averages([b - a for a, b in zip(timer.ends, timer.ends[1:])], every),
            "step_inner_seconds": window_averages(timer.inner, every), "logging_steps": every,
            "step_tokens": [t for t, _ in trainer.bench_tokens], "padded_tokens": [p for _, p in trainer.bench_tokens],
            "ref_tokens_per_step": [0 if args.precompute_ref_log_probs else t for t, _ in trainer.bench_tokens],
            "precompute_seconds": trainer.bench_precompute, "loss": losses,
            "settings": settings}


def _checkpointing_field(config_class) -> str:
    """transformers 5.23 renamed ``gradient_checkpointing`` (still TRL's default True) to ``activation_checkpointing``."""
    return "activation_checkpointing" if "activation_checkpointing" in config_class.__dataclass_fields__ else "gradient_checkpointing"


def child_main(name: str, workdir: Path) -> None:
    """Entry point of a child process: train one framework, write ``result-<name>.json``."""
    spec = json.loads((workdir / "spec.json").read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    result = run_trl(spec, workdir, name) if is_trl(name) else run_dpokit(spec, name, workdir)
    result.update(process_seconds=time.perf_counter() - start, peak_memory_bytes=peak_memory(spec["device"]),
                  threads=torch.get_num_threads())
    (workdir / f"result-{name}.json").write_text(json.dumps(result))


def launch(name: str, workdir: Path, spec: dict) -> dict | None:
    """Run one framework in its own process (so peak memory is its own); on failure print its log tail and
    return None, so the other columns of the invocation still run."""
    env = dict(os.environ)
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = workdir / f"log-{name}.txt"
    print(f"running {column_label(name)} ... (log: {log})", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        command = [sys.executable, __file__, "--child", name, "--workdir", str(workdir)]
        rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        print(f"{name} failed (exit {rc}); last lines of {log}:\n" + "".join(log.read_text().splitlines(True)[-40:]),
              file=sys.stderr, flush=True)
        return None
    return json.loads((workdir / f"result-{name}.json").read_text())


# ----------------------------------------------------------------------------- report


def summarize(r: dict, warmup: int, n_flop: float, peak: float, batch: int, head_params: float, scored: list[int]) -> dict:
    """Median step time after warm-up, throughput, achieved FLOP/s (6N per trained token, 2N per reference
    token, attention and recomputation not counted) and the end-to-end train time (precompute + all steps);
    also the FLOP/s counting the output layer's ``head_params`` only at ``scored`` (each step's reply
    positions, :func:`scored_positions`), where both frameworks apply it, instead of at every token as N does."""
    steps = list(range(warmup, len(r["step_seconds"])))
    med = statistics.median(r["step_seconds"][i] for i in steps)
    flops = [6 * n_flop * t + 2 * n_flop * ref for t, ref in zip(r["step_tokens"], r["ref_tokens_per_step"])]
    step_flops = statistics.median(flops[i] / r["step_seconds"][i] for i in steps)
    body = n_flop - head_params
    needed = [6 * (body * t + head_params * n) + 2 * (body * ref + head_params * n * (ref > 0))
              for t, ref, n in zip(r["step_tokens"], r["ref_tokens_per_step"], scored)]
    at_scored = statistics.median(needed[i] / r["step_seconds"][i] for i in steps) / peak
    precompute_flops = 2 * n_flop * sum(r["step_tokens"]) if r["precompute_seconds"] else 0.0  # one epoch
    train_wall = r["precompute_seconds"] + sum(r["step_seconds"])
    padded = r.get("padded_tokens") or (r["step_tokens"] if r["settings"].get("padding_free") else None)
    return {"median_step_s": med, "pairs_per_s": batch / med, "tokens_per_step": statistics.mean(r["step_tokens"]),
            "padded_tokens_per_step": statistics.mean(padded) if padded else float("nan"),
            "tokens_per_s": statistics.median(r["step_tokens"][i] / r["step_seconds"][i] for i in steps),
            "precompute_s": r["precompute_seconds"], "train_wall_s": train_wall, "process_wall_s": r["process_seconds"],
            "peak_memory_mib": r["peak_memory_bytes"] / 2**20, "step_tflops": step_flops / 1e12,
            "step_fraction_of_matmul": step_flops / peak, "end_to_end_fraction_of_matmul": (sum(flops) + precompute_flops) / train_wall / peak,
            "step_fraction_of_matmul_head_at_replies": at_scored}


def summarize_columns(results: dict, model: dict, lengths: list[tuple[int, int, int]], steps: int, warmup: int,
                      batch: int, peak: float) -> dict:
    """:func:`summarize` of each column of ``results``, its output layer counted at its reply positions."""
    head = model["vocab_size"] * model["hidden_size"]
    return {name: summarize(r, warmup, model["N_flop_params"], peak, batch, head, scored_positions(lengths, steps, batch, is_trl(name)))
            for name, r in results.items()}


def scored_positions(lengths: list[tuple[int, int, int]], steps: int, batch: int, trl: bool) -> list[int]:
    """Each step's positions where the output layer runs: one per reply token on each side (TRL also
    scores the newline ChatML writes after ``<|im_end|>``), a reply cut at ``MAX_LENGTH`` after its
    prompt (dpokit may drop old turns instead for the ~1% of pairs over it: approximate there)."""
    extra = 1 if trl else 0
    return [sum(min(c + extra, MAX_LENGTH - p) + min(q + extra, MAX_LENGTH - p) for p, c, q in lengths[s * batch:(s + 1) * batch])
            for s in range(steps)]


def check_order(results: dict, lengths: list[tuple[int, int, int]], steps: int, batch: int) -> dict:
    """Compare each step's token count with the count its intended pairs give: TRL processes
    ``min(p+c+1, L) + min(p+r+1, L)`` tokens per pair, dpokit (prefix sharing) ``p + c + r`` for untruncated pairs.
    dpokit's counts are compared by logged row (``--logging-steps``), each row summing its steps."""
    def expected(name: str, r: dict, s: int) -> int | None:
        group = lengths[s * batch:(s + 1) * batch]
        if is_trl(name):  # TRL also trains on the newline ChatML writes after <|im_end|>
            return sum(min(p + c + 1, MAX_LENGTH) + min(p + q + 1, MAX_LENGTH) for p, c, q in group)
        if all(p + max(c, q) <= MAX_LENGTH for p, c, q in group):  # dpokit truncated none of them
            return sum((1 if r["settings"]["prefix_sharing"] else 2) * p + c + q for p, c, q in group)
        return None

    out = {}
    for name, r in results.items():
        every = 1 if is_trl(name) else r.get("logging_steps", 1)  # dpokit's counts come by logged row
        matched = checked = 0
        for start in range(0, steps, every):
            window = range(start, min(start + every, steps))
            expect = [expected(name, r, s) for s in window]
            if None in expect:
                continue
            checked += 1
            matched += round(sum(r["step_tokens"][s] for s in window)) == sum(expect)
        out[name] = f"{matched}/{checked} {'steps' if every == 1 else 'logged rows'} match"
    return out


def recount(path: Path) -> None:
    """Print a saved result's achieved share of the matmul peak again, with the output layer counted at
    reply positions only (results written before that row existed). The pairs are generated again from
    the run's seed, and checked against each step's saved token count."""
    report = json.loads(path.read_text())
    a, model = report["args"], report["model"]
    a.setdefault("pairs_per_step", BATCH)  # results from before --pairs-per-step
    tokenizer, words = build_tokenizer(min(model["vocab_size"], 32000))
    with tempfile.TemporaryDirectory() as tmp:
        lengths = make_data(Path(tmp), tokenizer, words, a["steps"] * a["pairs_per_step"], a["seed"])["used_lengths"]
    print(f"{path}: the same pairs again ({', '.join(f'{n}: {v}' for n, v in check_order(report['raw'], lengths, a['steps'], a['pairs_per_step']).items())})")
    summaries = summarize_columns(report["raw"], model, lengths, a["steps"], a["warmup"], a["pairs_per_step"],
                                  report["matmul"]["flops_per_s"])
    for name, again in summaries.items():
        print(f"  {column_label(name)}: {again['step_fraction_of_matmul']:.1%} of the matmul peak (N at every token), "
              f"{again['step_fraction_of_matmul_head_at_replies']:.1%} (output layer at reply positions only)")


def table(summaries: dict, device: str) -> str:
    """The Markdown comparison table."""
    mem = "peak GPU memory allocated (MiB)" if device.startswith("cuda") else "peak RSS (MiB)"
    rows = [("median s/step (after warm-up)", "median_step_s", "{:.3f}"), ("pairs/s", "pairs_per_s", "{:.2f}"),
            ("tokens processed / step (mean, non-padding)", "tokens_per_step", "{:.0f}"),
            ("tokens incl. padding / step (mean)", "padded_tokens_per_step", "{:.0f}"), ("tokens/s (median)", "tokens_per_s", "{:.0f}"),
            ("reference precompute (s)", "precompute_s", "{:.1f}"), ("total wall: precompute + all steps (s)", "train_wall_s", "{:.1f}"),
            ("process wall incl. loading/saving (s)", "process_wall_s", "{:.1f}"), (mem, "peak_memory_mib", "{:.0f}"),
            ("achieved TFLOP/s (median step)", "step_tflops", "{:.3f}"), ("% of matmul FLOP/s (median step)", "step_fraction_of_matmul", "{:.1%}"),
            ("% of matmul FLOP/s (end to end)", "end_to_end_fraction_of_matmul", "{:.1%}"),
            ("% of matmul FLOP/s, output layer at reply positions only (median step)", "step_fraction_of_matmul_head_at_replies", "{:.1%}")]
    names = list(summaries)
    lines = ["| | " + " | ".join(column_label(n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, key, fmt in rows:
        lines.append(f"| {label} | " + " | ".join("-" if math.isnan(summaries[n][key]) else fmt.format(summaries[n][key])
                                                  for n in names) + " |")
    for peer in (n for n in names if is_trl(n)):  # TRL's defaults, and each tuned TRL column
        trl, which = summaries[peer], "TRL" if peer == "trl" else column_label(peer)
        ratios = [(f"speedup vs {which} (its s/step ÷ s/step)", lambda s: trl["median_step_s"] / s["median_step_s"]),
                  (f"end-to-end speedup vs {which} (total wall)", lambda s: trl["train_wall_s"] / s["train_wall_s"]),
                  (f"memory ratio (peak ÷ {which} peak)", lambda s: s["peak_memory_mib"] / trl["peak_memory_mib"])]
        for label, fn in ratios:
            lines.append(f"| {label} | " + " | ".join(f"{fn(summaries[n]):.2f}x" for n in names) + " |")
    if any(n in ABLATION or n in NAMED_ONLY or n.startswith(ATTN_COLUMN) for n in names):
        base = summaries["dpokit"]
        ratios = [("s/step ÷ dpokit defaults' s/step", lambda s: s["median_step_s"] / base["median_step_s"]),
                  ("peak memory ÷ dpokit defaults' peak", lambda s: s["peak_memory_mib"] / base["peak_memory_mib"])]
        for label, fn in ratios:
            lines.append(f"| {label} | " + " | ".join(f"{fn(summaries[n]):.2f}x" for n in names) + " |")
    return "\n".join(lines)


def machine_info(device: str) -> dict:
    """CPU model, cores, GPU, library versions, date and the exact command line."""
    import importlib.metadata as md
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None, "python": platform.python_version(),
            **{pkg: md.version(pkg) for pkg in ("torch", "transformers", "trl", "accelerate", "dpokit") if _installed(pkg)},
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": shlex.join([sys.executable, *sys.argv])}


def _installed(pkg: str) -> bool:
    import importlib.metadata as md
    try:
        return bool(md.version(pkg))
    except md.PackageNotFoundError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per framework")
    ap.add_argument("--pairs-per-step", type=int, default=BATCH,
                    help=f"pairs per optimizer step, one micro-batch (default {BATCH}; a GPU needs more to be busy)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--logging-steps", type=int, default=1,
                    help="both frameworks log (and so copy their metrics to the host) every this many steps; a step's "
                         "time is then its logged row's average (default 1: per-step times; on a GPU each log is a "
                         "synchronisation, so 10, both frameworks' default, times them as they train)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--model-size", default="cpu-bench", choices=list(MODEL_SIZES))
    ap.add_argument("--attn", default=None, help="attention implementation for both (default: transformers decides, sdpa)")
    ap.add_argument("--dpokit-attn", default=None,
                    help="dpokit's attention only (e.g. flex_attention: prefix sharing with a BlockMask; dpokit_varlen: "
                         "torch's flash-attention varlen kernel over regrouped rows, CUDA), default --attn")
    ap.add_argument("--also-attn", nargs="+", default=[], metavar="ATTN",
                    help="also run dpokit's defaults under each of these attentions (e.g. sdpa flex_attention dpokit_varlen), "
                         "each compared with dpokit's defaults and TRL in the same invocation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-live", action="store_true", help="skip the dpokit column with a live reference model")
    ap.add_argument("--ablation", nargs="*", choices=[*ABLATION, *NAMED_ONLY], default=None, metavar="COLUMN",
                    help="also run dpokit with each speed switch off: prefix_sharing, padding_free, both, chunked_logps "
                         f"(all four, or only the columns named: {', '.join(ABLATION)}); named only: dpokit-checkpointing "
                         "(gradient checkpointing on, as TRL's default), dpokit-compile (torch_compile=true), "
                         "dpokit-autocast (float32 weights, bfloat16 autocast)")
    ap.add_argument("--trl-no-gradient-checkpointing", action="store_true", help="TRL defaults to gradient checkpointing on; turn it off")
    ap.add_argument("--trl-variants", nargs="*", choices=list(TRL_VARIANTS), default=[], metavar="COLUMN",
                    help="TRL columns beside its defaults: " + "; ".join(f"{k}: {v}" for k, v in TRL_VARIANTS.items()))
    ap.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<date>-<device>.json)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the temp folder (model, data, logs of each run)")
    ap.add_argument("--profile", nargs="?", const="dpokit", default=None, metavar="COLUMN",
                    help="after the timed columns, run dpokit's defaults (or the dpokit column named, e.g. dpokit-compile) "
                         "once more under torch.profiler and write the top operators (device and host time) to "
                         "<output>-profile.txt")
    ap.add_argument("--recount", nargs="+", type=Path, default=None, metavar="JSON",
                    help="print saved results' share of the matmul peak with the output layer counted at reply positions "
                         "only (for results written before that row), and exit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a.child, Path(a.workdir))
    if a.recount:
        for path in a.recount:
            recount(path)
        return 0
    if a.warmup >= a.steps:
        sys.exit("--warmup must be smaller than --steps")
    if a.logging_steps < 1 or a.warmup % a.logging_steps:
        sys.exit(f"--warmup ({a.warmup}) must be a multiple of --logging-steps ({a.logging_steps}): "
                 "a logged row's steps are timed together")
    if a.profile and a.profile not in DPOKIT_SWITCHES and not a.profile.startswith(ATTN_COLUMN):
        sys.exit(f"--profile takes a dpokit column ({', '.join(DPOKIT_SWITCHES)}, or {ATTN_COLUMN}ATTN), not {a.profile}")

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    workdir = Path(tempfile.mkdtemp(prefix="dpo_vs_trl-"))
    model, words = build_model(workdir / "model", a.model_size, a.dtype, a.seed)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")  # as both frameworks will load it
    data = make_data(workdir, tokenizer, words, a.steps * a.pairs_per_step, a.seed)
    spec = {"model_dir": str(workdir / "model"), "dtype": a.dtype, "device": a.device, "attn": a.attn, "dpokit_attn": a.dpokit_attn, "steps": a.steps, "batch": a.pairs_per_step, "warmup": a.warmup,
            "logging_steps": a.logging_steps,
            "seed": a.seed, "threads": a.threads, "trl_no_gradient_checkpointing": a.trl_no_gradient_checkpointing,
            "profile_column": a.profile or "dpokit"}
    (workdir / "spec.json").write_text(json.dumps(spec))
    peak = matmul_flops(a.device, a.dtype)
    names = (["dpokit"] + ([] if a.skip_live else ["dpokit-live"]) + ([] if a.ablation is None else a.ablation or ABLATION)
             + [ATTN_COLUMN + attn for attn in a.also_attn] + ([] if a.skip_trl else ["trl", *a.trl_variants]))
    results = {n: launch(n, workdir, spec) for n in names}
    failed = [n for n, r in results.items() if r is None]
    if "dpokit" in failed:
        sys.exit("dpokit (defaults) failed: every comparison is against it (log above)")
    names = [n for n in names if n not in failed]
    results = {n: results[n] for n in names}
    summaries = summarize_columns(results, model, data["used_lengths"], a.steps, a.warmup, a.pairs_per_step, peak["flops_per_s"])
    order = check_order(results, data["used_lengths"], a.steps, a.pairs_per_step)

    g, u = data["generated"], data["used"]
    print(f"\n## dpokit vs TRL DPOTrainer: {a.model_size} ({model['parameters'] / 1e6:.1f}M parameters), {a.device}, {a.dtype}\n")
    print(f"data (tokens): generated {g['pairs']} pairs: prompt p50/p90/p99 {g['prompt']['p50']}/{g['prompt']['p90']}/{g['prompt']['p99']}, "
          f"{g['prompt']['share_over_512']:.1%} over 512; reply mean {g['reply']['mean']}, p50/p90/p99 {g['reply']['p50']}/{g['reply']['p90']}/{g['reply']['p99']}")
    print(f"used {u['pairs']} pairs (first with prompt < {MAX_LENGTH}; {data['dropped_prompt_over_max_length']} skipped, as TRL drops them): "
          f"prompt p50/p90 {u['prompt']['p50']}/{u['prompt']['p90']}, reply mean {u['reply']['mean']}, prompt+longest reply p90 {u['prompt_plus_longest_reply']['p90']}")
    print(f"{a.steps} steps x {a.pairs_per_step} pairs, max_length {MAX_LENGTH}, lr {LR}, beta {BETA}, sigmoid, max_grad_norm {MAX_GRAD_NORM}, "
          f"median over steps {a.warmup + 1}..{a.steps}"
          + (f" (each step its logged row's average, logging every {a.logging_steps})" if a.logging_steps > 1 else "")
          + f"; same pairs in the same order ({', '.join(f'{n}: {v}' for n, v in order.items())})\n")
    print(table(summaries, a.device))
    print(f"\nFLOP/s convention: 6N per token the policy processed (non-padding) + 2N per token the reference scored, "
          f"N = {model['N_flop_params'] / 1e6:.1f}M (non-embedding parameters + output layer); attention and recomputation "
          f"not counted. Both frameworks apply the output layer ({model['vocab_size'] * model['hidden_size'] / 1e6:.1f}M) only where a reply token is predicted; the "
          f"last row counts it there only. Reference: {peak['size']}x{peak['size']} {peak['dtype']} matmul = {peak['flops_per_s'] / 1e12:.3f} TFLOP/s.")
    for n in names:
        print(f"{column_label(n)} settings: " + ", ".join(f"{k}={v}" for k, v in results[n]["settings"].items()))
    print(f"loss, first {'steps' if a.logging_steps == 1 else 'logged rows'} (same pairs: close; TRL also trains on the newline after <|im_end|>): "
          + "; ".join(f"{n} " + " ".join(f"{x:.6f}" for x in results[n]["loss"][:4]) for n in names))
    info = machine_info(a.device)
    print(f"machine: {info['cpu']}, {info['usable_cores']} usable cores, torch threads {results[names[0]]['threads']}, "
          f"gpu {info['gpu']}; torch {info.get('torch')}, transformers {info.get('transformers')}, trl {info.get('trl')}")

    slug = "cpu" if a.device == "cpu" else re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")
    output = Path(a.output or Path(__file__).parent / "results" / f"{datetime.date.today()}-{slug}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    data.pop("used_lengths")
    output.write_text(json.dumps({"machine": info, "args": vars(a), "model": model, "data": data, "matmul": peak,
                                  "order_check": order, "summary": summaries, "raw": results}, indent=1))
    print(f"\nJSON: {output}")
    if a.profile:
        if launch("profile", workdir, spec) is None:
            failed.append("profile")
        else:
            profile_path = output.with_name(output.stem + "-profile.txt")
            shutil.copyfile(workdir / "profile.txt", profile_path)
            print(f"profile: {profile_path}")
    if failed:
        print(f"failed (left out of the table, log tails above): {', '.join(failed)}")
    if a.keep_workdir:
        print(f"workdir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
