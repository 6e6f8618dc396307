"""DeepSpeed ZeRO (stages 1-3) through Accelerate: what changes when DeepSpeed's engine trains the model.

Launch the same config with ``accelerate launch --use_deepspeed --zero_stage 3 -m dpokit train cfg.yaml``,
or with ``--deepspeed_config_file ds.json`` (``examples/accelerate/zero3.json``).

Who decides what:

- dpokit's config decides what it decides in any other run: the batch (``per_device_train_batch_size``,
  ``gradient_accumulation_steps``), ``max_grad_norm``, ``bf16``, the AdamW optimizer and its schedule.
  :func:`configure` writes them into DeepSpeed's config (:data:`DECIDED_BY_DPOKIT`); a DeepSpeed config
  file leaves those keys out or ``"auto"``, or gives the same values: another value is refused, and so is
  an ``optimizer`` or ``scheduler`` section.
- DeepSpeed's config decides the ZeRO stage, offloading, bucket sizes and the rest of
  ``zero_optimization``. Its ``"auto"`` sizes are filled from the model's hidden size, as Accelerate does.

``bf16: true`` is DeepSpeed's bfloat16 mode: the engine's weights and gradients in bfloat16, float32
master weights and AdamW states in its optimizer (not autocast over float32 weights, as elsewhere).
The engine runs the backward and the optimizer step (:func:`backward`, :func:`step`); the learning rate
follows dpokit's schedule, which sets it on the AdamW that DeepSpeed's optimizer wraps.

transformers is not asked to build the model partitioned: dpokit checks it with whole weights on the
host first. Under ZeRO-3 with ``zero3_init_flag`` (Accelerate's default there) only the main process
reads the weights, the others build the model empty, and :func:`partition` broadcasts each weight
onto every device and partitions it there, before the engine; otherwise every process reads the
whole model. A separate reference model gets an engine of its own (:func:`prepare_frozen`),
partitioned under ZeRO-3 too. Checkpoints are dpokit's own, whole and keyed by name
(:func:`full_model_state`: the float32 master weights; :func:`optimizer_state`), so a run saved under
ZeRO resumes under any stage, any number of processes, FSDP2 or one process, and the other way round.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from collections.abc import Callable, Iterator

import torch

from dpokit.config import Config, ConfigError

DECIDED_BY_DPOKIT = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                     "gradient_clipping", "bf16.enabled", "fp16.enabled")
"""The DeepSpeed config keys dpokit fills from its own config (:func:`dpokit_values`)."""

HIDDEN_SIZE_KEYS = {  # as Accelerate fills them for a model with a config
    "zero_optimization.reduce_bucket_size": lambda h: h * h,
    "zero_optimization.stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "zero_optimization.stage3_param_persistence_threshold": lambda h: 10 * h,
}


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage DeepSpeed runs (0-3), or None when the run is not DeepSpeed's."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_deepspeed(accelerator) -> bool:
    """Whether DeepSpeed's engine trains the prepared model."""
    return zero_stage(accelerator) is not None


def partitions_weights(accelerator) -> bool:
    """Whether each process holds a slice of the weights (ZeRO-3): every forward is then a collective."""
    return zero_stage(accelerator) == 3


