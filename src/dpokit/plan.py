"""``dpokit plan``: how much device memory full, LoRA and QLoRA training of a config would take.

Nothing is loaded but the model's ``config.json``: the model is built on the meta device, so
parameter counts are exact and free. Every other number is an estimate from these formulas
(bytes; ``s`` = bytes per element of the training dtype, ``P`` = parameters, ``A`` = LoRA
adapter parameters as peft adds them, ``M`` = parameters of the ``lora_modules_to_save`` copies,
``tok`` = tokens in one micro-batch, ``n`` = layers)::

    weights      full: P*s           LoRA: P*s + A*4 + M*s    QLoRA: Pq*QLORA_BYTES + (P-Pq)*2 + A*4 + M*2
                 (bf16/fp16=true over float32 weights, full: + PL*2, autocast's 16-bit copies of the
                 Linear weights; activations stay about float32-sized: autocast keeps float32 norms,
                 residuals and rotary outputs beside its 16-bit copies)
    reference    P*s when a frozen model is kept in memory (precompute_ref_log_probs=false and a
                 reference-based loss), for full training only; LoRA/QLoRA score the reference
                 with the adapters off, so 0. 0 whenever the log-probs are precomputed.
    gradients    trainable * bytes (full: P*s; adapters: A*4, peft keeps them in float32, + M*s)
    optimizer    AdamW m and v in the parameter dtype: 2 * trainable * bytes
    activations  n * tok * per_layer_bytes + tok * H * (4 + 2s) (final norm) + mask + workspace,
                 or, with gradient checkpointing, n * tok * H * s (layer inputs) + one layer's
                 activations (recomputed in backward); eager attention (Gemma 2, gpt-oss) adds its
                 scores per layer, rows * heads * width^2 * 4-8 bytes; a mixture of experts' MLP
                 is its top-k experts (and shared experts) wide
    logps        2 * min(chunk, tok) * V * 4: one chunk of float32 logits and their gradient;
                 chunked_logps=false: tok * V * s (the model's full logits, kept until the reply rows
                 are taken) + 2 * tok * V * 4 (those rows in float32 and their gradient; worst case,
                 every token a reply token)
    sharded      (--fsdp N, FSDP2; full and LoRA) weights, reference, gradients and optimizer / N, and
                 weights + (root + 2 layers) * compute bytes gathered at once (root: every parameter
                 outside the decoder layers); no autocast copies (FSDP2 gathers in 16 bits instead)
    ZeRO         (--zero STAGE --processes N, DeepSpeed; full and LoRA) the engine holds the weights,
                 LoRA's adapters too, in its compute dtype c (bf16=true: 2, no autocast; else the
                 weights' own) and steps float32 masters: optimizer = trained * (8 + 4 masters) / N
                 in bf16 mode, trained * 2c / N otherwise; gradients trained * c, / N from stage 2;
                 weights and a separate reference (also in c) / N at stage 3, plus what is gathered
                 at once as under FSDP2; activations c bytes an element

``Pq`` is the parameters of the Linear layers bitsandbytes quantizes (all but the output layer).
The token count is a worst case from ``max_length``: every sequence is ``max_length`` long, so a
micro-batch of ``B`` pairs is ``2 * B * max_length`` tokens in every layout; prefix-sharing
layouts process ``prompt + chosen + rejected`` per pair, which ``--prompt-length`` subtracts;
``--tokens N`` replaces the count (e.g. the largest micro-batch of the real data).
Not counted: the CUDA context and kernels (~0.5-1 GB), allocator fragmentation, and the
communication buffers of distributed training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""NF4 with double quantization: 4 bits a weight, one 8-bit absmax per 64-weight block, one
float32 constant per 256 blocks (~0.516 bytes per quantized parameter)."""
ADAPTER_BYTES = 4
"""LoRA adapters, their gradients and optimizer states are float32 (peft's default
``autocast_adapter_dtype=True`` keeps adapters float32 even on a bf16 base)."""
QLORA_COMPUTE_BYTES = 2
"""QLoRA computes in bfloat16: unquantized weights and activations are 2 bytes."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COLUMNS = ("full", "lora", "qlora")
ADAM_8BIT_BYTES = 2.0
"""bitsandbytes' 8-bit AdamW: m and v in one byte each per parameter (its block statistics are ~1% more)."""
ROWS = ("weights", "reference", "gradients", "optimizer", "activations", "logps_buffer", "total")
ROW_LABELS = {"logps_buffer": "log-prob buffer"}


