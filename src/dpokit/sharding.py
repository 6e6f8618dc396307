"""Sharded training (FSDP2 through Accelerate): what changes when each process holds a slice of the weights.

Launch the same config with ``accelerate launch --use_fsdp --fsdp_version 2 -m dpokit train cfg.yaml``
(or an Accelerate config file with ``distributed_type: FSDP`` and ``fsdp_version: 2``).

Accelerate shards the module dpokit prepares, :class:`dpokit.logps.ReplyLogProbs` around the model:
each decoder layer is its own unit (the model's ``_no_split_modules``, which the scorer passes on),
and the rest (embedding, final norm, output layer) belongs to the root unit, whose weights are
gathered for the scorer's whole forward. So dpokit's chunked log-probs read the output layer's full
weight inside that forward, and its gradient is reduce-scattered like any other.

16-bit compute is FSDP2's mixed-precision policy rather than autocast (:func:`setup`), and
a separate reference model is sharded like the policy (:func:`shard_frozen`). Beyond that, three
things differ from unsharded training, and this module holds them too:

- A forward is a collective (each unit's weights are all-gathered), so every process must run the
  same number of forwards: :func:`in_lockstep` pads evaluation with forwards whose results are
  dropped, and gives the gathered weights back afterwards.
- Saving needs the full weights: :func:`full_model_state` gathers them to the main process.
- The optimizer state is saved whole, keyed by parameter name (:func:`optimizer_state`), and
  loaded back into any sharding (:func:`load_optimizer_state`): a run resumes on any number of
  processes, sharded or not. Unsharded runs save torch's own format (keyed by position); both
  load into either kind of run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from dpokit.config import ConfigError
from dpokit.modeling import decoder_layers


def is_sharded(accelerator) -> bool:
    """Whether Accelerate shards the prepared model (FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def splits_weights(accelerator) -> bool:
    """Whether each process holds a slice of the weights, gathered for every forward: FSDP2
    (:func:`is_sharded`) or DeepSpeed's ZeRO-3 (:func:`dpokit.zero.partitions_weights`)."""
    from dpokit.zero import partitions_weights

    return is_sharded(accelerator) or partitions_weights(accelerator)


def sharded_by_fsdp(model: torch.nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) has sharded ``model`` or one of its modules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


FSDP2_LAUNCH = "accelerate launch --use_fsdp --fsdp_version 2 ..."


def weights_on_main_only(accelerator) -> bool:
    """Whether only the main process reads the weights: sharded and launched with Accelerate's
    ``cpu_ram_efficient_loading``, under which preparing the model broadcasts the main process's
    weights into every process's shards; or under DeepSpeed's ZeRO-3 with ``zero3_init_flag`` (on by
    default there), whose partitioning broadcasts them (:func:`dpokit.zero.partition`). The other
    processes then build the model empty (:func:`dpokit.modeling.empty_causal_lm`): no whole copy of
    it in each process's host memory."""
    from dpokit.zero import partitions_weights

    if partitions_weights(accelerator):
        return bool(getattr(accelerator.state.deepspeed_plugin, "zero3_init_flag", False))
    return is_sharded(accelerator) and bool(getattr(accelerator.state.fsdp_plugin, "cpu_ram_efficient_loading", False))


def fsdp_asked_but_not_given(accelerator) -> bool:
    """Whether ``accelerate launch --use_fsdp`` started several processes that Accelerate did not shard:
    it turns FSDP on only where there is an accelerator device, and runs CPU processes data parallel."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return asked and accelerator.distributed_type == DistributedType.MULTI_CPU


def check_sharding(accelerator, config) -> None:
    """dpokit shards through FSDP2 (Accelerate 1.6+) or DeepSpeed (:mod:`dpokit.zero`, which checks its
    own). Before any model is loaded, refuse FSDP1 and what has not been made to work sharded (QLoRA's
    4-bit weights, 8-bit AdamW)."""
    if not is_sharded(accelerator):
        return
    if not getattr(accelerator, "is_fsdp2", False):
        raise ConfigError(
            f"dpokit shards with FSDP2: launch with `{FSDP2_LAUNCH}` "
            "(fsdp_version: 2 in an Accelerate config file; Accelerate 1.6 or newer)"
        )
    if accelerator.mixed_precision != "no":
        raise ConfigError(
            f"launched with Accelerate's mixed precision ({accelerator.mixed_precision}): under FSDP2 dpokit sets "
            "it from the config's bf16/fp16 keys; launch with --mixed_precision no"
        )
    unsupported = [what for what, on in (("model.load_in_4bit (QLoRA)", config.model.load_in_4bit),
                                         ("optim=adamw_8bit", config.training.optim == "adamw_8bit")) if on]
    if unsupported:
        raise ConfigError(
            f"{' and '.join(unsupported)} not supported under FSDP2 yet: launch without --use_fsdp "
            "(one process per GPU, each holding the model), or train with load_in_4bit=false and optim=adamw_torch"
        )


def setup(accelerator, config, compute_dtype: torch.dtype | None) -> bool:
    """Before anything is loaded: refuse what dpokit does not shard (:func:`check_sharding`) and,
    under FSDP2, settle how Accelerate will shard. Returns whether the run is sharded.

    - Each decoder layer is a unit unless the launch chose a wrap policy: Accelerate's own default
      wraps nothing, so every forward would gather the whole model at once.
    - Launched with Accelerate's ``cpu_ram_efficient_loading``, only the main process reads the
      weights, checks the model and fingerprints the reference; the others build the model empty and
      take its findings (:func:`weights_on_main_only`). Otherwise every process loads the whole model.
      dpokit builds the empty models itself, so every load tells transformers not to
      (:func:`dpokit.modeling.every_weight_read`; its own way differs between 4.x and 5.x, and 5.x
      still reads every weight on every process).
    - 16-bit compute (``compute_dtype``: ``bf16``/``fp16``) is FSDP2's mixed-precision policy, not
      autocast: each unit's weights are gathered in 16 bits and its gradients reduced in float32
      onto the float32 shards. Autocast would cast every gathered weight to a 16-bit copy that
      autograd keeps until the backward, about two bytes per parameter of the whole model on every
      process.
    """
    check_sharding(accelerator, config)
    if not is_sharded(accelerator):
        from dpokit.zero import deepspeed_asked_but_not_given

        for flag, not_given in (("--use_fsdp", fsdp_asked_but_not_given), ("--use_deepspeed", deepspeed_asked_but_not_given)):
            if not_given(accelerator):
                accelerator.print(f"note: launched with {flag}, but Accelerate shards only on accelerator devices (GPUs): "
                                  "these CPU processes train data parallel, each holding the whole model")
        return False
    plugin = accelerator.state.fsdp_plugin
    if "FSDP_AUTO_WRAP_POLICY" not in os.environ:
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin.auto_wrap_policy = transformer_auto_wrap_policy
    if compute_dtype is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return True


def shard_frozen(scorer: torch.nn.Module, accelerator) -> None:
    """Shard a frozen scorer (a reference model) as the policy is: each layer a unit, the rest the
    root, the same mixed precision; its weights are gathered for each forward and given back after.
    Under :func:`weights_on_main_only` the shards are then filled from the main process's weights, as
    Accelerate fills the policy's (the other processes' own weights were never read)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = accelerator.state.fsdp_plugin.mixed_precision_policy
    options = {"mp_policy": policy if isinstance(policy, MixedPrecisionPolicy) else MixedPrecisionPolicy(),
               "reshard_after_forward": True}
    full = scorer.state_dict() if weights_on_main_only(accelerator) else None  # whole on the main process
    for layer in decoder_layers(scorer):
        fully_shard(layer, **options)
    fully_shard(scorer, **options)
    if full is not None:
        from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict

        fsdp2_load_full_state_dict(accelerator, scorer, full)