def deepspeed_asked_but_not_given(accelerator) -> bool:
    """Whether ``accelerate launch --use_deepspeed`` started processes that Accelerate runs without
    DeepSpeed: it uses DeepSpeed only on accelerator devices, and runs CPU processes data parallel."""
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    return asked and accelerator.distributed_type == DistributedType.MULTI_CPU


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _set(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def dpokit_values(config: Config, processes: int) -> dict:
    """The values of :data:`DECIDED_BY_DPOKIT` for ``config`` over ``processes`` processes."""
    t = config.training
    return {
        "train_micro_batch_size_per_gpu": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * processes,
        "gradient_clipping": float(t.max_grad_norm) if t.max_grad_norm > 0 else 0.0,
        "bf16.enabled": bool(t.bf16),
        "fp16.enabled": False,
    }


def check_zero(accelerator, config: Config) -> None:
    """Before any model is loaded: refuse what dpokit does not run under DeepSpeed, and a DeepSpeed
    config that contradicts dpokit's (see the module's docstring)."""
    stage = zero_stage(accelerator)
    if stage is None:
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    where = f"the DeepSpeed config {source}" if source != "none" else "the DeepSpeed config"
    if stage == 0:
        raise ConfigError(f"ZeRO stage 0 is plain data parallelism: launch with `accelerate launch --multi_gpu ...`, "
                          f"or give {where} a zero_optimization stage of 1, 2 or 3")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{where} has a '{section}' section: dpokit builds AdamW and its learning-rate schedule "
                              "from its own config (learning_rate, lr_scheduler_type, warmup_ratio, weight_decay, ...); "
                              f"remove the section")
    t, m = config.training, config.model
    unsupported = [what for what, on in (
        ("fp16 (use bf16: true, DeepSpeed's bfloat16 mode)", t.fp16),
        ("model.load_in_4bit (QLoRA)", m.load_in_4bit),
        ("optim=adamw_8bit", t.optim == "adamw_8bit"),
        ("torch_compile under ZeRO-3", t.torch_compile and stage == 3),
    ) if on]
    if unsupported:
        raise ConfigError(f"{' and '.join(unsupported)} not supported under DeepSpeed yet: turn it off, or launch "
                          "without --use_deepspeed (FSDP2 or one process per GPU)")
    if source != "none":  # launched without a file, Accelerate's flags fill these keys with its defaults: dpokit's replace them
        for key, value in dpokit_values(config, accelerator.num_processes).items():
            given = _get(ds, key)
            # Accelerate has already turned an "auto" precision into False (launched with --mixed_precision no)
            if given is None or given == "auto" or given == value or key.endswith(".enabled") and given is False:
                continue
            raise ConfigError(
                f"{where} sets {key} to {given!r}, but this run's dpokit config makes it {value!r}: dpokit decides "
                f"{', '.join(DECIDED_BY_DPOKIT)} from its own config (bf16: true for DeepSpeed's bfloat16 mode); "
                "write \"auto\" there (or leave it out)"
            )
    if accelerator.mixed_precision not in ("no", "bf16" if t.bf16 else "no"):
        raise ConfigError(f"launched with Accelerate's mixed precision ({accelerator.mixed_precision}): under DeepSpeed "
                          "dpokit sets it from the config's bf16 key; launch with --mixed_precision no")


def setup(accelerator, config: Config) -> int | None:
    """Before anything is loaded: :func:`check_zero`, and models read whole (transformers' own ZeRO-3
    loading, under which each process builds only its slice, is turned off; see the module's
    docstring). Returns the ZeRO stage, or None for a run without DeepSpeed."""
    check_zero(accelerator, config)
    stage = zero_stage(accelerator)
    if stage == 3:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return stage