# ----------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int | float) -> int:
    """``80GB`` -> 80e9 bytes, ``24GiB`` -> 24 * 2**30, ``80000MB``, ``1.5TB``, ``1024B``. Text needs
    its unit (``80`` was read as 80 bytes: a GPU's memory in GB is the likelier meaning); a Python
    number is bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or not unit or unit not in _UNITS or not math.isfinite(float(m.group(1)) * _UNITS[unit]):
        raise ValueError(f"cannot read memory size {text!r}: write it with its unit, like 80GB, 24GiB or 80000MB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """Bytes as GiB/MiB/KiB with 2 decimals (``0`` for nothing)."""
    if n == 0:
        return "0"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- counting


@dataclass
class ModelShape:
    """What the estimate needs from a model: exact counts from a meta-device instance."""

    params: int
    linear_params: int
    """Parameters of nn.Linear layers except the output layer (what QLoRA quantizes)."""
    largest_linear: int
    lora_params: int
    """Adapter parameters (float32)."""
    lora_modules: list[str]
    """Distinct adapted module suffixes (``q_proj``, ...)."""
    lora_in_features: int
    """Sum over the first layer's adapters of their input width (for dropout copies)."""
    lora_rank_features: int
    """Sum over the first layer's adapters of their ``lora_A`` outputs (``r`` each)."""
    hidden: int
    intermediate: int
    """Per-token MLP width: the intermediate size; a mixture of experts' top-k experts and shared ones."""
    kv_dim: int
    layers: int
    vocab: int
    layer_params: int = 0
    """Parameters of one decoder layer (an FSDP unit); the rest (embedding, final norm, output
    layer) is the root unit."""
    trained_params: int | None = None
    """What full training trains, where not all ``params``: an image-text model's language model
    (its vision parts stay frozen). None: all of them."""
    trained_linear_params: int | None = None
    """Of ``linear_params``, those in what trains (the ones autocast copies to 16 bits). None: all."""
    experts_per_token: int = 0
    """A mixture of experts' top-k (0: a dense MLP)."""
    heads: int = 0
    attention: str = "sdpa"
    """The attention transformers gives the model when none is asked for (``eager`` where it has no
    sdpa path: Gemma 2, gpt-oss)."""
    attention_softcap: bool = False
    """Attention scores soft-capped (Gemma 2): eager keeps one more score-sized tensor."""
    saved_params: int = 0
    """``lora_modules_to_save``: trained copies of whole modules beside the adapters (model dtype)."""
    lora_refused: str | None = None
    """Why peft refuses the LoRA settings on this model (then nothing is counted for adapters)."""


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def count_model(hf_config, lora_r: int = 16, targets: str | list[str] = "all-linear",
                modules_to_save: list[str] | None = None, lora_dropout: float = 0.0) -> ModelShape:
    """Build ``hf_config``'s causal LM on the meta device and count parameters and LoRA parameters.

    ``targets``: ``all-linear`` or module names, as ``model.lora_target_modules``;
    ``modules_to_save``: as ``model.lora_modules_to_save`` (modules trained whole beside the adapters);
    ``lora_dropout``: only whether peft accepts the adapters depends on it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        return count_module(model, hf_config, lora_r, targets, modules_to_save, lora_dropout)


def count_module(model, hf_config, lora_r: int = 16, targets: str | list[str] = "all-linear",
                 modules_to_save: list[str] | None = None, lora_dropout: float = 0.0) -> ModelShape:
    """:func:`count_model` for a built ``model`` (on the meta device: peft's adapters are added to it
    in place to be counted)."""
    from torch import nn

    from dpokit.logps import decoder_of
    from dpokit.modeling import is_image_text, language_model_names

    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    head = model.get_output_embeddings()
    linear_params = largest = trained_linear = 0
    # an image-text model trains (and LoRA adapts) its language model only: the parts named here
    trained_parts = tuple(f"{name}." for name in language_model_names(model)) if is_image_text(model) else ("",)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            n = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
            linear_params += n
            largest = max(largest, module.weight.numel())
            trained_linear += n if f"{name}.".startswith(trained_parts) else 0
    params = sum(p.numel() for p in model.parameters())
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layer = next((m for m in decoder_of(model).modules() if type(m).__name__ in layer_classes), None)
    layer_params = sum(p.numel() for p in layer.parameters()) if layer is not None else 0
    trained_params = (sum(p.numel() for name, p in model.named_parameters() if name.startswith(trained_parts))
                      if trained_parts != ("",) else None)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    try:
        adapters = _count_adapters(model, layer, lora_r, targets, modules_to_save, lora_dropout)
    except ImportError:  # no peft: LoRA on the Linear layers (peft also adapts fused MoE experts)
        adapters = _count_linear_adapters(model, head, trained_parts, lora_r, targets)
    return ModelShape(
        params=params,
        linear_params=linear_params,
        largest_linear=largest,
        hidden=hidden,
        intermediate=_mlp_width(text),
        experts_per_token=getattr(text, "num_experts_per_tok", None) or 0,
        kv_dim=kv_heads * head_dim,
        heads=heads,
        attention=getattr(model.config, "_attn_implementation", None) or "sdpa",
        attention_softcap=bool(getattr(text, "attn_logit_softcapping", None)),
        layers=text.num_hidden_layers,
        vocab=text.vocab_size,
        layer_params=layer_params,
        trained_params=trained_params,
        trained_linear_params=trained_linear,
        **adapters,
    )


def _mlp_width(text) -> int:
    """Activations per token of ``text``'s MLP are this wide: a dense MLP's ``intermediate_size``; a
    mixture of experts runs each token through its top ``num_experts_per_tok`` experts (each
    ``moe_intermediate_size`` wide where the config has one) and its shared experts."""
    dense = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    top_k = getattr(text, "num_experts_per_tok", None) or 0
    if not top_k:
        return dense
    expert = getattr(text, "moe_intermediate_size", None) or dense
    shared = getattr(text, "shared_expert_intermediate_size", None) or (getattr(text, "n_shared_experts", None) or 0) * expert
    return top_k * expert + shared


def _count_adapters(model, layer, lora_r: int, targets: list[str], modules_to_save: list[str] | None,
                    lora_dropout: float) -> dict:
    """LoRA counts from peft itself: ``model`` (meta device) gets the adapters training would give it
    (:func:`dpokit.modeling.new_lora_config`), so whatever peft adapts is counted (a MoE's fused
    experts and router included). Per-layer features are read from ``layer`` (the first decoder
    layer). Settings peft refuses count nothing, its reason kept in ``lora_refused``."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from dpokit.config import ModelConfig
    from dpokit.modeling import lora_refusal, new_lora_config

    settings = ModelConfig(lora_r=lora_r, lora_dropout=lora_dropout, lora_target_modules=targets,
                           lora_modules_to_save=modules_to_save)
    counts = dict(lora_params=0, saved_params=0, lora_modules=[], lora_in_features=0, lora_rank_features=0)
    try:
        wrapped = get_peft_model(model, new_lora_config(model, settings))
    except ValueError as e:  # training stops there too (apply_lora)
        return {**counts, "lora_refused": lora_refusal(targets, e)}
    in_layer = {id(m) for m in layer.modules()} if layer is not None else set()
    for name, module in wrapped.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        suffix = re.sub(r"(\.base_layer)+$", "", name).rsplit(".", 1)[-1]
        if suffix not in counts["lora_modules"]:
            counts["lora_modules"].append(suffix)
        if id(module) in in_layer:
            for lora_a in module.lora_A.values():  # [r, in] (a fused MoE's: [r * experts, in])
                counts["lora_rank_features"] += lora_a.weight.shape[0]
                counts["lora_in_features"] += lora_a.weight.shape[1]
            for lora_a in module.lora_embedding_A.values():  # [r, vocab]: indices in, nothing copied
                counts["lora_rank_features"] += lora_a.shape[0]
    for name, param in wrapped.named_parameters():
        if param.requires_grad:
            counts["saved_params" if ".modules_to_save." in name else "lora_params"] += param.numel()
    return counts