def describe(scorer: torch.nn.Module, accelerator) -> str:
    """One line on how the prepared model is sharded, e.g. ``FSDP2 over 2 processes: 3 units (2
    Qwen2DecoderLayer, root)``, and which modules Accelerate's activation checkpointing wrapped
    (``; activation checkpointing: 2 Qwen2DecoderLayer``): Accelerate 1.6 shards the layer inside
    each wrapper, later releases the wrapper itself, so the units alone do not show it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    def counted(names: list[str]) -> str:
        return ", ".join(f"{names.count(name)} {name}" for name in dict.fromkeys(names))

    units = [type(m).__name__.removeprefix("FSDP") for m in scorer.modules() if isinstance(m, FSDPModule)]
    line = f"FSDP2 over {accelerator.num_processes} processes: {len(units)} units ({', '.join(filter(None, [counted(units[1:]), 'root']))})"
    if weights_on_main_only(accelerator):
        line += "; weights read by the main process only, broadcast into the shards"
    wrapped = [type(m._checkpoint_wrapped_module).__name__.removeprefix("FSDP") for m in scorer.modules() if isinstance(m, CheckpointWrapper)]
    return line + (f"; activation checkpointing: {counted(wrapped)}" if wrapped else "")


def in_lockstep(batches: list[list[int]], accelerator, model: torch.nn.Module) -> Iterator[tuple[list[int], bool]]:
    """This process's no-grad ``batches`` (pair indices) for ``model`` as ``(indices, keep)``. Under
    sharding every forward gathers weights with all processes, so a process with fewer batches than
    another adds forwards of pair 0 whose results it drops (``keep`` False), and after the last
    forward ``model``'s gathered weights are given back (:func:`reshard`); unsharded, just its own.
    DeepSpeed's ZeRO-3 gathers weights in every forward too (:func:`splits_weights`)."""
    if not splits_weights(accelerator):
        yield from ((idx, True) for idx in batches)
        return
    rounds = int(accelerator.gather(torch.tensor([len(batches)], device=accelerator.device)).max())
    for k in range(rounds):
        yield (batches[k], True) if k < len(batches) else ([0], False)
    reshard(model)


