"""``dpokit eval``: preference metrics of a policy against a reference on a preference dataset.

The numbers come from the training loop's own code, :func:`dpokit.train.pair_statistics` (same
batching, same reply log-probs, same loss statistics), so on a run's eval data they equal the
``eval/...`` rows of its ``metrics.jsonl`` (launched with FSDP2 or DeepSpeed as the run was, exactly,
in 16 bits too: each model is then sharded, or given an engine of its own, as training holds a
separate reference; see :func:`_scorer`). The
reference scores every pair first (a table, as training precomputes it) and is freed before the
policy is loaded: one model in memory at a time.

Metrics (means over pairs; ``π`` the policy, ``ref`` the reference, log-probs summed over reply
tokens):

- ``eval/rewards/accuracies``: share of pairs where the implicit reward
  ``β·(log π − log ref)`` of the chosen reply beats the rejected one's (SimPO/SFT-only runs:
  ``β·avg log π``, as in training);
- ``eval/rewards/margins``, ``eval/rewards/chosen``, ``eval/rewards/rejected``, ``eval/loss``;
- ``eval/logps/chosen``, ``eval/logps/rejected``: the policy's mean log-probs;
- ``eval/logps/accuracies``: share of pairs where ``log π(chosen) > log π(rejected)``;
- ``eval/ref_logps/chosen``, ``eval/ref_logps/rejected``, ``eval/ref_logps/accuracies``: the
  same three for the reference alone (its implicit reward against itself is always 0).
- ``eval/entropy``, ``eval/logits/chosen``, ``eval/logits/rejected``, ``eval/mean_token_accuracy``:
  the policy's token means, as TRL logs them (over all reply tokens, see :data:`dpokit.metrics.TOKEN_MEANS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from dpokit.config import Config, ConfigError, DataSource, needs_reference
from dpokit.data.pipeline import load_data
from dpokit.data.sources import check_data_argument, describe
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import ReplyLogProbs
from dpokit.modeling import not_here, sdpa_without_cudnn
from dpokit.reference import TableReference, compute_table
from dpokit.resolve import RUN_CONFIG, ResolvedModel, default_reference, load_model, load_model_tokenizer, model_config, resolve_model


def logp_preference(chosen: torch.Tensor, rejected: torch.Tensor, prefix: str) -> dict[str, float]:
    """Mean chosen/rejected log-probs ([N] each) and the share of pairs with
    log p(chosen) > log p(rejected): ``{prefix}chosen``, ``{prefix}rejected``, ``{prefix}accuracies``."""
    return {
        f"{prefix}chosen": chosen.mean().item(),
        f"{prefix}rejected": rejected.mean().item(),
        f"{prefix}accuracies": (chosen > rejected).float().mean().item(),
    }


@dataclass
class EvalReport:
    """What ``dpokit eval`` found: metric name -> value (see the module docstring), and where from."""

    model: str
    reference: str
    data: str
    pairs: int
    metrics: dict[str, float]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """A small aligned table: one row per quantity, policy and reference columns."""
        m = self.metrics
        rows = [
            ("reward accuracy", m["eval/rewards/accuracies"], None),
            ("reward margin", m["eval/rewards/margins"], None),
            ("log-prob chosen", m["eval/logps/chosen"], m["eval/ref_logps/chosen"]),
            ("log-prob rejected", m["eval/logps/rejected"], m["eval/ref_logps/rejected"]),
            ("log-prob accuracy", m["eval/logps/accuracies"], m["eval/ref_logps/accuracies"]),
            ("loss", m["eval/loss"], None),
        ]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        lines = [f"{'':<18} {'policy':>12} {'reference':>12}"]
        lines += [f"{name:<18} {fmt(p):>12} {fmt(r):>12}" for name, p, r in rows]
        lines.append(f"{self.pairs} pairs from {self.data}")
        lines.append(f"policy:    {self.model}\nreference: {self.reference}")
        return "\n".join(lines)


def eval_config(model: ResolvedModel, data: str | None, split: str, batch_size: int | None,
                max_length: int | None, beta: float | None) -> Config:
    """The run's config (or the defaults), with ``data`` as its only dataset when given and the
    command-line overrides applied. Refuses, before any model is loaded, a missing --data file, a
    --split that would be ignored, and a run without eval data."""
    if model.run_config is None and data is None:
        raise ConfigError(f"{model.name} is not a dpokit run{not_here(model.name)}, so it has no eval data: pass --data FILE_OR_HUB_ID")
    if data is None:
        _check_run_eval_data(model, split)
    else:
        check_data_argument(data, split)
    for flag, value, least in (("--batch-size", batch_size, 1), ("--max-length", max_length, 2)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    if beta is not None and beta <= 0:
        raise ConfigError(f"--beta must be > 0, got {beta}")
    config = model.run_config if model.run_config is not None else Config()
    config = dataclasses.replace(config)  # shallow: the sections below are replaced, not mutated
    if data is not None:
        config.data = dataclasses.replace(config.data, train=DataSource(path=data, split=split), eval=None, eval_fraction=0.0)
    if max_length is not None:
        config.data = dataclasses.replace(config.data, max_length=max_length)
    if batch_size is not None:
        config.training = dataclasses.replace(config.training, per_device_eval_batch_size=batch_size)
    if beta is not None:
        config.loss = dataclasses.replace(config.loss, beta=beta)
    return config


def _check_run_eval_data(model: ResolvedModel, split: str) -> None:
    """The run's own eval data is what its config.yaml says: refuse a run that has none, and a
    ``--split``, which only chooses a split of ``--data``."""
    where = model.run_dir / RUN_CONFIG if model.run_dir is not None else "the run's config"
    d = model.run_config.data
    if d.eval is None and d.eval_fraction <= 0:
        raise ConfigError(
            f"{where} has no eval data (data.eval unset, data.eval_fraction 0): pass --data FILE_OR_HUB_ID"
        )
    if split != DataSource.split:
        raise ConfigError(
            f"--split {split} applies to --data only; the run's eval data is set by {where} (data.eval / "
            "data.eval_fraction): drop --split, or pass --data with it"
        )


def eval_pairs(config: Config, tokenizer, from_run: bool, log: Callable[[str], object]) -> tuple[list[TokenizedPair], str]:
    """Tokenized eval pairs and a name for them: the run's eval data (``data.eval``, or the
    ``eval_fraction`` split with the run's seed) when ``from_run``, else all of ``data.train``."""
    d, seed = config.data, config.training.seed
    log = _relabel(log)
    if not from_run:
        return load_data(d, tokenizer, seed, log).train, describe(d.train)
    if d.eval is not None:  # the eval source alone, tokenized exactly as training did
        only = dataclasses.replace(d, train=d.eval, eval=None, eval_fraction=0.0)
        return load_data(only, tokenizer, seed, log).train, describe(d.eval)
    if d.eval_fraction > 0:
        return load_data(d, tokenizer, seed, log).eval, f"{describe(d.train)} (eval_fraction={d.eval_fraction} split, seed {seed})"
    raise ConfigError("the run's config.yaml has no eval data (data.eval unset, data.eval_fraction 0): pass --data FILE_OR_HUB_ID")