def _count_linear_adapters(model, head, trained_parts: tuple[str, ...], lora_r: int, targets: list[str]) -> dict:
    """LoRA counts without peft: adapters on the targeted ``nn.Linear`` layers (all but the output
    layer for ``all-linear``) of the trained parts; per-layer features from each name's first one."""
    from torch import nn

    all_linear = targets == ["all-linear"]
    lora = 0
    suffixes: list[str] = []
    first_layer: dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not f"{name}.".startswith(trained_parts):
            continue
        if (all_linear and module is not head) or (not all_linear and _matches(name, targets)):
            lora += lora_r * (module.in_features + module.out_features)
            suffix = name.rsplit(".", 1)[-1]
            if suffix not in suffixes:
                suffixes.append(suffix)
            first_layer.setdefault(suffix, module.in_features)
    return dict(lora_params=lora, saved_params=0, lora_modules=suffixes, lora_in_features=sum(first_layer.values()),
                lora_rank_features=lora_r * len(first_layer))


# ----------------------------------------------------------------------------- estimate


@dataclass
class RunShape:
    """The training settings the estimate depends on."""

    batch_size: int = 8
    max_length: int = 1024
    layout: str = "prefix_packed"
    gradient_checkpointing: bool = False
    logps_chunk_size: int = 1024
    chunked_logps: bool = True
    dtype_bytes: int = 4
    autocast_16bit: bool = False
    """``training.bf16`` or ``training.fp16``: 16-bit autocast; full training over float32 weights
    also holds autocast's 16-bit copies of the trained Linear weights."""
    live_reference: bool = False
    """A frozen reference model stays in memory (precompute off, reference-based loss)."""
    prompt_length: int = 0
    """Typical prompt tokens, subtracted once per pair by prefix-sharing layouts (0: worst case)."""
    lora_r: int = 16
    lora_dropout: float = 0.0
    regrouped_rows: bool = False
    """attn_implementation=dpokit_varlen: rows regrouped for a varlen kernel, no mask at all."""
    shards: int = 1
    """FSDP2 (or with :attr:`zero_stage`, DeepSpeed) over this many processes (1: unsharded)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO's stage (1-3) over :attr:`shards` processes; 0: not DeepSpeed."""
    tokens: int | None = None
    """Tokens per micro-batch, when known (e.g. the data's largest batch); None: the worst case."""
    adam_8bit: bool = False
    """``optim: adamw_8bit``: bitsandbytes keeps m and v in 8 bits (2 bytes per trained parameter)."""
    attention: str | None = None
    """``model.attn_implementation``; None: the model's own (:attr:`ModelShape.attention`)."""


