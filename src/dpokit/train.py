"""The training loop: read it top to bottom.

``train(config)`` loads the tokenizer, data, policy and reference, then for every optimizer step
takes one global batch of pairs, splits this process's share into micro-batches, scores replies
with the policy (and the reference), backpropagates the preference loss, clips, steps, and logs.
Accelerate supplies the processes (``accelerate launch -m dpokit train cfg.yaml``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed

from dpokit import checkpoint as ckpt
from dpokit.config import (
    CPU_ATTENTION,
    VARLEN_ATTENTION,
    Config,
    ConfigError,
    RunConfig,
    TrainingConfig,
    batch_layout,
    is_flash_attention,
    needs_reference,
    save_config,
)
from dpokit.data.batching import (
    Batch, eval_batches, first_epoch_micro_batches, global_batches, local_micro_batches, make_batch, past_shared_length,
)
from dpokit.data.pipeline import load_data
from dpokit.data.tokenize import TokenizedPair
from dpokit.launch import end_process_group
from dpokit.logps import (
    TOKEN_STATS, WPO_TOKEN_STATS, ReplyLogProbs, adopt_findings, check_rows_kept_apart, check_window, probe_findings,
)
from dpokit.losses import PairLogps, preference_loss, wpo_weights
from dpokit.metrics import LogWindow, MetricsLog, token_means, token_sums
from dpokit.progress import bar, on_terminal, shown
from dpokit.reference import (
    AdapterOffReference,
    LiveReference,
    NoReference,
    Reference,
    TableReference,
    adapters_switched_off,
    as_reference,
    cached_table,
    compute_table,
    fingerprint_model,
    fingerprint_pairs,
    sync_reference,
)
from dpokit.modeling import (
    check_device_requirements,
    compile_layers,
    count_parameters,
    enable_activation_checkpointing,
    eval_mode,
    is_image_text,
    load_policy,
    load_reference,
    load_tokenizer,
    sdpa_without_cudnn,
    uses_peft,
)
from dpokit.run_record import RunRecord, describe_device
from dpokit.schedule import follow_schedule, make_scheduler
from dpokit.sharding import (
    describe,
    full_model_state,
    in_lockstep,
    is_sharded,
    load_optimizer_state,
    optimizer_state,
    setup as setup_sharding,
    shard_frozen,
    sharded_by_fsdp,
    splits_weights,
    weights_on_main_only,
)
from dpokit.masks import sequence_bounds
from dpokit.varlen import varlen_rows
from dpokit import zero


def autocast_dtype(training: TrainingConfig) -> torch.dtype | None:
    """The 16-bit dtype forward passes autocast to (``bf16`` / ``fp16``), or None."""
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else None


def forward_precision(training: TrainingConfig, accelerator, scorer: ReplyLogProbs):
    """The precision of forwards through ``scorer``'s model: :func:`mixed_precision`, except for a
    model FSDP2 has sharded, whose mixed-precision policy gathers the weights in 16 bits instead (see
    :func:`dpokit.sharding.setup`), or of a model DeepSpeed's engine runs, which casts its weights to
    bfloat16 itself (:mod:`dpokit.zero`). Decided by the model, not the launch."""
    if getattr(scorer, "in_deepspeed_engine", False) or is_sharded(accelerator) and sharded_by_fsdp(scorer.model):
        return nullcontext()
    return mixed_precision(training, accelerator.device)


def mixed_precision(training: TrainingConfig, device: torch.device):
    """Autocast around forward passes when ``training.bf16`` or ``training.fp16`` is set, else nothing.
    (dpokit's own rather than Accelerate's, so each ``train`` call in a process chooses its own.)"""
    dtype = autocast_dtype(training)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def score_batch(policy, ref_logps: torch.Tensor | None, batch: Batch, config: Config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss [P] and per-pair statistics for one micro-batch.

    ``ref_logps``: [2P] reference log-probs (chosen, rejected interleaved), or None. Besides the
    loss's statistics, the per-pair sums behind TRL's token means (:func:`dpokit.metrics.token_sums`).
    """
    lo = config.loss
    columns = WPO_TOKEN_STATS if lo.use_weighting else TOKEN_STATS
    # [2P] (or [2P, 2]: LD-DPO's two parts of each reply), [2P, 3 or 4]: chosen, rejected interleaved;
    # a mixture of experts' load-balancing loss where it is asked for
    seq_logps, seq_stats, *router = policy(**batch.model_inputs(), token_stats=columns,
                                           router_aux=lo.router_aux_loss_coef > 0)
    weighted = batch.ld_weighted(seq_logps)
    plain = None if batch.reply_tail is None else seq_logps.sum(dim=1)
    tokens = batch.seq_tokens.to(seq_logps.dtype)
    logps = PairLogps(
        chosen=weighted[0::2],
        rejected=weighted[1::2],
        chosen_tokens=tokens[0::2],
        rejected_tokens=tokens[1::2],
        ref_chosen=None if ref_logps is None else ref_logps[0::2],
        ref_rejected=None if ref_logps is None else ref_logps[1::2],
        plain_chosen=None if plain is None else plain[0::2],
        plain_rejected=None if plain is None else plain[1::2],
    )
    weights = None
    if lo.use_weighting:
        aligned = seq_stats[:, WPO_TOKEN_STATS.index("wpo_logp")]
        weights = wpo_weights(aligned[0::2], logps.chosen_tokens, aligned[1::2], logps.rejected_tokens)
    loss, stats = preference_loss(
        logps, lo.loss_type, lo.loss_weights, lo.beta, lo.label_smoothing, lo.length_normalize, lo.simpo_gamma,
        discopop_tau=lo.discopop_tau, f_divergence_type=lo.f_divergence_type,
        f_alpha_divergence_coef=lo.f_alpha_divergence_coef, pair_weights=weights,
    )
    if router:  # one number per micro-batch: on each pair's loss, it adds to the mean once
        loss = loss + lo.router_aux_loss_coef * router[0]
        stats["aux_loss"] = router[0].detach().expand_as(loss)
    stats["loss"] = loss.detach()
    stats.update(token_sums(seq_stats, batch.seq_tokens))
    return loss, stats