def _relabel(log: Callable[[str], object]) -> Callable[[str], object]:
    """The loader names its first dataset "train"; here every dataset is scored, none trained on."""
    return lambda line: log(line.replace("data: train ", "data: ", 1))


def _check_same_vocab(tokenizer, ref_tokenizer, ref_path: str, policy_path: str) -> None:
    """DPO compares log-probs of the same token ids: the reference must share the tokenizer."""
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"the reference {ref_path} has a different tokenizer than the policy {policy_path}: "
            "give a reference with the same vocabulary (usually the model training started from)"
        )


def _scorer(model: ResolvedModel, dtype: str, config: Config, accelerator) -> tuple[ReplyLogProbs, object]:
    """``model`` loaded with its own settings in ``dtype``, as a reply-log-prob scorer placed as
    training places a separate reference (:func:`dpokit.train.place_frozen`): on this process's
    device; launched under FSDP2, sharded like the run's models (the same units and mixed-precision
    policy); under DeepSpeed, in an engine of its own (partitioned under ZeRO-3, scoring in the
    engine's dtype). So the numbers are the run's own eval rows, and a model larger than one GPU is
    scored sharded. Where sharding fills each process's share from the main process's weights
    (:func:`dpokit.sharding.weights_on_main_only`), the others read none. Returns the scorer and
    DeepSpeed's engine (None otherwise): keep the engine while the scorer is used."""
    from dpokit import zero
    from dpokit.modeling import text_config
    from dpokit.sharding import weights_on_main_only
    from dpokit.train import place_frozen

    empty = weights_on_main_only(accelerator) and not accelerator.is_main_process
    # an adapter unmerged: scored as training scored it (merged into 16-bit weights it is rounded)
    lm = load_model(model, model_config(model, dtype), merge=False, empty=empty)
    if zero.is_deepspeed(accelerator):  # the engine's config, as training fills it before its prepare
        zero.configure(accelerator, config, text_config(lm.config).hidden_size)
    return place_frozen(lm, config, accelerator)