def configure(accelerator, config: Config, hidden_size: int) -> None:
    """Just before ``accelerator.prepare``: write :func:`dpokit_values` into DeepSpeed's config, and its
    ``"auto"`` bucket sizes from the model's ``hidden_size``."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    for key, value in dpokit_values(config, accelerator.num_processes).items():
        _set(ds, key, value)
    for key, size in HIDDEN_SIZE_KEYS.items():
        if _get(ds, key) == "auto":
            _set(ds, key, size(hidden_size))
    ds["zero_allow_untested_optimizer"] = True  # torch's AdamW as DeepSpeed's client optimizer


def partition(scorer: torch.nn.Module, accelerator) -> None:
    """Under ZeRO-3, before DeepSpeed's engine takes ``scorer`` (whose weights are on the host, where
    dpokit checked them): each weight in turn onto this process's device and partitioned there
    (DeepSpeed's ``zero.Init`` over a built module; its partition kept where ``offload_param`` says),
    so the whole model is never on one device. Left to the engine, it would move the whole model onto
    each device first. Weights are cast first to the dtype the engine computes in (bfloat16 with
    ``bf16: true``), as the engine casts a model it partitions itself; buffers (which ZeRO does not
    partition) go to the device whole and keep their dtype, as the engine leaves them.

    Every weight is the main process's (``zero.Init`` broadcasts each before partitioning it), and so
    is every buffer: processes that built the model empty
    (:func:`dpokit.sharding.weights_on_main_only`) get the main process's model. So the others' weights
    are never read here (their bfloat16 copies are left unwritten, as an empty model's weights are)."""
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config  # filled by configure()
    if _get(ds, "bf16.enabled"):
        main = accelerator.is_main_process
        for param in scorer.parameters():
            if param.is_floating_point():
                param.data = param.data.to(torch.bfloat16) if main else torch.empty_like(param.data, dtype=torch.bfloat16)
    for module in scorer.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(accelerator.device)
                torch.distributed.broadcast(module._buffers[name], 0)
    deepspeed.zero.Init(module=scorer, config_dict_or_path=ds)


def prepare_frozen(scorer: torch.nn.Module, accelerator):
    """A frozen scorer (a separate reference model) in a DeepSpeed engine of its own, without an
    optimizer, as the policy's engine holds the policy: under ZeRO-3 partitioned across the processes
    (its forwards gather the weights, as the policy's do); under ZeRO-1/2, which partition no weights,
    whole on each process (stage 0). Either way in the dtype the policy's engine computes in (bfloat16
    with ``bf16: true``), so that both score alike. Returns the engine: keep it while ``scorer`` is
    used (its ZeRO-3 hooks go with it). ``scorer`` is then scored directly, as the prepared policy is."""
    import copy

    import deepspeed

    ds = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)  # filled by configure()
    if zero_stage(accelerator) == 3:
        partition(scorer, accelerator)
    else:
        ds["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=scorer, config=ds)
    engine.eval()
    scorer.in_deepspeed_engine = True  # see dpokit.train.forward_precision
    return engine


def partitioned(stage: int) -> str:
    """What ZeRO stage ``stage`` (1-3) divides over the processes, in words: ``optimizer states``,
    ``optimizer states and gradients``, ``optimizer states, gradients and weights``."""
    parts = ["optimizer states", "gradients", "weights"][:stage]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(accelerator) -> str:
    """One line, e.g. ``DeepSpeed ZeRO-3 over 2 processes: optimizer states, gradients and weights partitioned``."""
    stage = zero_stage(accelerator)
    what = partitioned(stage)
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    offloaded = [name for name in ("optimizer", "param") if (zero.get(f"offload_{name}") or {}).get("device") in ("cpu", "nvme")]
    line = f"DeepSpeed ZeRO-{stage} over {accelerator.num_processes} processes: {what} partitioned"
    line += f"; offloaded: {', '.join(offloaded)}" if offloaded else ""
    if stage == 3 and getattr(accelerator.state.deepspeed_plugin, "zero3_init_flag", False):
        line += "; weights read by the main process only, broadcast into the partitions"
    return line


def lerp_slice(weight: torch.nn.Parameter, source: torch.nn.Parameter, alpha: float) -> None:
    """``weight``'s slice on this process moved toward ``source``'s by ``alpha``, in place, for two
    ZeRO-3 parameters of the same shape, which both engines partition alike. Where ``weight`` is held
    whole on this process (gathered, or one of the small weights ZeRO-3 keeps whole between steps),
    that copy is let go: the next forward gathers it again from the moved slices."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    weight.ds_tensor.lerp_(source.ds_tensor.to(weight.ds_tensor.dtype), alpha)
    if weight.ds_status == ZeroParamStatus.AVAILABLE:
        weight.partition(has_been_updated=False)


def describe_frozen(accelerator) -> str:
    """One line on a separate reference's engine (:func:`prepare_frozen`), e.g. ``a DeepSpeed engine
    without an optimizer, weights partitioned over 2 processes (ZeRO-3)``."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if zero_stage(accelerator) == 3:
        offloaded = (ds["zero_optimization"].get("offload_param") or {}).get("device") in ("cpu", "nvme")
        where = f"weights partitioned over {accelerator.num_processes} processes (ZeRO-3){', offloaded' if offloaded else ''}"
    else:
        where = "whole on each process (ZeRO-1/2 partition no weights)"
    return f"a DeepSpeed engine without an optimizer, {where}{', in bfloat16' if _get(ds, 'bf16.enabled') else ''}"


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    """The backward of one micro-batch's ``loss`` (already divided by the micro-batch count, as in
    every run); ``last``: the step's last micro-batch, where ZeRO reduces the accumulated gradients."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> torch.Tensor | float:
    """The optimizer step after the last micro-batch's :func:`backward`: gradient clipping (DeepSpeed's,
    to ``max_grad_norm``), AdamW, gradients zeroed. Returns the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else norm


def _trained(scorer: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in scorer.named_parameters() if p.requires_grad]


def _decayed(param: torch.nn.Parameter) -> bool:
    """Whether ``param`` is in dpokit's weight-decayed group (see ``dpokit.train._optimizer``), by its
    whole shape (ZeRO-3's parameters hold a flat slice)."""
    return len(getattr(param, "ds_shape", param.shape)) >= 2


def _names_by_group(scorer: torch.nn.Module) -> tuple[list[str], list[str]]:
    """The trained parameters' names, as :func:`dpokit.sharding.named_state` keys them, in the
    optimizer's two groups: decayed, then not."""
    from dpokit.sharding import unwrapped_name

    trained = _trained(scorer)
    return ([unwrapped_name(n) for n, p in trained if _decayed(p)], [unwrapped_name(n) for n, p in trained if not _decayed(p)])


@contextmanager
def _gathered(params: list[torch.nn.Parameter], partitioned: bool) -> Iterator[None]:
    """ZeRO-3's slices of ``params`` gathered whole on every process while inside (read only)."""
    if not partitioned or not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def full_model_state(accelerator, scorer: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on the main process (CPU tensors, keys as the model's own; None on
    the others): trained weights from DeepSpeed's float32 masters, cast to the dtype they were loaded
    in (``dtypes``, by name: bfloat16 mode trains a bfloat16 copy), the frozen ones as they are.
    Every process must call this."""
    from deepspeed.utils import safe_get_full_fp32_param

    partitioned = partitions_weights(accelerator)
    main = accelerator.is_main_process
    state = {}
    # each tensor once, under its first name (a tied output layer is saved as the embedding, as the model
    # saves it); every process gathers in the same order
    for name, param in scorer.named_parameters():
        if param.requires_grad:
            value = safe_get_full_fp32_param(param)
        else:
            with _gathered([param], partitioned):
                value = param.detach().clone() if main else None
        if main:
            state[name] = value.to("cpu", dtypes.get(name, value.dtype))
    for name, tensor in scorer.named_buffers():
        if main:
            state[name] = tensor.detach().to("cpu")
    if not main:
        return None
    persistent = set(scorer.state_dict().keys())  # without non-persistent buffers
    return {name.removeprefix("model."): t for name, t in state.items() if name in persistent}


def trained_weights(scorer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``scorer``'s trained weights on the host, keyed as a checkpoint's model state: before
    ``accelerator.prepare``, a resumed LoRA run's adapters as read from its checkpoint, which bfloat16
    mode's engine is about to round (its float32 masters would start from that). Small for adapters,
    which every process reads (an empty base included: :func:`dpokit.modeling.load_policy`); a full
    model's weights are read from the checkpoint's files instead."""
    from dpokit.sharding import unwrapped_name

    return {unwrapped_name(name).removeprefix("model."): p.detach().to("cpu", copy=True) for name, p in _trained(scorer)}


OPTIMIZER_STATES = ("exp_avg", "exp_avg_sq")


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The optimizer that steps the weights, inside Accelerate's wrapper and (under DeepSpeed) ZeRO's
    optimizer: dpokit's AdamW, or with ``offload_optimizer`` the DeepSpeedCPUAdam that Accelerate
    builds in its place over the same parameter groups."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper -> DeepSpeed's ZeRO optimizer
    return getattr(inner, "optimizer", inner)  # -> AdamW (torch's has no .optimizer)


def _link_states(optimizer) -> None:
    """Make DeepSpeed's per-parameter views of AdamW's states cover every parameter group. ZeRO-1/2
    links them after its first optimizer step, which steps one group at a time: once the first group
    has stepped, before the second has any state, so the second group's views (dpokit's biases and
    norm weights) are left empty and ``safe_get_full_optimizer_state`` fails on them. Linked again here
    once every group has its states."""
    zero_optimizer = getattr(optimizer, "optimizer", optimizer)
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def _with_states(optimizer) -> None:
    """Give AdamW's states to DeepSpeed's float32 partitions that have none yet (a resumed run before
    its first step; torch's AdamW creates them in its first step), zero as AdamW would create them,
    so that a checkpoint's states can be written into them; then :func:`_link_states`."""
    zero_optimizer = getattr(optimizer, "optimizer", optimizer)
    base = base_optimizer(optimizer)
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or zero_optimizer.single_partition_of_fp32_groups
    on_device = any(g.get("fused") or g.get("capturable") for g in base.param_groups)  # where torch keeps the step
    for flat in flats:
        if not base.state[flat]:
            base.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                                **{key: torch.zeros_like(flat) for key in OPTIMIZER_STATES}}
    _link_states(optimizer)


def optimizer_state(accelerator, scorer: torch.nn.Module, optimizer) -> dict | None:
    """What ``optimizer.pt`` holds, as under FSDP2: the whole AdamW state keyed by parameter name (as
    :func:`dpokit.sharding.named_state` keys it), gathered to the main process (None on the others).
    Every process must call this."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from dpokit.sharding import unwrapped_name

    _link_states(optimizer)
    base = base_optimizer(optimizer)
    steps = [s["step"] for s in base.state.values() if "step" in s]  # one count for all: the step number
    step = torch.as_tensor(steps[0]).detach().to("cpu", torch.float32) if steps else None
    main = accelerator.is_main_process
    state = {}
    for name, param in _trained(scorer):  # every process, in the same order: each gather is a collective
        values = {key: safe_get_full_optimizer_state(param, key) for key in OPTIMIZER_STATES}
        if main and all(v is not None for v in values.values()):  # None: not stepped yet
            state[unwrapped_name(name)] = {**({"step": step.clone()} if step is not None else {}),  # a tensor each: AdamW counts in place
                                           **{k: v.detach().to("cpu", torch.float32) for k, v in values.items()}}
    settings = {k: v for k, v in base.param_groups[0].items() if k not in ("params", "weight_decay", "decayed")}
    groups = [{**settings, "weight_decay": next((g["weight_decay"] for g in base.param_groups if g.get("decayed") == decayed), 0.0),
               "decayed": decayed, "params": names}  # both of dpokit's groups, as an unsharded run saves them
              for decayed, names in zip((True, False), _names_by_group(scorer))]
    return {"state": state, "param_groups": groups} if main else None


def load_optimizer_state(accelerator, scorer: torch.nn.Module, optimizer, read: Callable[[], dict], weights) -> None:
    """Load a checkpoint's optimizer state (any run's: ``read()`` returns it, keyed by name or by
    position) into DeepSpeed's partitions, and its trained weights (``weights.get(name)``: the
    checkpoint's model state, keys as the model's own; a dict, or
    :class:`dpokit.checkpoint.SavedWeights`, which reads one at a time) into the float32 masters,
    which bfloat16 mode would otherwise take from the engine's rounded copy. Every process reads both. The groups' settings are not read:
    the caller sets this run's (``follow_optimizer_settings``, ``follow_schedule``)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from dpokit.sharding import keyed_by_name, named_state, unwrapped_name

    trained = _trained(scorer)
    state = read()
    if not keyed_by_name(state):  # an unsharded run's torch state: positions in its two groups, decayed first
        decayed, plain = _names_by_group(scorer)
        state = named_state(state, decayed + plain)
    _with_states(optimizer)
    base = base_optimizer(optimizer)
    step = None
    for name, param in trained:
        entry = state["state"].get(unwrapped_name(name))
        if entry is None:
            raise ConfigError(f"the checkpoint's optimizer state has no entry for {unwrapped_name(name)}: "
                              "it was saved by a run that trained other parameters")
        step = entry.get("step", step)
        for key in OPTIMIZER_STATES:
            safe_set_full_optimizer_state(param, entry[key].to(accelerator.device), key)
        weight = weights.get(unwrapped_name(name).removeprefix("model."))
        if weight is not None:
            safe_set_full_fp32_param(param, weight.to(accelerator.device, torch.float32))
    if step is not None:  # every partition has its states now (_with_states), the step a tensor as torch keeps it
        for s in base.state.values():
            s["step"].copy_(step)