def build_batch(pairs: list[TokenizedPair], config: Config, pad_id: int) -> Batch:
    """A micro-batch in the configured layout, on the host. Packed rows hold at most 2 x max_length
    tokens (one prefix-shared pair always fits), so attention over a row never grows with the batch.
    Under dpokit_varlen the rows' regrouping is built here too, before the batch goes to the device,
    and under flash-attention the packed rows' sequence bounds; with ``loss.ld_alpha``, the reply
    tokens past their pair's shared length."""
    layout = batch_layout(config.training)
    batch = make_batch(pairs, layout, pad_id, row_tokens=2 * config.data.max_length)
    attn = config.model.attn_implementation
    if attn == VARLEN_ATTENTION and batch.groups is not None:
        batch.varlen = varlen_rows(batch.groups, batch.branches)
    elif is_flash_attention(attn) and layout == "packed":
        batch.varlen = sequence_bounds(batch.groups)
    if config.loss.ld_alpha is not None:
        batch.reply_tail, batch.ld_alpha = past_shared_length(batch.seq_index, batch.seq_tokens), config.loss.ld_alpha
    return batch


def reply_scorer(model: torch.nn.Module, training: TrainingConfig, max_length: int) -> ReplyLogProbs:
    """``model`` as a reply-log-prob scorer with the configured log-prob settings.

    What the fast paths assume of the model (that its output layer reproduces its logits; that it
    keeps the sequences of a row apart in the configured layout, by itself or with dpokit's mask)
    is checked here, once, with short forwards on the model's device under the training's
    autocast, as training will run it: place the model first.
    """
    with mixed_precision(training, next(model.parameters()).device):
        mask_packed_rows = check_rows_kept_apart(model, batch_layout(training))
        windows = check_window(model, batch_layout(training), mask_packed_rows, max_length)
        return ReplyLogProbs(model, training.logps_chunk_size, training.chunked_logps, mask_packed_rows, windows)


def check_load_balancing(scorer: ReplyLogProbs, config: Config) -> None:
    """Refuse ``loss.router_aux_loss_coef`` for a model that has no load-balancing loss to add, or
    scored through its full logits (the decoder's router logits come with the chunked log-probs)."""
    coef = config.loss.router_aux_loss_coef
    if coef > 0 and scorer.load_balancing is None:
        raise ConfigError(
            f"loss.router_aux_loss_coef={coef} adds a mixture-of-experts model's load-balancing loss, but "
            f"{type(scorer.model).__name__} ({config.model.name_or_path}) has none (dense, or its transformers class "
            "computes no load_balancing_loss_func): set router_aux_loss_coef=0"
        )
    if coef > 0 and not scorer.chunked:
        raise ConfigError(
            f"loss.router_aux_loss_coef={coef} takes the decoder's router logits with the chunked log-probs, but "
            f"{config.model.name_or_path} is scored through its full logits "
            + ("(training.chunked_logps=false): set chunked_logps=true" if not config.training.chunked_logps
               else "(dpokit cannot reproduce its output layer): set router_aux_loss_coef=0")
        )


def checked_scorer(model: torch.nn.Module, config: Config, accelerator) -> ReplyLogProbs:
    """:func:`reply_scorer` over ``model``, placed for its checks (:func:`placed_for_checks`). Where
    only the main process holds the weights before sharding (:func:`weights_on_main_only`), the main
    process runs the checks and the others take what they found."""
    if not weights_on_main_only(accelerator):
        with placed_for_checks(model, config, accelerator) as placed:
            return reply_scorer(placed, config.training, config.data.max_length)
    findings = [None]
    if accelerator.is_main_process:
        with placed_for_checks(model, config, accelerator) as placed:
            scorer = reply_scorer(placed, config.training, config.data.max_length)
        findings = [probe_findings(model)]
    broadcast_object_list(findings)
    if accelerator.is_main_process:
        return scorer
    adopt_findings(model, findings[0])
    return reply_scorer(model, config.training, config.data.max_length)


def scoring_batches(num_pairs: int, training: TrainingConfig, accelerator) -> list[list[int]]:
    """This process's batches for scoring ``num_pairs`` pairs outside training (evaluation, and the
    eval pairs' reference table): both take these, so each pair is scored in the same batch."""
    return eval_batches(num_pairs, training.per_device_eval_batch_size, accelerator.process_index, accelerator.num_processes)


def pair_statistics(policy: ReplyLogProbs, reference, pairs: list[TokenizedPair], config: Config, accelerator, pad_id: int,
                    progress: str | None = None) -> dict[str, torch.Tensor]:
    """Per-pair loss statistics over all ``pairs`` (split over processes, gathered): name -> [N]
    float32 tensor in pair order, on every process. Names as :func:`score_batch` (``loss``,
    ``rewards/...``, ``logps/chosen``, ``logps/rejected``).

    ``reference``: a :class:`dpokit.reference.Reference`, a live :class:`ReplyLogProbs`, or None.
    ``progress``: the label of a bar over the batches on a terminal.
    """
    reference = as_reference(reference)
    parts = []
    batches = scoring_batches(len(pairs), config.training, accelerator)
    with torch.no_grad(), forward_precision(config.training, accelerator, policy), eval_mode(policy):
        for idx, keep in shown(in_lockstep(batches, accelerator, policy), len(batches), progress):
            batch = build_batch([pairs[i] for i in idx], config, pad_id).to(accelerator.device)
            _, stats = score_batch(policy, reference.logps(batch, idx), batch, config)
            if keep:
                parts.append((idx, {k: v.float().cpu() for k, v in stats.items()}))
    gathered = gather_object(parts)
    out = {k: torch.zeros(len(pairs)) for k in gathered[0][1]} if gathered else {}
    for idx, stats in gathered:
        for k, v in stats.items():
            out[k][idx] = v
    return out