@sdpa_without_cudnn()
def evaluate_model(
    model: str,
    reference: str | None = None,
    data: str | None = None,
    split: str = "train",
    max_pairs: int | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    beta: float | None = None,
    dtype: str | None = None,
    log: Callable[[str], object] = print,
) -> tuple[EvalReport, ResolvedModel]:
    """Score ``data`` (default: the run's eval data) with the policy ``model`` against the
    reference (default: the run's), through :func:`dpokit.train.pair_statistics`.

    Returns the report (see the module docstring for the metrics) and the resolved policy.
    """
    from dpokit import zero
    from dpokit.sharding import setup as setup_sharding
    from dpokit.train import (autocast_dtype, build_batch, eval_metrics, forward_precision, new_accelerator, pair_statistics,
                              scoring_batches)

    policy_model = resolve_model(model)
    ref_model = resolve_model(reference) if reference else default_reference(policy_model)
    if ref_model is None:
        raise ConfigError(f"{policy_model.name} is not a dpokit run{not_here(policy_model.name)}, so it has no default reference: pass --reference MODEL")
    if max_pairs is not None and max_pairs < 1:
        raise ConfigError(f"--max-pairs must be at least 1, got {max_pairs}")
    config = eval_config(policy_model, data, split, batch_size, max_length, beta)
    load_cfg = model_config(policy_model, dtype)
    tokenizer = load_model_tokenizer(policy_model, load_cfg)
    ref_tokenizer = load_model_tokenizer(ref_model, model_config(ref_model, load_cfg.dtype))
    _check_same_vocab(tokenizer, ref_tokenizer, ref_model.shown, policy_model.shown)
    accelerator = new_accelerator()
    if not accelerator.is_main_process:  # launched on several processes: one says what is loaded
        log = lambda line: None  # noqa: E731
    # refuse what dpokit does not shard, settle how (the run's optimizer is not eval's: not checked)
    scoring = dataclasses.replace(config, training=dataclasses.replace(config.training, optim="adamw_torch"))
    setup_sharding(accelerator, scoring, autocast_dtype(config.training))
    zero.setup(accelerator, scoring)
    pairs, origin = eval_pairs(config, tokenizer, from_run=data is None, log=log)
    pairs = pairs[:max_pairs] if max_pairs else pairs

    pad_id = tokenizer.pad_token_id
    build = lambda batch_pairs: build_batch(batch_pairs, config, pad_id)  # noqa: E731
    ref_scorer, engine = _scorer(ref_model, load_cfg.dtype, config, accelerator)
    with forward_precision(config.training, accelerator, ref_scorer):  # as training scored its reference
        shows = "reference" if accelerator.is_local_main_process else None
        table = compute_table(ref_scorer, pairs, build, scoring_batches(len(pairs), config.training, accelerator), accelerator,
                              shows)  # [N, 2]
    del ref_scorer, engine
    policy, engine = _scorer(policy_model, load_cfg.dtype, config, accelerator)  # the engine kept while the policy scores
    # A reference-free loss (SimPO, SFT) trained without one: its metrics ignore the reference.
    stats = pair_statistics(policy, TableReference(table) if needs_reference(config) else None, pairs, config, accelerator,
                            pad_id, "policy" if accelerator.is_local_main_process else None)
    metrics = eval_metrics(stats)
    metrics["eval/logps/accuracies"] = (stats["logps/chosen"] > stats["logps/rejected"]).float().mean().item()
    metrics.update(logp_preference(table[:, 0], table[:, 1], "eval/ref_logps/"))
    return EvalReport(policy_model.shown, ref_model.shown, origin, len(pairs), metrics), policy_model