def micro_batch_tokens(run: RunShape) -> int:
    """Tokens the decoder processes for one micro-batch: ``run.tokens`` when given, else the worst
    case (every sequence max_length)."""
    if run.tokens is not None:
        return run.tokens
    per_pair = 2 * run.max_length
    if run.layout.startswith("prefix"):  # a too-long pair keeps at least min(prompt, max_length // 2) prompt tokens
        per_pair -= min(run.prompt_length, run.max_length // 2)
    return run.batch_size * per_pair


def row_shape(run: RunShape) -> tuple[float, int]:
    """(rows, row width) of a micro-batch: two rows of max_length per pair padded; one row per pair
    (prompt + chosen + rejected) for prefix sharing, the worst-case pair's width; the packed layouts
    fill rows of up to 2 * max_length, one worst-case pair (or two worst-case sequences) each, or,
    for a ``--tokens`` count, as many full rows as it makes."""
    if run.layout == "padded":
        return 2 * run.batch_size, run.max_length
    worst_pair = micro_batch_tokens(replace(run, tokens=None)) // run.batch_size
    if run.tokens is None or run.layout == "prefix_padded":
        return run.batch_size, worst_pair
    width = min(run.tokens, 2 * run.max_length)
    return run.tokens / width, width


def dense_mask(m: ModelShape, run: RunShape) -> bool:
    """Whether attention runs with a dense [R, 1, W, W] mask: dpokit's for prefix-shared rows,
    transformers' for padded rows and for packed rows (told apart by their position ids) under sdpa
    and eager attention. flash_attention_2 takes packed and padded rows without one, flex_attention
    a block mask, dpokit_varlen regroups rows (its padded layout runs sdpa's mask)."""
    if run.regrouped_rows:
        return run.layout == "padded"
    return (run.attention or m.attention) in ("sdpa", "eager") or run.layout.startswith("prefix")


def _mask_bytes(m: ModelShape, run: RunShape, s: float) -> float:
    """The attention mask kept for backward: float (additive, or turned so by sdpa on the CPU), the
    padded layout's bool."""
    if not dense_mask(m, run):
        return 0.0
    rows, width = row_shape(run)
    return rows * width * width * (1 if run.layout == "padded" else s)


def eager_scores_bytes(m: ModelShape, run: RunShape, compute_bytes: float) -> float:
    """What eager attention keeps for backward in one layer: the [R, heads, W, W] scores after
    softmax in float32 (4 bytes each), their copy in a 16-bit compute dtype (2), and with a soft cap
    its tanh output (compute bytes). Every score of a packed row is computed, masked or not."""
    rows, width = row_shape(run)
    per_score = 4 + (2 if compute_bytes == 2 else 0) + (compute_bytes if m.attention_softcap else 0)
    return rows * m.heads * width * width * per_score


def layer_activation_bytes(m: ModelShape, s: float, masked: bool, trainable_base: bool,
                           lora_targets: list[str] | None = None, lora_r: int = 16, lora_dropout: float = 0.0) -> float:
    """Bytes saved for backward by one decoder layer per token (Llama/Qwen2-style block, sdpa).

    Full training, per RMSNorm: its float32 input (4H), the normalized value (sH, for the weight's
    grad) and its output (sH, for the projections' weight grads). Attention: q and k after rotary,
    v (each H wide when a mask forces transformers to repeat the kv heads, else kv_dim), the sdpa
    output and the o_proj input (H each). MLP: gate, up, silu(gate), silu(gate)*up (I each).
    With a frozen base (LoRA/QLoRA) the norms keep only their float32 input and a Linear keeps its
    input only if it carries an adapter (for lora_A's grad; a float32 copy per adapter when the
    base is not float32, as peft casts inputs to the adapter's dtype); each adapter adds its r-wide
    float32 lora_A output, and a dropout copy of its input when dropout > 0.
    A mixture of experts' MLP is ``I`` = its top-k experts wide and keeps each expert's output (for
    the routing weight's grad) and, trained, each token's copy gathered as an expert's input (kH each).
    """
    h, i, k = m.hidden, m.intermediate, m.experts_per_token
    kv = h if masked else m.kv_dim
    attention = s * (h + 2 * kv + h)  # q, k after rotary, v, sdpa output
    mlp = s * 3 * i + s * k * h  # gate, up, silu(gate); the experts' outputs
    norms = 2 * 4 * h
    if trainable_base:
        inputs = s * (2 * h + h + i + k * h)  # norm outputs (2), o_proj input, down_proj input, the experts' inputs
        normalized = 2 * s * h  # each norm's normalized value, kept for its weight's grad
        return norms + normalized + attention + mlp + inputs
    targets = lora_targets or []
    inputs = 0.0
    if s == ADAPTER_BYTES:  # adapters share the input the base Linear got: one copy per distinct input
        if any(t in targets for t in ("q_proj", "k_proj", "v_proj")):
            inputs += s * h
        if any(t in targets for t in ("gate_proj", "up_proj")):
            inputs += s * h
        if "o_proj" in targets:
            inputs += s * h
        if "down_proj" in targets:
            inputs += s * i
    else:  # peft casts the input to the float32 adapter: one float32 copy per adapted Linear
        inputs += ADAPTER_BYTES * m.lora_in_features
    adapters = ADAPTER_BYTES * m.lora_rank_features + (ADAPTER_BYTES * m.lora_in_features if lora_dropout > 0 else 0)
    return norms + attention + mlp + inputs + adapters


def backward_workspace_bytes(m: ModelShape, tokens: int, s: float) -> float:
    """Gradients in flight during backward (a layer's input and MLP gradients): memory backward
    allocates, not what the forward saved for it."""
    return tokens * (2 * m.hidden + 2 * m.intermediate) * s


def chunked_logps_bytes(m: ModelShape, run: RunShape) -> float:
    """One chunk of float32 logits and their gradient (``chunked_logps=true``)."""
    return 2 * min(run.logps_chunk_size, micro_batch_tokens(run)) * m.vocab * 4


def gathered_bytes(m: ModelShape, compute_bytes: float) -> float:
    """Weights FSDP2 holds gathered at once: the root unit (embedding, final norm, output layer: all
    parameters outside the layers) for the whole forward, and two layers (the one computing and
    the next, prefetched), in the compute dtype."""
    root = m.params - m.layers * m.layer_params
    return (root + 2 * m.layer_params) * compute_bytes


def activation_rows(m: ModelShape, run: RunShape, s: float, full: bool, logits_bytes: float) -> dict[str, float]:
    """The ``activations`` and ``logps_buffer`` rows for activations of ``s`` bytes an element
    (``full``: full training, else adapters; ``logits_bytes``: of the full logits with
    ``chunked_logps=false``)."""
    tok = micro_batch_tokens(run)
    eager = (run.attention or m.attention) == "eager"
    masked = dense_mask(m, run) or eager  # a mask makes transformers repeat the kv heads; eager always does
    layer = layer_activation_bytes(m, s, masked, full, m.lora_modules, run.lora_r, run.lora_dropout)
    final_norm = tok * m.hidden * (4 + 2 * s)
    workspace = backward_workspace_bytes(m, tok, s)
    scores = eager_scores_bytes(m, run, 2 if run.autocast_16bit or s == 2 else 4) if eager else 0.0
    if run.gradient_checkpointing:
        layers = m.layers * tok * m.hidden * s + tok * layer + scores
    else:
        layers = m.layers * (tok * layer + scores)
    activations = layers + final_norm + workspace + _mask_bytes(m, run, s)
    if run.chunked_logps:
        logps = chunked_logps_bytes(m, run)
    else:
        logps = tok * m.vocab * logits_bytes + 2 * tok * m.vocab * 4
    return {"activations": activations, "logps_buffer": logps}


def zero_estimate(m: ModelShape, run: RunShape) -> dict[str, dict[str, float]]:
    """:func:`estimate` under DeepSpeed ZeRO (``run.zero_stage`` over ``run.shards`` processes, see
    the module docstring). bf16 mode (``run.autocast_16bit``: dpokit's bf16 is DeepSpeed's bfloat16
    mode there) holds every weight in bfloat16, LoRA's adapters too, and steps float32 masters.
    QLoRA is refused under DeepSpeed: its column is one process per GPU, as :func:`estimate` gives it."""
    stage, n = run.zero_stage, run.shards
    out = {"qlora": estimate(m, replace(run, zero_stage=0, shards=1))["qlora"]}
    for col in ("full", "lora"):
        full = col == "full"
        c = 2 if run.autocast_16bit else run.dtype_bytes  # what the engine holds and computes in
        trained = (m.trained_params or m.params) if full else m.lora_params + m.saved_params
        weights = m.params * c if full else m.params * c + m.lora_params * (c if run.autocast_16bit else ADAPTER_BYTES) + m.saved_params * c
        states = 8 + 4 if run.autocast_16bit else 2 * c  # AdamW's m and v in float32 (and the masters), or in c
        row = {
            "weights": weights / n + gathered_bytes(m, c) if stage == 3 else weights,
            "reference": (m.params * c if full and run.live_reference else 0.0) / (n if stage == 3 else 1),
            "gradients": trained * c / (n if stage >= 2 else 1),
            "optimizer": trained * states / n,
            **activation_rows(m, run, c, full, logits_bytes=c),
        }
        row["total"] = sum(row.values())
        out[col] = row
    return {col: out[col] for col in COLUMNS}


def estimate(m: ModelShape, run: RunShape) -> dict[str, dict[str, float]]:
    """Bytes per device for each of ``full``, ``lora``, ``qlora`` (rows: see :data:`ROWS`).

    Sharded (``run.shards`` > 1; QLoRA is never sharded): weights, reference, gradients and
    optimizer states are divided over the processes, and the weights row adds what FSDP2 holds
    gathered (:func:`gathered_bytes`); 16-bit compute is then FSDP2's mixed-precision policy, so
    no autocast copies are counted. Under DeepSpeed (``run.zero_stage``): :func:`zero_estimate`."""
    if run.zero_stage:
        return zero_estimate(m, run)
    out: dict[str, dict[str, float]] = {}
    for col in COLUMNS:
        # bytes per weight and per activation element: under bf16 autocast activations stay about as
        # wide as the weights (autocast keeps float32 norms, residuals and rotary outputs beside its copies)
        s = QLORA_COMPUTE_BYTES if col == "qlora" else run.dtype_bytes
        full = col == "full"
        shards = run.shards if col != "qlora" else 1
        if col == "full":
            weights = m.params * s
            if run.autocast_16bit and s > 2 and shards == 1:  # autocast keeps a 16-bit copy of each trained Linear weight
                weights += (m.linear_params if m.trained_linear_params is None else m.trained_linear_params) * 2
        elif col == "lora":
            weights = m.params * s + m.lora_params * ADAPTER_BYTES + m.saved_params * s
        else:
            weights = (m.linear_params * QLORA_BYTES_PER_PARAM + (m.params - m.linear_params) * s
                       + m.lora_params * ADAPTER_BYTES + m.saved_params * s + m.largest_linear * s)  # + one dequantized weight
        # (parameters, bytes each) of what trains: the model, or the adapters and lora_modules_to_save's copies
        trained = [(m.trained_params or m.params, s)] if full else [(m.lora_params, ADAPTER_BYTES), (m.saved_params, s)]
        reference = m.params * s if (full and run.live_reference) else 0.0
        row = {
            "weights": weights / shards,
            "reference": reference / shards,
            "gradients": sum(n * b for n, b in trained) / shards,
            "optimizer": sum(n * (ADAM_8BIT_BYTES if run.adam_8bit else 2 * b) for n, b in trained) / shards,
            **activation_rows(m, run, s, full, logits_bytes=2 if run.autocast_16bit else s),
        }
        if shards > 1:
            row["weights"] += gathered_bytes(m, 2 if run.autocast_16bit else s)
        row["total"] = sum(row.values())
        out[col] = row
    return out


# ----------------------------------------------------------------------------- from a dpokit config


@dataclass
class Plan:
    model: str
    shape: ModelShape
    run: RunShape
    lora_targets: str
    estimate: dict[str, dict[str, float]]
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    checkpointed_totals: dict[str, float] | None = None
    """Each column's total with gradient checkpointing on, when the run has it off."""

    def fits(self) -> dict[str, bool] | None:
        if self.gpu_memory is None:
            return None
        return {col: self.estimate[col]["total"] <= self.gpu_memory for col in COLUMNS}

    def fits_with_checkpointing(self) -> dict[str, bool] | None:
        """For the columns that do not fit with checkpointing off: whether turning it on makes them fit."""
        fits = self.fits()
        if fits is None or self.checkpointed_totals is None:
            return None
        return {col: self.checkpointed_totals[col] <= self.gpu_memory for col in COLUMNS if not fits[col]}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "parameters": self.shape.params,
            "lora_parameters": self.shape.lora_params,
            "lora_modules_to_save_parameters": self.shape.saved_params,
            "lora_target_modules": self.shape.lora_modules,
            "run": asdict(self.run),
            "micro_batch_tokens": micro_batch_tokens(self.run),
            "shards": self.run.shards,
            "zero_stage": self.run.zero_stage,
            "bytes": self.estimate,
            "gpu_memory": self.gpu_memory,
            "fits": self.fits(),
            "fits_with_gradient_checkpointing": self.fits_with_checkpointing(),
            "notes": self.notes,
        }

    def table(self) -> str:
        s, r = self.shape, self.run
        sharded = f" ZeRO-{r.zero_stage} x{r.shards}" if r.zero_stage else f" FSDP2 x{r.shards}" if r.shards > 1 else ""
        header = ["", f"full{sharded}", f"LoRA r={r.lora_r}{sharded}", "QLoRA (nf4)"]
        rows = [[ROW_LABELS.get(k, k)] + [format_size(self.estimate[c][k]) for c in COLUMNS] for k in ROWS]
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(4)]
        fmt = lambda cells: "  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(cells)).rstrip()  # noqa: E731
        lines = [
            f"model: {self.model}: {s.params / 1e6:,.1f}M parameters, {s.layers} layers, hidden {s.hidden}, vocab {s.vocab}",
            f"LoRA: r={r.lora_r} on {self.lora_targets} ({', '.join(s.lora_modules) or 'refused by peft, see the notes'}): "
            f"{s.lora_params / 1e6:,.2f}M trainable parameters"
            + (f" + {s.saved_params / 1e6:,.2f}M in lora_modules_to_save" if s.saved_params else ""),
            f"micro-batch: {r.batch_size} pairs x max_length {r.max_length}, layout {r.layout} -> "
            f"{micro_batch_tokens(r):,} tokens"
            + (" (given by --tokens)" if r.tokens is not None else " (worst case: every sequence max_length)")
            + (", gradient checkpointing" if r.gradient_checkpointing else ""),
            "",
            fmt(header),
        ]
        for i, row in enumerate(rows):
            if ROWS[i] == "total":
                lines.append(fmt(["-" * w for w in widths]))
            lines.append(fmt(row))
        fits, fits_checkpointed = self.fits(), self.fits_with_checkpointing() or {}
        if fits is not None:
            lines.append("")
            for col, label in zip(COLUMNS, header[1:]):
                total = self.estimate[col]["total"]
                verdict = "fits" if fits[col] else "does not fit"
                line = f"{label}: {verdict} in {format_size(self.gpu_memory)} ({100 * total / self.gpu_memory:.0f}% used)"
                if col in fits_checkpointed:
                    line += (f"; with gradient_checkpointing=true {format_size(self.checkpointed_totals[col])}: "
                             + ("fits" if fits_checkpointed[col] else "does not fit either"))
                lines.append(line)
        lines += [""] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _lora_settings(config, r: int | None, alpha: float | None, dropout: float | None, targets: str | None):
    """CLI flags win; else the config's ``model.lora_*`` keys."""
    m = config.model
    chosen = targets if targets is not None else ",".join(m.lora_target_modules)
    return (
        int(r if r is not None else m.lora_r),
        float(alpha if alpha is not None else m.lora_alpha),
        float(dropout if dropout is not None else m.lora_dropout),
        chosen,
    )