def eval_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The means of :func:`pair_statistics`' per-pair tensors, the token statistics as token means
    (:func:`dpokit.metrics.token_means`), prefixed ``eval/``."""
    return {f"eval/{k}": v for k, v in token_means({k: v.mean().item() for k, v in stats.items()}).items()}


def evaluate(policy: ReplyLogProbs, reference, pairs: list[TokenizedPair], config: Config, accelerator, pad_id: int,
             progress: str | None = None) -> dict:
    """Eval metrics over all ``pairs`` (see :func:`eval_metrics`)."""
    return eval_metrics(pair_statistics(policy, reference, pairs, config, accelerator, pad_id, progress))


def adapters_off_reference(config: Config) -> bool:
    """Whether the reference is the live policy with its LoRA adapters switched off."""
    return needs_reference(config) and uses_peft(config.model) and not config.training.precompute_ref_log_probs


@dataclass
class StartingReference:
    """The reference as taken before training changes the policy: a frozen ``model`` (None: the policy
    itself, or no reference at all) and, for log-probs computed once, a ``fingerprint`` of its weights."""

    model: torch.nn.Module | None = None
    fingerprint: str | None = None
    adapters_off: bool = False  # the policy scores it with its (fresh) LoRA adapters switched off


def starting_reference(config: Config, policy, resumed: bool, sharded: bool = False, accelerator=None,
                       deepspeed: bool = False) -> StartingReference:
    """Take the reference before ``policy`` is trained, moved or sharded. Without a separate
    reference and without resuming it is the starting policy itself: no copy is made for log-probs
    computed once, and a frozen copy for a live reference (LoRA's live reference is the policy with
    its adapters off: nothing to take). The fingerprint names how 16-bit compute is done (autocast,
    or FSDP2's mixed-precision policy when ``sharded``, or DeepSpeed's bfloat16 weights with
    ``deepspeed``): each scores a little differently. Where only
    the main process holds the weights (:func:`weights_on_main_only` of ``accelerator``), the others
    build the reference empty and take the main process's fingerprint. Fresh LoRA adapters (no starting
    adapter) leave the base as it was: the reference is the policy with its adapters off, resumed or not,
    so the base is never loaded twice."""
    t = config.training
    if not needs_reference(config) or adapters_off_reference(config):
        return StartingReference()
    main_only = accelerator is not None and weights_on_main_only(accelerator)
    empty = main_only and not accelerator.is_main_process
    own_policy = not config.model.ref_model_name_or_path and not resumed
    if not t.precompute_ref_log_probs:
        return StartingReference(load_reference(config.model, policy if own_policy else None, empty=empty))
    m = config.model
    adapters_off = uses_peft(m) and not m.adapter_name_or_path and not m.ref_model_name_or_path
    model = None if own_policy or adapters_off else load_reference(m, empty=empty)
    precision = autocast_dtype(t)
    how = "fsdp2" if sharded else "deepspeed" if deepspeed else "autocast"
    fingerprint = [None if empty else fingerprint_model(model or policy, adapters_off=adapters_off)]
    if main_only:
        broadcast_object_list(fingerprint)
    suffix = f":{str(precision).replace('torch.', '')}-{how}" if precision else ""
    return StartingReference(model, fingerprint[0] + suffix, adapters_off)


def moved_reference_config(config: Config, resume_from: Path | None) -> Config:
    """``config``, or for a TR-DPO run (``sync_ref_model``) resumed from a checkpoint, ``config`` with
    the reference read from that checkpoint (where the run had moved it), which must hold one."""
    if not (config.training.sync_ref_model and resume_from is not None):
        return config
    saved = resume_from / ckpt.REFERENCE_DIR
    if not (saved / "config.json").is_file():
        raise ConfigError(
            f"training.sync_ref_model resumes with the reference as the run had moved it, but {resume_from} holds "
            f"none ({saved} is missing): it was saved by a run without sync_ref_model. Resume it without sync_ref_model, "
            "or start the run again"
        )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, ref_model_name_or_path=str(saved),
                                                                 ref_revision=None))


def prepare_references(config: Config, policy: ReplyLogProbs, start: StartingReference, data, accelerator, pad_id: int,
                       say, train_digest: str | None = None) -> tuple[Reference, Reference]:
    """(train reference, eval reference) once ``policy`` is prepared (its weights still the starting
    ones): log-prob tables computed once (cached on disk), a live frozen model, the policy with its
    adapters off, or none. A separate reference model is placed as the policy is (sharded under
    FSDP2, in a DeepSpeed engine of its own under DeepSpeed) and, for tables, dropped once they are
    computed. ``train_digest``: the train pairs'
    :func:`dpokit.reference.fingerprint_pairs`, where the caller has it."""
    t = config.training
    if not needs_reference(config):
        return NoReference(), NoReference()
    if adapters_off_reference(config):
        live = AdapterOffReference(policy)
        return live, live
    if start.model is not None and t.torch_compile and t.precompute_ref_log_probs:
        compile_layers(start.model)  # its table is scored as the compiled policy would score it (exact on resume)
    # DeepSpeed's engine over a separate reference is kept while the reference is used
    scorer, engine = (policy, None) if start.model is None else place_frozen(start.model, config, accelerator)
    start.model = None  # the scorer holds it from here; with tables, nothing does once they are computed
    if scorer is not policy and is_sharded(accelerator):
        say(f"reference sharding: {describe(scorer, accelerator)}")
    if scorer is not policy and zero.is_deepspeed(accelerator):
        say(f"reference sharding: {zero.describe_frozen(accelerator)}")
    if not t.precompute_ref_log_probs:
        live = LiveReference(scorer, engine)
        return live, live

    def build(pairs: list[TokenizedPair]) -> Batch:
        return build_batch(pairs, config, pad_id)

    rank, world = accelerator.process_index, accelerator.num_processes
    sixteen_bit = computes_in_16_bits(scorer.model, t)
    compiled = t.torch_compile  # the policy's layers are compiled by now, and a separate reference's (above)

    def table(pairs: list[TokenizedPair], what: str, batches: list[list[int]], batching: str,
              digest: str | None = None) -> TableReference:
        def compute() -> torch.Tensor:
            with forward_precision(config.training, accelerator, scorer):  # scored as training will score the policy
                with adapters_switched_off(scorer) if start.adapters_off else nullcontext():
                    shows = config.run.progress_bar and accelerator.is_local_main_process
                    return compute_table(scorer, pairs, build, batches, accelerator, f"reference: {what}" if shows else None)

        # in 16 bits another batching, or compiled layers, give other last bits: then they are part of the cache key
        key = f"{batch_layout(t)}:{config.data.max_length}:{batching}{':compiled' if compiled else ''}" if sixteen_bit else ""
        if config.loss.ld_alpha is not None:  # LD-DPO's weighted sums
            key += f":ld_alpha {config.loss.ld_alpha!r}"
        return TableReference(cached_table(start.fingerprint, pairs, compute, accelerator, what, log=say, batching=key,
                                           pairs_digest=digest))

    # the train pairs in the first epoch's micro-batches: each pair's reference is then exactly what
    # its first-epoch forward would score, in 16 bits too (rewards exactly 0 before the first update)
    train_batches = first_epoch_micro_batches(len(data.train), pairs_per_step(t, world), t.seed, rank, world,
                                              t.per_device_train_batch_size, t.per_device_eval_batch_size)
    train_batching = f"seed {t.seed}, {t.per_device_train_batch_size} x {world} x {t.gradient_accumulation_steps}, rest {t.per_device_eval_batch_size}"
    with eval_mode(scorer):
        train_table = table(data.train, "train", train_batches, train_batching, train_digest)
        if not data.eval:
            return train_table, NoReference()
        eval_table = table(data.eval, "eval", scoring_batches(len(data.eval), t, accelerator), f"eval {t.per_device_eval_batch_size} x {world}")
        return train_table, eval_table


def computes_in_16_bits(model: torch.nn.Module, training: TrainingConfig) -> bool:
    """Whether ``model``'s forwards compute in 16 bits: under autocast, with 16-bit or quantized weights."""
    if autocast_dtype(training) is not None or getattr(model.config, "quantization_config", None):
        return True
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())


