"""Reference log-probs: from a live frozen model, or computed once and cached on disk.

A reference model is only needed for its summed reply log-probs on the training pairs, which
never change. So by default dpokit scores every pair once before training, in a no-grad pass
with the same batch layout, keeps the results as a table ``[N, 2]`` (chosen, rejected) and frees
the reference: training then holds one model, not two. Training pairs are scored in the first
epoch's micro-batches, so where 16-bit kernels round by batch shape the first epoch still sees
exactly the numbers a live reference would give. Tables are cached on disk under a key made of a
fingerprint of the reference weights, its dtype and attention implementation, and the token ids
of the pairs (with 16-bit compute, also the batching), so a second run with the same reference
and data skips the pass.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import xxhash
from accelerate.utils import gather_object

from dpokit.data.batching import Batch, to_device
from dpokit.data.tokenize import TokenizedPair
from dpokit.logps import ReplyLogProbs
from dpokit.run_record import installed_versions
from dpokit.sharding import in_lockstep, unwrapped_name
from dpokit.tiny import cache_dir as cache_root


class Reference(ABC):
    """Reference log-probs for micro-batches: ``logps(batch, pair_indices)`` -> [2P] or None."""

    @abstractmethod
    def logps(self, batch: Batch, pair_indices: list[int]) -> torch.Tensor | None: ...


class NoReference(Reference):
    """Reference-free losses (SimPO, SFT)."""

    def logps(self, batch: Batch, pair_indices: list[int]) -> None:
        return None


class LiveReference(Reference):
    """A frozen model scored on each micro-batch, in the batch's own layout. ``engine``: under
    DeepSpeed, the engine that holds ``scorer`` (:func:`dpokit.zero.prepare_frozen`), kept as long as
    the reference is."""

    def __init__(self, scorer: ReplyLogProbs, engine=None):
        self.scorer = scorer
        self.engine = engine

    def logps(self, batch: Batch, pair_indices: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return batch.ld_weighted(self.scorer(**batch.model_inputs()))


@contextmanager
def adapters_switched_off(scorer: ReplyLogProbs):
    """``scorer``'s peft model with its LoRA adapters (and trained copies of modules to save) off
    inside the block: the base model's scores. peft marks the adapters frozen while they are off
    (and peft 0.13 the original of a module to save trainable, with a tied embedding's weight);
    FSDP2 chooses its gradient dtypes from what trains at its first forward, which may be this one:
    what trains stays marked as training, and nothing else."""
    trained = {id(p) for p in scorer.parameters() if p.requires_grad}
    with scorer.model.disable_adapter():
        for p in scorer.parameters():
            p.requires_grad_(id(p) in trained)
        yield


class AdapterOffReference(LiveReference):
    """The policy itself with its LoRA adapters switched off: the base weights exist once."""

    def logps(self, batch: Batch, pair_indices: list[int]) -> torch.Tensor:
        with torch.no_grad(), adapters_switched_off(self.scorer):
            return batch.ld_weighted(self.scorer(**batch.model_inputs()))


class TableReference(Reference):
    """Precomputed log-probs: ``table[i]`` = (chosen, rejected) of pair ``i``."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [N, 2] float32, on the CPU

    def logps(self, batch: Batch, pair_indices: list[int]) -> torch.Tensor:
        return to_device(self.table[pair_indices].reshape(-1), batch.input_ids.device)  # [2P] interleaved


@torch.no_grad()
def sync_reference(reference: ReplyLogProbs, policy: ReplyLogProbs, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024): each reference weight becomes
    α·policy + (1 - α)·reference, in place. Weights pair up by name (activation-checkpoint and compile
    wrappers left out). Under FSDP2 and DeepSpeed's ZeRO-3 both models are sharded alike, so each
    process updates its own shards (:func:`dpokit.zero.lerp_slice`), with no communication."""
    from dpokit.zero import lerp_slice

    policy_weights = {unwrapped_name(name): p for name, p in policy.named_parameters()}
    for name, weight in reference.named_parameters():
        source = policy_weights[unwrapped_name(name)]
        if hasattr(weight, "ds_tensor"):
            lerp_slice(weight, source, alpha)
        else:
            weight.lerp_(source.to(weight.dtype), alpha)


def as_reference(reference) -> Reference:
    """Accept a :class:`Reference`, a bare :class:`ReplyLogProbs` (live), or None (no reference)."""
    if reference is None:
        return NoReference()
    if isinstance(reference, ReplyLogProbs):
        return LiveReference(reference)
    return reference


NOT_SCORING = ("_name_or_path", "_commit_hash", "transformers_version", "use_cache")
"""Config entries that do not change a model's scores (where it was read from, generation's cache)."""


def fingerprint_model(model: torch.nn.Module, adapters_off: bool = False) -> str:
    """Content hash of what decides ``model``'s scores: its config (rope, norm epsilon, logit scaling
    and soft-capping live only there; less :data:`NOT_SCORING`), the attention implementation and every
    parameter and buffer (name, dtype, shape, bytes; non-persistent buffers too): equal fingerprints
    score equally. ``adapters_off``: of a peft model as it scores with its adapters switched off (the
    base's names; LoRA tensors and trained copies of modules to save left out), so fresh adapters of
    any seed, and the same adapters after training, hash as their base."""
    h = xxhash.xxh3_128()
    h.update(str(getattr(model.config, "_attn_implementation", "")).encode())
    settings = {k: v for k, v in model.config.to_dict().items() if k not in NOT_SCORING}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = {**model.state_dict(), **dict(model.named_buffers())}
    for name, tensor in sorted(tensors.items()):
        if adapters_off:
            if "lora_" in name or ".modules_to_save." in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())  # 0-d too
    return h.hexdigest()


def fingerprint_pairs(pairs: list[TokenizedPair]) -> str:
    """Hash of every pair's token ids, in order."""
    h = xxhash.xxh3_128()
    for pair in pairs:
        for part in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            h.update(len(part).to_bytes(4, "little"))
            h.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def compute_table(
    scorer: ReplyLogProbs,
    pairs: list[TokenizedPair],
    build: Callable[[list[TokenizedPair]], Batch],
    batches: list[list[int]],
    accelerator,
    progress: str | None = None,
) -> torch.Tensor:
    """Score all ``pairs`` with no grad, in the caller's autocast state (training's mixed precision):
    this process the pair indices of its ``batches`` (each built by ``build``), the processes together
    every pair once (:func:`dpokit.data.batching.eval_batches`, or training's
    :func:`~dpokit.data.batching.first_epoch_micro_batches`). Every process gets the whole [N, 2] table.
    ``progress``: the label of a bar over the batches on a terminal (:func:`dpokit.progress.shown`)."""
    from dpokit.progress import shown

    parts = []
    with torch.no_grad():
        for idx, keep in shown(in_lockstep(batches, accelerator, scorer), len(batches), progress):
            batch = build([pairs[i] for i in idx]).to(accelerator.device)
            logps = batch.ld_weighted(scorer(**batch.model_inputs()))
            if keep:
                parts.append((idx, logps.float().cpu().view(-1, 2)))
    table = torch.zeros(len(pairs), 2)
    for idx, values in gather_object(parts):
        table[idx] = values
    return table


def cache_dir() -> Path:
    """``$DPOKIT_CACHE/reference`` (default ``~/.cache/dpokit/reference``)."""
    return cache_root() / "reference"


def cached_table(
    model_fingerprint: str,
    pairs: list[TokenizedPair],
    compute,
    accelerator,
    what: str,
    log=print,
    batching: str = "",
    pairs_digest: str | None = None,
) -> torch.Tensor:
    """The [N, 2] table for ``pairs`` from the disk cache, or ``compute()`` it and store it.
    ``batching`` names how the pairs were batched, where that changes the numbers (16-bit compute);
    ``pairs_digest``: :func:`fingerprint_pairs` of ``pairs``, where the caller has it already.

    The processes decide together (``compute`` is collective): the table is read only when every one
    finds it, as a cache on each machine's own disk may hold it on one machine and not another. Each
    machine's first process writes it, so every machine's cache fills."""
    digest = pairs_digest or fingerprint_pairs(pairs)
    key = xxhash.xxh3_128(f"{model_fingerprint}:{digest}:{batching}:{scoring_code()}".encode()).hexdigest()
    path = cache_dir() / f"{key}.pt"
    table = _read_table(path, len(pairs))
    found = torch.tensor([table is not None], dtype=torch.float32, device=accelerator.device)
    if accelerator.num_processes > 1:
        found = accelerator.gather(found)
    if bool(found.all()):
        log(f"reference: {what} log-probs of {len(pairs)} pairs loaded from {path}")
        return table
    start = time.perf_counter()
    table = compute()
    stored = f"cached at {path}"
    if accelerator.is_local_main_process:
        try:
            _write_table(table, path)
        except OSError as e:  # a read-only or full disk: the run goes on with the table it holds
            stored = f"not cached ({e}; set DPOKIT_CACHE to a writable folder to keep it)"
    accelerator.wait_for_everyone()
    log(f"reference: {what} log-probs of {len(pairs)} pairs computed in {time.perf_counter() - start:.1f}s, {stored}")
    return table


def _write_table(table: torch.Tensor, path: Path) -> None:
    """``table`` to ``path`` through a temporary file beside it (machines may share the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def scoring_code() -> str:
    """A hash of dpokit's code and the torch, transformers and peft releases: a table scored by other
    code (a fixed bug, another kernel) is not read back."""
    h = xxhash.xxh3_128()
    for name, release in installed_versions(("torch", "transformers", "peft")).items():
        h.update(f"{name} {release or 'none'};".encode())
    package = Path(__file__).parent
    for source in sorted(package.rglob("*.py")):
        h.update(str(source.relative_to(package)).encode())
        h.update(source.read_bytes())
    return h.hexdigest()


def _read_table(path: Path, n_pairs: int) -> torch.Tensor | None:
    """The cached [N, 2] table at ``path``, or None where there is none of that shape (or it cannot be read)."""
    if not path.is_file():
        return None
    try:
        table = torch.load(path, weights_only=True)
    except Exception:  # a damaged file: computed again and replaced
        return None
    return table if isinstance(table, torch.Tensor) and table.shape == (n_pairs, 2) else None