def plan_from_config(config, *, gpu_memory: int | None = None, lora_r: int | None = None, lora_alpha: float | None = None,
                     lora_dropout: float | None = None, lora_targets: str | None = None, prompt_length: int = 0,
                     fsdp: int = 1, tokens: int | None = None, zero: tuple[int, int] | None = None) -> Plan:
    """The estimate for a loaded :class:`dpokit.config.Config` (reads only the model's config.json).
    ``fsdp``: FSDP2 over that many processes; ``zero``: (stage, processes) of DeepSpeed ZeRO."""
    from transformers import AutoConfig

    from dpokit.config import VARLEN_ATTENTION, ConfigError, batch_layout, needs_reference
    from dpokit.modeling import no_model_config, resolve_model_path
    from dpokit.zero import partitioned

    mc, t = config.model, config.training
    path = resolve_model_path(mc.name_or_path)
    if why := no_model_config(path):
        raise ConfigError(f"could not read the model config of '{mc.name_or_path}': {why}")
    try:
        hf_config = AutoConfig.from_pretrained(path, revision=mc.revision, trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not read the model config of '{mc.name_or_path}': {first}") from None
    r, _alpha, dropout, targets = _lora_settings(config, lora_r, lora_alpha, lora_dropout, lora_targets)
    shape = count_model(hf_config, r, targets, config.model.lora_modules_to_save, dropout)
    if mc.dtype == "auto":
        dtype = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32").replace("torch.", "")
    else:
        dtype = mc.dtype
    run = RunShape(
        batch_size=t.per_device_train_batch_size,
        max_length=config.data.max_length,
        layout=batch_layout(t),
        gradient_checkpointing=t.gradient_checkpointing,
        logps_chunk_size=t.logps_chunk_size,
        chunked_logps=t.chunked_logps,
        dtype_bytes=DTYPE_BYTES.get(dtype, 4),
        autocast_16bit=t.bf16 or t.fp16,
        live_reference=needs_reference(config) and not t.precompute_ref_log_probs,
        prompt_length=prompt_length,
        tokens=tokens,
        lora_r=r,
        lora_dropout=dropout,
        regrouped_rows=config.model.attn_implementation == VARLEN_ATTENTION,
        shards=zero[1] if zero else fsdp,
        zero_stage=zero[0] if zero else 0,
        adam_8bit=t.optim == "adamw_8bit",
        attention=mc.attn_implementation,
    )
    notes = [
        f"full and LoRA train in {dtype} ({run.dtype_bytes} bytes); QLoRA stores Linear weights in NF4 "
        f"(~{QLORA_BYTES_PER_PARAM:.3f} bytes/param with double quantization) and computes in bfloat16",
        ("optim=adamw_8bit keeps m and v in 8 bits (2 bytes per trained parameter)" if run.adam_8bit else
         "AdamW keeps m and v in the parameter dtype") + "; LoRA adapters, their gradients and states are float32",
    ]
    if shape.lora_refused:
        notes.append(f"LoRA and QLoRA columns count no adapters: peft refuses these settings ({shape.lora_refused}); "
                     "training with them would stop there")
    elif importlib.util.find_spec("peft") is None:
        notes.append("peft is not installed (LoRA training needs it): adapters are counted on the targeted Linear "
                     "layers, which misses what peft also adapts in some models (a mixture of experts' fused experts)")
    if (run.attention or shape.attention) == "eager":
        rows, width = row_shape(run)
        notes.append(f"eager attention ({'asked for' if run.attention else 'the model has no sdpa path'}) keeps every "
                     f"score for backward: {rows:g} rows x {shape.heads} heads x {width}^2 per layer, counted under "
                     "activations")
    if shape.experts_per_token:
        notes.append(f"a mixture of experts: its MLP activations are counted for the {shape.experts_per_token} experts "
                     f"each token runs through ({shape.intermediate} wide)")
    if prompt_length > config.data.max_length // 2 and run.layout.startswith("prefix") and tokens is None:
        notes.append(f"--prompt-length {prompt_length} is counted as {config.data.max_length // 2}: a pair too long for "
                     f"max_length {config.data.max_length} keeps at least that many prompt tokens (max_length // 2)")
    if (t.bf16 or t.fp16) and not zero:
        name, width = ("bf16", "bfloat16") if t.bf16 else ("fp16", "float16")
        notes.append(f"{name}=true saves time more than activation memory (autocast keeps float32 norms, residuals "
                     f"and rotary outputs beside its {width} copies; activations are counted at float32 size, "
                     f"which a CPU run's peak matches and autograd's saved tensors undercut by ~28%); full "
                     f"training also holds a {width} copy of each "
                     "trained Linear weight" + (" (counted under weights)" if run.dtype_bytes > 2 else ""))
    if not t.chunked_logps:
        notes.append("log-prob buffer: chunked_logps=false holds the full [tokens, vocab] logits; the default "
                     f"chunks of {t.logps_chunk_size} reply tokens would need "
                     f"{format_size(chunked_logps_bytes(shape, run))}")
    if not needs_reference(config):
        notes.append("reference: 0 (reference-free loss)")
    elif t.precompute_ref_log_probs:
        notes.append("reference: 0 (precompute_ref_log_probs=true: only an [N, 2] table is kept)")
    else:
        notes.append("reference: a frozen copy for full training; LoRA/QLoRA use the base with adapters off")
    if fsdp > 1:
        notes.append(f"FSDP2 over {fsdp} processes: full and LoRA weights, gradients and optimizer states are divided "
                     f"over them; weights add what is gathered at once (embedding, final norm and output layer, plus "
                     f"two layers) in the compute dtype; QLoRA is not sharded (dpokit refuses it under FSDP2): its "
                     f"column is one process per GPU")
    if zero:
        stage, processes = zero
        held = "bfloat16 (bf16=true: DeepSpeed's bfloat16 mode, no autocast), stepped through float32 masters" if t.bf16 else dtype
        notes.append(f"DeepSpeed ZeRO-{stage} over {processes} processes: {partitioned(stage)} divided over them; "
                     f"the engine holds the weights (LoRA's adapters too) and computes in {held}"
                     + ("; weights add what is gathered at once, as under FSDP2" if stage == 3 else "")
                     + "; QLoRA is refused under DeepSpeed: its column is one process per GPU; offloading is not counted")
    notes.append("not counted: CUDA context and kernels (~0.5-1 GB), allocator fragmentation, distributed buffers")
    checkpointed = None if run.gradient_checkpointing else estimate(shape, replace(run, gradient_checkpointing=True))
    return Plan(model=mc.name_or_path, shape=shape, run=run, lora_targets=targets, estimate=estimate(shape, run),
                gpu_memory=gpu_memory, notes=notes,
                checkpointed_totals=None if checkpointed is None else {c: checkpointed[c]["total"] for c in COLUMNS})


# ----------------------------------------------------------------------------- command line


PLAN_EPILOG = """\
examples:
  dpokit plan my.yaml --gpu-memory 80GB
  dpokit plan my.yaml --fsdp 8 --gpu-memory 24GB
  dpokit plan my.yaml bf16=true --zero 3 --processes 8 --gpu-memory 80GB
  dpokit plan runs/quickstart --gpu-memory 24GB         (a run's folder: the config it trained with)
  dpokit plan my.yaml per_device_train_batch_size=4 gradient_checkpointing=true --gpu-memory 24GiB
  dpokit plan model.name_or_path=Qwen/Qwen2.5-7B-Instruct max_length=2048 --lora-target q_proj,v_proj --json
"""


def add_parser(sub) -> None:
    import argparse

    from dpokit.config import add_config_arguments

    p = sub.add_parser(
        "plan",
        help="estimate device memory for full, LoRA and QLoRA training",
        description="Estimate memory per device for full, LoRA and QLoRA training of the configured model at the "
        "configured micro-batch and max_length. Reads only the model's config.json.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "per_device_train_batch_size=4")
    p.add_argument("--gpu-memory", help="memory of one device, e.g. 80GB, 24GiB, 80000MB: says whether each fits")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the config's model.lora_r)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (does not change memory)")
    p.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout, > 0 keeps a copy of each adapted input (default: the config's model.lora_dropout)")
    p.add_argument("--lora-target", default=None, help="all-linear or module names, e.g. q_proj,v_proj (default: the config's model.lora_target_modules)")
    p.add_argument("--prompt-length", type=int, default=0,
                   help="typical prompt tokens: prefix-sharing layouts process them once per pair (default 0: worst case)")
    p.add_argument("--tokens", type=int, default=None, metavar="N",
                   help="tokens per micro-batch instead of the worst case, e.g. your data's largest micro-batch "
                        "(metrics.jsonl's tokens, with logging_steps=1 and one process, is each step's count)")
    p.add_argument("--fsdp", type=int, default=1, metavar="N",
                   help="estimate per GPU for FSDP2 over N processes (accelerate launch --use_fsdp --fsdp_version 2)")
    p.add_argument("--zero", type=int, default=0, choices=(1, 2, 3), metavar="STAGE",
                   help="estimate per GPU for DeepSpeed ZeRO-1, 2 or 3 over --processes N "
                        "(accelerate launch --use_deepspeed --zero_stage STAGE)")
    p.add_argument("--processes", type=int, default=None, metavar="N", help="with --zero: how many processes")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args) -> None:
    from dpokit.config import ConfigError, load_config, split_config_argument
    from dpokit.resolve import RUN_CONFIG, is_run_dir

    config_path, overrides = split_config_argument(args.config, args.overrides)
    if config_path and is_run_dir(Path(config_path)):
        config_path = str(Path(config_path) / RUN_CONFIG)  # a run's folder: the config it trained with
    try:
        gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
    except ValueError as e:
        raise ConfigError(f"--gpu-memory: {e}") from None
    try:
        config = load_config(config_path, overrides, for_training=False)  # memory only: what a run would not use is its own check
    except ConfigError as e:
        if "data.train is not set" not in str(e):
            raise
        config = load_config(config_path, [*overrides, "data.train=unused-by-plan"], for_training=False)  # plan needs no data
    if args.fsdp < 1:
        raise ConfigError(f"--fsdp: {args.fsdp} processes; give 1 or more")
    if args.zero and (args.processes is None or args.processes < 1):
        raise ConfigError(f"--zero {args.zero}: give --processes N, the processes DeepSpeed partitions over (1 or more)")
    if args.processes is not None and not args.zero:
        raise ConfigError("--processes goes with --zero STAGE (DeepSpeed); for FSDP2 give --fsdp N")
    if args.zero and args.fsdp > 1:
        raise ConfigError("--zero and --fsdp: a run is sharded by one of them; give one")
    if args.tokens is not None and args.tokens < 1:
        raise ConfigError(f"--tokens: {args.tokens}; give the tokens of one micro-batch (1 or more)")
    if gpu is not None and gpu <= 0:
        raise ConfigError(f"--gpu-memory: {args.gpu_memory}; give the memory of one device, more than 0 (e.g. 80GB)")
    if args.lora_r is not None and args.lora_r < 1:
        raise ConfigError(f"--lora-r: {args.lora_r}; a LoRA rank is 1 or more")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout: {args.lora_dropout}; a dropout probability is in [0, 1)")
    if args.prompt_length < 0:
        raise ConfigError(f"--prompt-length: {args.prompt_length}; give the typical prompt tokens (0 or more)")
    plan = plan_from_config(config, gpu_memory=gpu, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                            lora_dropout=args.lora_dropout, lora_targets=args.lora_target, prompt_length=args.prompt_length,
                            fsdp=args.fsdp, tokens=args.tokens, zero=(args.zero, args.processes) if args.zero else None)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