def place_frozen(model: torch.nn.Module, config: Config, accelerator) -> tuple[ReplyLogProbs, object]:
    """A frozen model (a separate reference; in ``dpokit eval``, every model) as a scorer on this
    process's device, checked before (see :func:`placed_for_checks`): sharded like the policy under
    FSDP2; under DeepSpeed in an engine of its own (:func:`dpokit.zero.prepare_frozen`, after
    :func:`dpokit.zero.configure`), partitioned under ZeRO-3. Returns the scorer and DeepSpeed's
    engine (None otherwise): keep the engine while the scorer is used."""
    scorer = checked_scorer(model, config, accelerator)
    if is_sharded(accelerator):
        shard_frozen(scorer, accelerator)  # each process's share onto its device
    return scorer, zero.prepare_frozen(scorer, accelerator) if zero.is_deepspeed(accelerator) else None


@contextmanager
def placed_for_checks(model: torch.nn.Module, config: Config, accelerator) -> Iterator[torch.nn.Module]:
    """``model`` where its one-time checks (short eager forwards, :func:`reply_scorer`) run before
    training: on this process's device; under FSDP2 and ZeRO-3 on the host instead, where sharding
    then moves each process's share to its GPU (:func:`dpokit.zero.partition`), so the whole model is
    never on one GPU. An attention without a CPU path (the flash-attn package's, flex_attention, a
    hub kernel) is checked on the device, then goes back to the host (the whole model on one GPU only
    during the checks)."""
    sharded = splits_weights(accelerator)
    if sharded and config.model.attn_implementation in (*CPU_ATTENTION, VARLEN_ATTENTION):
        yield model
        return
    yield model.to(accelerator.device)
    if sharded:
        model.to("cpu")
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # where torch.optim.AdamW(fused=True) runs (torch >= 2.4 on the CPU)


def check_steps_left(step: int, total_steps: int, checkpoint: Path) -> None:
    """Refuse to resume at ``step`` a run whose ``max_steps`` (or epochs) end before it: its model would
    be saved as final with more steps than asked for."""
    if total_steps < step:
        raise ConfigError(
            f"{checkpoint} is at step {step}, past this run's {total_steps} steps (max_steps / num_train_epochs): give "
            f"max_steps >= {step}, or use that checkpoint's model as it is (model.name_or_path={checkpoint})"
        )