def reshard(module: torch.nn.Module) -> None:
    """Give back the gathered weights after forwards without a backward (evaluation): FSDP2 keeps the
    root unit's weights gathered from a forward until the backward, and a state-dict gather or an
    optimizer step needs them sharded again. Nothing for an unsharded module."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def full_model_state(accelerator, scorer: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The wrapped model's whole state dict on the main process (CPU tensors, keys as the model's own
    ``state_dict``), gathered from the shards; None when unsharded (the model saves itself). Every
    process must call this."""
    if not is_sharded(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first_name = {}  # a tied weight (output layer = embedding) is saved once, as the model saves it
    for name, param in scorer.named_parameters(remove_duplicate=False):
        first_name.setdefault(param, name)
    tied = {name for name, param in scorer.named_parameters(remove_duplicate=False) if first_name[param] != name}
    return {name.removeprefix("model."): tensor for name, tensor in full.items() if name not in tied}


_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")
"""Name parts that activation-checkpoint and compile wrappers insert, which FSDP2's saved names leave out."""


def unwrapped_name(name: str) -> str:
    """A parameter's name without the parts of :data:`_WRAPPERS`: the name the bare model gives it."""
    for part in _WRAPPERS:
        name = name.replace(part, "")
    return name


def _names_in_order(scorer: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The scorer's parameter names, as FSDP2 saves them, in the optimizer's order (torch's state
    keys are positions in it)."""
    name_of = {p: unwrapped_name(name) for name, p in scorer.named_parameters()}
    return [name_of[p] for group in optimizer.param_groups for p in group["params"]]


def keyed_by_name(state: dict) -> bool:
    """Whether an optimizer state dict is keyed by parameter name (a sharded run's), not by position."""
    return any(isinstance(key, str) for group in state["param_groups"] for key in group["params"])


def named_state(state: dict, names: list[str]) -> dict:
    """torch's optimizer state dict (keys: positions) -> keyed by parameter name, as FSDP2 saves it."""
    return {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def positional_state(state: dict, names: list[str]) -> dict:
    """The inverse of :func:`named_state`, for ``optimizer.load_state_dict``."""
    position = {name: i for i, name in enumerate(names)}
    return {
        "state": {position[n]: s for n, s in state["state"].items()},
        "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state(accelerator, scorer: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """What ``optimizer.pt`` holds: torch's own state dict unsharded; sharded, the whole state keyed by
    parameter name, gathered to the main process (None on the others). Every process must call this."""
    if not is_sharded(accelerator):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # torch's, inside Accelerate's wrapper
    full = get_optimizer_state_dict(scorer, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if accelerator.is_main_process else None


def load_optimizer_state(accelerator, scorer: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         read: Callable[[], dict]) -> None:
    """Load an optimizer state written by a sharded or an unsharded run; ``read()`` returns it (the
    checkpoint's ``optimizer.pt``). Sharded, only the main process reads it (it is broadcast);
    unsharded, every process does."""
    names = _names_in_order(accelerator.unwrap_model(scorer), optimizer)
    if not is_sharded(accelerator):
        state = read()
        optimizer.load_state_dict(positional_state(state, names) if keyed_by_name(state) else state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = read() if accelerator.is_main_process else {}
    if accelerator.is_main_process and not keyed_by_name(state):
        state = named_state(state, names)
    set_optimizer_state_dict(
        scorer, getattr(optimizer, "optimizer", optimizer), state,
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