def evaluated_at(metrics: Path, step: int, accelerator) -> bool:
    """Whether ``metrics`` already holds an eval row of ``step`` (a run resumed at its last step, from a
    checkpoint saved after that step's eval); decided by the main process, for all."""
    found = [False]
    if accelerator.is_main_process and metrics.is_file():
        rows = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
        found = [any(row.get("step") == step and any(k.startswith("eval/") for k in row) for row in rows)]
    broadcast_object_list(found)
    return found[0]


def follow_optimizer_settings(optimizer: torch.optim.Optimizer, training: TrainingConfig) -> None:
    """After loading a checkpoint's optimizer state, which brings its parameter groups' settings as
    they were: this run's ``weight_decay`` (on the decayed group, see :func:`_optimizer`), betas and
    epsilon, as the learning rate follows this run's (:func:`dpokit.schedule.follow_schedule`)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = training.weight_decay if group.get("decayed", group is optimizer.param_groups[0]) else 0.0
        group["betas"] = (training.adam_beta1, training.adam_beta2)
        group["eps"] = training.adam_epsilon


def _optimizer(model: torch.nn.Module, config: Config, device: torch.device, deepspeed: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (as Hugging Face's Trainer), with torch's
    fused kernel where training runs (``device``; the parameters may still be on the host, to be
    sharded there) on CUDA or the CPU (TRL's default on CUDA too): one pass over each group's
    parameters and states, where the default paths chain several kernels through parameter-sized
    temporaries (on the CPU, one tensor at a time: 7x slower for a 44M-parameter model on 2 cores).
    Each group says whether it is the decayed one (``decayed``). For DeepSpeed an empty group (LoRA
    trains no biases or norms) is left out, as DeepSpeed's optimizer leaves it out of its groups."""
    t = config.training
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay, "decayed": True},
              {"params": no_decay, "weight_decay": 0.0, "decayed": False}]
    if deepspeed:
        groups = [group for group in groups if group["params"]]
    options = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optim == "adamw_8bit":
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(groups, **options)
    if device.type in FUSED_ADAMW_DEVICES:
        options["fused"] = True
    return torch.optim.AdamW(groups, **options)


def warn_low_precision_weights(policy: torch.nn.Module, config: Config, say) -> None:
    """Trained weights held in 16 bits lose AdamW steps smaller than their rounding step (about
    1/256 of the weight in bfloat16): at DPO's learning rates most of them. Say so, with the fix."""
    low = {p.dtype for p in policy.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
    if low and config.training.optim == "adamw_torch":
        dtype = str(next(iter(low))).replace("torch.", "")
        say(f"warning: the trained weights are {dtype}: an AdamW step smaller than about 1/256 of a weight rounds "
            f"away (at learning_rate {config.training.learning_rate:g} most do), so much of the model may never change. "
            "Use dtype=float32 with bf16=true (float32 weights and optimizer, bfloat16 compute; fp16=true on GPUs "
            "without bfloat16) or LoRA (use_peft=true).")


def pairs_per_step(training: TrainingConfig, processes: int) -> int:
    """Pairs per optimizer step: per-device micro-batch x processes x accumulation steps."""
    return training.per_device_train_batch_size * processes * training.gradient_accumulation_steps


def plan_steps(num_pairs: int, global_batch_size: int, config: Config) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = num_pairs // global_batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"{num_pairs} training pairs cannot fill one global batch of {global_batch_size} "
            "(per_device_train_batch_size x processes x gradient_accumulation_steps): use a smaller batch or more data"
        )
    t = config.training
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * per_epoch)
    return per_epoch, total


def save_final(final: Path, model, tokenizer, step: int, state_dict: dict | None = None) -> None:
    """The trained model in Hugging Face format, and the ``step`` it was saved at, written beside and
    renamed into place (``state_dict``: the weights gathered from shards; None: the model's own)."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    ckpt.write_final_step(tmp, step)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def check_trackers(trackers: list[str]) -> None:
    """Accelerate drops a tracker whose package is missing with only a warning; refuse instead."""
    import importlib.util

    for name in trackers:
        if not any(importlib.util.find_spec(pkg) for pkg in TRACKER_PACKAGES[name]):
            raise ConfigError(f"report_to={name} needs the '{TRACKER_PACKAGES[name][0]}' package: pip install {TRACKER_PACKAGES[name][0]}")


def has_accelerator_device() -> bool:
    """CUDA/XPU/MPS present; without one, processes started by torchrun or accelerate use gloo on CPU."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


GLOO_RELEASED_FROM = (2, 13)
"""The first torch release where dpokit lets ``destroy_process_group`` really free a gloo group.
On 2.13 that is clean; on 2.6 freeing it hung one process of a two-process run's end in about 5
under load (in gloo, with nothing of dpokit's involved), so releases before 2.13 (those between
are not measured) keep the group until the process exits, as they always did."""


def new_accelerator(timeout_s: int = RunConfig.ddp_timeout, **kwargs) -> Accelerator:
    """An ``Accelerator`` on this machine's device (gloo CPU processes without one): it starts the
    process group of a launched run, which :func:`dpokit.launch.end_process_group` ends, with
    collectives that wait up to ``timeout_s`` seconds (``run.ddp_timeout``) for the other processes.

    From torch 2.13 (:data:`GLOO_RELEASED_FROM`), ``torch.distributed.nn`` is imported before that:
    its functions take ``group.WORLD`` as a default argument, so imported after the group exists
    (transformers and Accelerate import it lazily) they held the group past
    ``destroy_process_group``. gloo's threads then stopped only in the interpreter's teardown, where
    they aborted runs that had succeeded ("terminate called without an active exception", exit
    code -6; 9 of 51 two-process runs under load)."""
    if torch.distributed.is_available() and torch_release() >= GLOO_RELEASED_FROM:
        importlib.import_module("torch.distributed.nn")

    waits = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    return Accelerator(cpu=not has_accelerator_device(), kwargs_handlers=[waits], **kwargs)


def torch_release() -> tuple[int, int]:
    """torch's (major, minor) release, e.g. (2, 13) for 2.13.0+cpu."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _describe_reference(config: Config, sharded: bool) -> str:
    if not needs_reference(config):
        return "none (reference-free loss)"
    source = config.model.ref_model_name_or_path or "the starting policy"
    if config.training.precompute_ref_log_probs:
        return f"{source} (log-probs precomputed once, model not kept)"
    if uses_peft(config.model):
        return f"{source} (the policy with its LoRA adapters switched off)"
    t = config.training
    moving = (f", moved toward the policy every {t.ref_model_sync_steps} steps by {t.ref_model_mixup_alpha} (TR-DPO)"
              if t.sync_ref_model else "")
    return f"{source} ({'a' if moving else 'frozen'} model kept in memory{', sharded like the policy' if sharded else ''}{moving})"


def claim_output_dir(out: Path, config: Config, replaced: list[Path], accelerator, say, data_stats: dict) -> None:
    """Make ``out`` this run's: remove what of an earlier run it replaces (``replaced``, from
    :func:`dpokit.checkpoint.outputs_to_replace`) and write the resolved config and what became of
    each dataset (``data_stats``, :attr:`PreparedData.stats`, into ``data.json``). Done once the data,
    the models and the checkpoint's position have passed their checks, so that a run refused at start
    (a typo in a path, another global batch) leaves the folder as it was."""
    if accelerator.is_main_process:
        for path in replaced:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        summary = {label: stats.to_dict() for label, stats in data_stats.items()}
        (out / ckpt.DATA_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    if replaced:
        say(f"removed from {out}: {', '.join(p.name for p in replaced)} "
            f"({'overwrite_output_dir' if config.run.overwrite_output_dir else 'after the checkpoint this run resumes from'})")
    accelerator.wait_for_everyone()


@sdpa_without_cudnn()
def train(config: Config) -> Path:
    """Run one training job; returns the run directory."""
    started = time.perf_counter()
    t, r = config.training, config.run
    trackers = [x for x in r.report_to if x != "none"]
    out = Path(r.output_dir)
    check_trackers(trackers)
    accelerator = new_accelerator(r.ddp_timeout, log_with=trackers or None, project_dir=str(out))
    sharded = setup_sharding(accelerator, config, autocast_dtype(t))
    stage = zero.setup(accelerator, config)  # None: not DeepSpeed
    set_seed(t.seed)
    say = accelerator.print
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dpokit shows its own progress; weight-loading bars are noise

    resume_from = ckpt.find_checkpoint(r.resume_from_checkpoint, out) if r.resume_from_checkpoint else None
    replaced = ckpt.outputs_to_replace(out, resume_from, r.overwrite_output_dir)  # refuses mixing two runs
    reference_config = moved_reference_config(config, resume_from)  # TR-DPO resumes with its moved reference

    check_device_requirements(config.model, t.optim, torch.cuda.is_available())
    if config.model.attn_implementation == VARLEN_ATTENTION and not torch.cuda.is_available():
        say(f"note: without CUDA, {VARLEN_ATTENTION} runs its exact per-sequence sdpa loop instead of the flash kernel "
            "(slower than attn_implementation=sdpa here)")
    with accelerator.local_main_process_first():  # a builtin: model is built once per machine
        tokenizer = load_tokenizer(config.model)
    with accelerator.main_process_first():
        data = load_data(config.data, tokenizer, t.seed, log=say)
    pad_id = tokenizer.pad_token_id

    # a resumed policy continues from its checkpoint; the reference stays the starting model
    empty = weights_on_main_only(accelerator) and not accelerator.is_main_process  # its shards come from the main process
    policy = load_policy(config.model, str(resume_from) if resume_from else None, empty=empty)
    total_params, trainable = count_parameters(policy)
    warn_low_precision_weights(policy, config, say)
    say(f"policy: {total_params:,} parameters ({trainable:,} trainable, {100 * trainable / total_params:.2f}%"
        f"{'; an image-text model: its language model only, the vision parts frozen' if is_image_text(policy) else ''}); "
        f"reference: {_describe_reference(config, splits_weights(accelerator))}")
    start = starting_reference(reference_config, policy, resume_from is not None, sharded, accelerator, deepspeed=stage is not None)
    if t.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    policy.train()

    world = accelerator.num_processes
    global_batch = pairs_per_step(t, world)
    per_epoch, total_steps = plan_steps(len(data.train), global_batch, config)
    batch_shape = f"{t.per_device_train_batch_size} x {world} processes x {t.gradient_accumulation_steps} accumulation"
    state = ckpt.TrainState(global_batch=global_batch, train_pairs=len(data.train), seed=t.seed,
                            pairs_digest=fingerprint_pairs(data.train))
    unlogged, resumed_at = None, None
    if resume_from is not None:  # said before any reference pass
        this_run, (state, unlogged) = state, ckpt.load_train_state(resume_from)
        resumed_at = state.step
        ckpt.check_same_position(state, this_run, resume_from, batch_shape)
        check_steps_left(state.step, total_steps, resume_from)
        state.global_batch, state.train_pairs, state.seed, state.pairs_digest = (
            this_run.global_batch, this_run.train_pairs, this_run.seed, this_run.pairs_digest)
    warmup = t.warmup_steps if t.warmup_steps > 0 else math.ceil(t.warmup_ratio * total_steps)

    scorer = checked_scorer(policy, config, accelerator)  # checks the model with eager forwards
    check_load_balancing(scorer, config)
    if t.torch_compile:
        compile_layers(policy)
    optimizer = _optimizer(scorer, config, accelerator.device, deepspeed=stage is not None)
    if stage is not None:
        zero.configure(accelerator, config, policy.config.get_text_config().hidden_size)
        loaded_dtypes = {name: p.dtype for name, p in scorer.named_parameters()}  # bfloat16 mode trains a bfloat16 copy
        # a resumed LoRA run's adapters as its checkpoint holds them (a full model's: read from its files)
        resumed_adapters = zero.trained_weights(scorer) if resume_from is not None and uses_peft(config.model) else None
        if stage == 3:
            zero.partition(scorer, accelerator)
    scorer, optimizer = accelerator.prepare(scorer, optimizer)  # under FSDP2, shards the model in place
    # on the optimizer that steps (under DeepSpeed's offload_optimizer, not dpokit's AdamW: see base_optimizer)
    scheduler = make_scheduler(zero.base_optimizer(optimizer), t.lr_scheduler_type, warmup, total_steps)
    unwrapped = accelerator.unwrap_model(scorer)
    if sharded:
        say(f"sharding: {describe(scorer, accelerator)}")
    if stage is not None:
        unwrapped.in_deepspeed_engine = True  # see forward_precision
        say(f"sharding: {zero.describe(accelerator)}")
    reference_start = time.perf_counter()
    train_ref, eval_ref = prepare_references(config, unwrapped, start, data, accelerator, pad_id, say, state.pairs_digest)
    reference_seconds = time.perf_counter() - reference_start if isinstance(train_ref, TableReference) else None
    # fp16's dynamic loss scaling; with it off, scale() returns the loss and step() steps
    scaler = torch.amp.GradScaler(accelerator.device.type, enabled=t.fp16)

    if resume_from is not None:
        if stage is not None:
            zero.load_optimizer_state(accelerator, unwrapped, optimizer, lambda: ckpt.read_optimizer_state(resume_from),
                                      ckpt.SavedWeights(resume_from) if resumed_adapters is None else resumed_adapters)
        else:
            load_optimizer_state(accelerator, scorer, optimizer, lambda: ckpt.read_optimizer_state(resume_from))
        note = ckpt.load_scheduler_and_rng(resume_from, scheduler, accelerator.process_index, scaler)
        if note:
            print(note)  # this process's own
        follow_schedule(scheduler, t.learning_rate)  # this run's rate and schedule, which a resume may change
        follow_optimizer_settings(optimizer, t)  # and its weight decay, betas and epsilon
        say(f"resumed from {resume_from} at step {state.step}")
        ahead = ckpt.final_step(out)
        if ahead is not None and ahead > state.step and ckpt.is_own_checkpoint(resume_from, out):
            say(f"note: {out / 'final'} holds the model trained to step {ahead}: steps {state.step + 1}-{ahead} are trained again from "
                f"this checkpoint, and final/ is replaced when the run ends")
    claim_output_dir(out, config, replaced, accelerator, say, data.stats)  # every check passed: only now is the folder changed
    left_out = len(data.train) - per_epoch * global_batch  # each epoch's tail, a different one per epoch
    shape = {"processes": world, "device": describe_device(accelerator.device), "global_batch": global_batch,
             "per_device_train_batch_size": t.per_device_train_batch_size,
             "gradient_accumulation_steps": t.gradient_accumulation_steps, "train_pairs": len(data.train),
             "left_out_per_epoch": left_out, "eval_pairs": len(data.eval or []), "eval_held_out": data.eval_held_out,
             "steps_per_epoch": per_epoch, "total_steps": total_steps}
    record = RunRecord.start(out, shape, resumed_at) if accelerator.is_main_process else None

    def whole_model_state(model: ReplyLogProbs | None = None) -> dict | None:
        """The policy's (or ``model``'s: TR-DPO's reference, of the same architecture) whole state;
        every process calls it. None: the model saves its own."""
        if stage is not None:
            return zero.full_model_state(accelerator, model or unwrapped, loaded_dtypes)
        return full_model_state(accelerator, model or scorer)

    def whole_optimizer_state() -> dict | None:
        return zero.optimizer_state(accelerator, unwrapped, optimizer) if stage is not None else optimizer_state(accelerator, scorer, optimizer)

    def keep_record(**session) -> None:  # this session's steps and time, in run.json
        if record is not None:
            record.update(to_step=state.step, wall_seconds=round(time.perf_counter() - started, 3), **session)

    keep_record(reference_seconds=None if reference_seconds is None else round(reference_seconds, 3))
    if trackers:  # a resumed run's TensorBoard events after its checkpoint are dropped, as its rows are
        purge = {"tensorboard": {"purge_step": state.step + 1}} if resume_from is not None and "tensorboard" in trackers else {}
        accelerator.init_trackers(ckpt.TRACKER_DIR, config={k: str(v) for k, v in config.to_dict().items()}, init_kwargs=purge)
    earlier = ckpt.earlier_rows(resume_from, out) if resume_from is not None else None
    log = MetricsLog(out / "metrics.jsonl", accelerator, keep_until_step=state.step if resume_from else None, earlier=earlier)
    if resume_from is not None and not ckpt.is_own_checkpoint(resume_from, out):
        say(f"metrics.jsonl starts with the {log.carried} rows {earlier} logged up to step {state.step}" if log.carried else
            f"note: metrics.jsonl starts after step {state.step}: "
            + (f"{earlier} is not there" if earlier is not None else f"{resume_from} is not in a run's checkpoints/ folder"))
    say(f"training: {len(data.train)} pairs, {per_epoch} steps/epoch, {total_steps} steps, "
        f"global batch {global_batch} = {batch_shape}"
        + (f"; each epoch leaves out {left_out} pairs (its shuffled tail, short of a global batch)" if left_out else ""))

    # a bar on a terminal; into a log file, a line per logged step (a bar's redraws made one long line)
    shows = r.progress_bar and accelerator.is_local_main_process
    progress = bar(total_steps, "train", initial=state.step) if shows and on_terminal() else None
    eval_progress = "eval" if shows else None

    def run_eval() -> dict | None:
        if not data.eval:
            return None
        eval_start = time.perf_counter()
        metrics = evaluate(unwrapped, eval_ref, data.eval, config, accelerator, pad_id, eval_progress)  # host numbers: the device is done
        log.write({"step": state.step, "epoch": round(state.step / per_epoch, 4), **metrics,
                   "eval/seconds": time.perf_counter() - eval_start})
        if shows:  # a line per eval, above the bar on a terminal: overfitting shows while the run goes on
            line = (f"eval at step {state.step}: loss={metrics['eval/loss']:.4f}, acc={metrics['eval/rewards/accuracies']:.2f}, "
                    f"margin={metrics['eval/rewards/margins']:.3f}")
            if progress is not None:
                progress.write(line)
            else:
                say(line)
        return metrics

    if r.eval_on_start and state.step == 0:
        run_eval()
    window = LogWindow.restored(unlogged, accelerator)  # training time only: evals and saves are not counted
    resumed_at_end = resume_from is not None and state.step == total_steps  # nothing left to train
    while state.step < total_steps:
        batches = global_batches(len(data.train), global_batch, t.seed, state.epoch)
        while state.batch_in_epoch < len(batches) and state.step < total_steps:
            step_start = time.perf_counter()
            micro = local_micro_batches(batches[state.batch_in_epoch], accelerator.process_index, world, t.per_device_train_batch_size)
            step_stats, step_tokens = [], 0
            for k, idx in enumerate(micro):
                batch = build_batch([data.train[i] for i in idx], config, pad_id).to(accelerator.device)
                step_tokens += batch.num_real_tokens
                last = k == len(micro) - 1
                with nullcontext() if last or stage is not None else accelerator.no_sync(scorer):
                    with forward_precision(config.training, accelerator, unwrapped):
                        loss, stats = score_batch(scorer, train_ref.logps(batch, idx), batch, config)
                    if stage is not None:  # DeepSpeed's engine: its own backward, reducing on the last micro-batch
                        zero.backward(scorer, loss.mean() / len(micro), last)
                    else:
                        accelerator.backward(scaler.scale(loss.mean() / len(micro)))
                step_stats.append(stats)
            lr = scheduler.get_last_lr()[0]
            if stage is not None:  # clipping, AdamW and zeroing are the engine's step
                grad_norm, skipped = zero.step(scorer), False
            else:
                scaler.unscale_(optimizer)
                grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
                scale = scaler.get_scale()  # 1.0 without fp16; with it, a host read of the scale
                scaler.step(optimizer)  # skipped (fp16) when the gradients overflowed; the scale then drops
                scaler.update()
                skipped = scaler.get_scale() < scale
            if not skipped:  # as transformers' Trainer: a skipped step leaves the schedule alone
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch += 1
            if t.sync_ref_model and state.step % t.ref_model_sync_steps == 0:
                sync_reference(train_ref.scorer, unwrapped, t.ref_model_mixup_alpha)

            window.add(step_stats, None if skipped else grad_norm, lr, step_tokens, accelerator)
            logs = state.step % r.logging_steps == 0 or state.step == total_steps
            evals = bool(r.eval_steps) and state.step % r.eval_steps == 0 and state.step < total_steps
            # the last step too (as transformers' Trainer): a finished run can be continued from it
            saves = bool(r.save_steps) and (state.step % r.save_steps == 0 or state.step == total_steps)
            if logs or evals or saves:
                window.settle()  # waits for the device, so that the seconds include this step's work
            window.seconds += time.perf_counter() - step_start
            if logs:
                row = {"step": state.step, "epoch": round(state.step / per_epoch, 4), **window.row(accelerator, global_batch)}
                log.write(row)
            if shows and logs:
                brief = dict(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}",
                             margin=f"{row['rewards/margins']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
                if progress is None:
                    say(f"step {state.step}/{total_steps}: " + ", ".join(f"{k}={v}" for k, v in brief.items()))
            if progress is not None:
                progress.update(1)
                if logs:  # after the count moved on: the bar shows this row beside its step
                    progress.set_postfix(**brief)
            if logs:
                window = LogWindow()
            if evals:
                run_eval()
            if saves:
                moving = train_ref.scorer if t.sync_ref_model else None  # TR-DPO's reference is part of the state
                ckpt.save_checkpoint(accelerator, out / "checkpoints", state, unwrapped.model, tokenizer,
                                     whole_optimizer_state(), scheduler, r.save_total_limit, scaler,
                                     whole_model_state(), window.saved(accelerator),
                                     moving.model if moving else None, whole_model_state(moving) if moving else None)
                keep_record()
        if state.batch_in_epoch >= len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
    if progress is not None:
        progress.close()

    if resumed_at_end and window.steps:  # the checkpoint's steps since its last row are that row
        log.write({"step": state.step, "epoch": round(state.step / per_epoch, 4), **window.row(accelerator, global_batch)})
    if not (resumed_at_end and evaluated_at(out / "metrics.jsonl", state.step, accelerator)):  # saved after its eval
        run_eval()
    weights = whole_model_state()  # gathered from the shards; None unsharded
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(out / "final", unwrapped.model, tokenizer, state.step, weights)
        keep_record(finished=True)
        from dpokit.report import make_report

        say(make_report(out, plots=r.plots))
    accelerator.wait_for_everyone()
    end_process_group(accelerator)
    return out
