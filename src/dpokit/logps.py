"""Reply log-probabilities from a causal LM, without a ``[B, T, V]`` logits tensor.

The model's decoder gives hidden states ``[R, T, H]``. Only the positions that predict reply
tokens are kept (``N`` of them over the whole batch), the output layer is applied to those in
chunks of ``chunk_size`` rows, and each chunk's log-softmax is reduced at once to the one number
needed (the target's log-prob), in float32. The backward pass recomputes each chunk's logits, so
memory stays at ``O(chunk_size * V)`` whatever the batch. Training's forward also takes, from the
same chunks, the token statistics TRL logs (entropy, mean logit, top-1: :func:`token_statistics`).

The naive computation it must equal (tests prove it): ``model(...).logits`` on the padded batch,
``log_softmax``, ``gather`` the next token, sum over reply tokens.

Some architectures do more after the output layer: a constant scale (Cohere's ``logit_scale``,
Granite's ``logits_scaling``) or tanh soft-capping (Gemma 2/3). Both are applied per chunk. When a
model is wrapped, one 8-token forward checks that decoder -> output layer -> scale -> soft-cap
reproduces the model's own logits; a model that does something else (remote code, a new
architecture) is scored through its full logits instead, exact but without the memory savings,
and dpokit says so.

Rows that hold several sequences rely on the model's attention keeping them apart (from the
restarting position ids, or from dpokit's mask); :func:`check_rows_kept_apart` checks that once
per model, gives packed rows dpokit's mask where the position ids are not enough, and refuses a
model that lets them mix either way.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dpokit.config import DENSE_MASK_ATTENTION, PREFIX_ATTENTION, VARLEN_ATTENTION, ConfigError, is_flash_attention
from dpokit.masks import Windows, row_attention_inputs
from dpokit.modeling import eval_mode, text_config


TOKEN_STATS = ("entropy", "mean_logit", "top1")
"""The columns of :func:`token_statistics`, per reply token: what TRL logs."""
WPO_TOKEN_STATS = TOKEN_STATS + ("wpo_logp",)
""":data:`TOKEN_STATS` and, for WPO's weights (Zhou et al. 2024, Eq. 2), each token's
log p(y_t) - log Σ_v p_v²: its log-prob against the model's chance of sampling any one token twice."""


def _logsumexp_and_statistics(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
    """The logsumexp of each row of ``logits`` [C, V] float32, and with ``stats`` [C, 3] (or [C, 4])
    given, :func:`token_statistics` written into it for little more than the logsumexp alone: the max
    pass gives the top-1 too, the exponentials the entropy (and WPO's column). Returns [C]. Not
    differentiable (the chunked log-probs' backward is written by hand); one temporary the size of
    ``logits``."""
    top, top_index = logits.max(dim=-1)
    shift = top.masked_fill(top.isinf(), 0)[:, None]  # as torch.logsumexp: a row of -inf stays -inf
    if stats is not None:
        stats[:, 1] = logits.mean(dim=-1)
        stats[:, 2] = top_index == targets
    total_and_expected = (logits - shift).exp_()  # [C, V]
    total = total_and_expected.sum(dim=-1)
    lse = total.log() + shift[:, 0]
    if stats is not None and stats.shape[1] == len(WPO_TOKEN_STATS):
        # log p_t - log Σ p² with p = e/total, e = exp(logits - shift): (l_t - shift - log total) - 2 (log ‖e‖ - log total)
        norm = torch.linalg.vector_norm(total_and_expected, dim=-1)
        target_logit = logits.gather(1, targets[:, None])[:, 0]
        stats[:, 3] = target_logit - shift[:, 0] + total.log() - 2 * norm.log()
    if stats is not None:  # entropy = lse - sum(p * logits), p = exp(logits - lse)
        stats[:, 0] = lse - total_and_expected.mul_(logits).nansum(dim=-1) / total  # nansum: exp(-inf) * -inf adds 0
    return lse


@torch.no_grad()
def token_statistics(logits: torch.Tensor, targets: torch.Tensor, columns: int = len(TOKEN_STATS)) -> torch.Tensor:
    """What TRL logs of each reply token's next-token distribution, from one chunk's logits:
    its entropy, the mean of its logits over the vocabulary, and whether the target is its most
    likely token (1.0 or 0.0), as columns in the order of :data:`TOKEN_STATS`; with ``columns`` 4,
    also WPO's column (:data:`WPO_TOKEN_STATS`).

    logits: [C, V] float32, targets: [C] -> [C, columns] float32. One temporary the size of ``logits``.
    """
    stats = logits.new_empty(logits.shape[0], columns)
    _logsumexp_and_statistics(logits, targets, stats)
    return stats


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(h @ Wᵀ)[target] per row, chunked over rows, with a hand-written backward.

    forward: hidden [N, H], weight [V, H], targets [N] -> token_logps [N] (float32), and with
    ``stat_columns`` (3 or 4) each token's :func:`token_statistics` [N, stat_columns] (else [0, 0]; no gradient)

    The matmuls run in ``compute_dtype`` (the weight's dtype, or the autocast dtype under mixed
    precision) in both passes; softmax statistics and the weight gradient accumulate in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype, stat_columns=0):
        acc = torch.promote_types(compute_dtype, torch.float32)  # float32, or float64 in gradcheck
        w = weight.to(compute_dtype)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(out)
        stats = torch.empty(hidden.shape[0] if stat_columns else 0, stat_columns, dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end].to(compute_dtype) @ w.T).to(acc)
            out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1)
            lse[start:end] = _logsumexp_and_statistics(logits, targets[start:end], stats[start:end] if stat_columns else None)
            out[start:end] -= lse[start:end]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        ctx.mark_non_differentiable(stats)
        return out, stats

    @staticmethod
    def backward(ctx, grad_out, grad_stats=None):
        hidden, weight, targets, lse = ctx.saved_tensors
        cd = ctx.compute_dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(cd)
        n, chunk = hidden.shape[0], ctx.chunk_size
        grad_h = torch.zeros_like(hidden) if need_h else None
        # several chunks add up in float32; a single chunk's matmul is the whole gradient (no float32 copy)
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w and n > chunk else None
        for start in range(0, n, chunk):
            end = start + chunk
            h, g = hidden[start:end].to(cd), grad_out[start:end, None]
            # d(logit_t - lse)/d logits = onehot(t) - softmax, times g, built in place in one float32 buffer
            grad_logits = (h @ w.T).to(lse.dtype).sub_(lse[start:end, None]).exp_().mul_(-g)
            grad_logits = grad_logits.scatter_add_(1, targets[start:end, None], g).to(cd)
            if need_h:
                grad_h[start:end] = (grad_logits @ w).to(hidden.dtype)
            if need_w and grad_w is None:
                grad_w = grad_logits.T @ h
            elif need_w:
                grad_w += (grad_logits.T @ h).to(lse.dtype)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a Linear would run in here: autocast's when it is on, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _token_logps_generic(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int, softcap: float | None, scale: float = 1.0,
    stat_columns: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Any output layer (bias, scale, soft-capping): chunked, each chunk recomputed in backward.
    With ``stat_columns`` (3 or 4), each chunk's :func:`token_statistics` too, taken in its forward
    (not again when backward recomputes it)."""

    def one_chunk(h: torch.Tensor, t: torch.Tensor, stats_of_chunk: list | None) -> torch.Tensor:
        logits = head(h).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        lse = torch.logsumexp(logits, dim=-1)
        if stats_of_chunk == []:  # the first run of this chunk: the forward
            stats_of_chunk.append(token_statistics(logits, t, stat_columns))
        return logits.gather(1, t[:, None]).squeeze(1) - lse

    parts, stats = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        stats_of_chunk = [] if stat_columns else None
        if torch.is_grad_enabled():
            parts.append(checkpoint(one_chunk, h, t, stats_of_chunk, use_reentrant=False))
        else:
            parts.append(one_chunk(h, t, stats_of_chunk))
        stats += stats_of_chunk or []
    logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    if not stat_columns:
        return logps, None
    return logps, torch.cat(stats) if stats else hidden.new_zeros(0, stat_columns, dtype=torch.float32)


def token_logps(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Log-prob of each target token under ``softcap(scale * head(hidden))``.

    hidden: [N, H], targets: [N] -> [N] float32.
    """
    return token_logps_and_statistics(hidden, head, targets, chunk_size, softcap, scale, stats=())[0]


def token_logps_and_statistics(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    softcap: float | None = None,
    scale: float = 1.0,
    stats: tuple[str, ...] = TOKEN_STATS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`token_logps`, and each token's :func:`token_statistics` of columns ``stats``
    (:data:`TOKEN_STATS` or :data:`WPO_TOKEN_STATS`; with none, None).

    hidden: [N, H], targets: [N] -> [N] float32, and [N, len(stats)] float32 or None.
    """
    if stats not in ((), TOKEN_STATS, WPO_TOKEN_STATS):
        raise ValueError(f"token statistics are {TOKEN_STATS} or {WPO_TOKEN_STATS}, not {stats}")
    plain_linear = isinstance(head, nn.Linear) and head.bias is None and not softcap
    if plain_linear:  # scale * (h @ Wᵀ) == (scale * h) @ Wᵀ
        scaled = hidden * scale if scale != 1.0 else hidden
        logps, stats_out = _ChunkedTokenLogps.apply(scaled, head.weight, targets, chunk_size,
                                                    _compute_dtype(hidden, head.weight), len(stats))
        return logps, stats_out if stats else None
    return _token_logps_generic(hidden, head, targets, chunk_size, softcap, scale, len(stats))


# model_type -> the constant its CausalLM multiplies the output layer's logits by
_LOGIT_SCALES = {
    **dict.fromkeys(("cohere", "cohere2", "cohere2_moe"), lambda c: c.logit_scale),
    **dict.fromkeys(
        ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa", "minicpm3"),
        lambda c: 1.0 / c.logits_scaling,
    ),
    "hyperclovax": lambda c: c.logits_scaling,
}


def output_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that ``config``'s architecture applies after its output layer."""
    scale = _LOGIT_SCALES.get(getattr(config, "model_type", None), lambda c: 1.0)(config)
    softcap = getattr(config, "final_logit_softcapping", None)
    if getattr(config, "model_type", None) == "recurrent_gemma":  # the same cap, under another name
        softcap = getattr(config, "logits_soft_cap", None)
    return float(scale), softcap


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM: what gives the hidden states its output layer reads.

    ``get_decoder()`` where it answers; transformers 4.56's generic lookup returns None for the
    usual ``XForCausalLM.model = XModel`` layout, so then the attribute ``base_model_prefix`` names,
    else ``model`` (4.56's Gemma 3 names ``language_model`` but keeps its decoder at ``model``).
    """
    decoder = model.get_decoder()
    if decoder is None or decoder is model:  # Llama 4's text model answers itself
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
        decoder = getattr(base, base.base_model_prefix, None)
        if decoder is None:
            decoder = base.model
    return decoder


def _head_reproduces_logits(model: nn.Module, scale: float, softcap: float | None) -> bool:
    """Whether decoder -> output layer -> ``scale`` -> ``softcap`` gives ``model``'s own logits,
    checked on one 8-token sequence (eval mode, no grad)."""
    try:
        device = model.get_output_embeddings().weight.device
        ids = torch.arange(1, 9, device=device)[None] % text_config(model.config).vocab_size
        with torch.no_grad(), eval_mode(model):
            theirs = model(input_ids=ids, use_cache=False).logits[0].float()
            hidden = decoder_of(model)(input_ids=ids, use_cache=False).last_hidden_state[0]
            ours = model.get_output_embeddings()(hidden).float() * scale
            if softcap:
                ours = softcap * torch.tanh(ours / softcap)
        # log-probs to round-off: an unknown transform of the logits (a soft cap under another name) shows
        error = (torch.log_softmax(ours, -1) - torch.log_softmax(theirs, -1)).abs().max()
        return bool(error <= (0.25 if _computes_in_16_bits(model, device) else 1e-3))  # 16 bits: a missing cap of 30 on logits of 20 is off by 2.5
    except Exception:  # an unusual model: let the full-logits path show its real error, if any
        return False


def head_plan(model: nn.Module) -> tuple[float, float | None, bool]:
    """(scale, softcap, reproduces) for ``model``, probed once and kept on the model."""
    cached = getattr(model, "_dpokit_head_plan", None)
    if cached is None:
        scale, softcap = output_transform(text_config(model.config))
        cached = (scale, softcap, _head_reproduces_logits(model, scale, softcap))
        if not cached[2]:
            warnings.warn(
                f"dpokit: the {getattr(model.config, 'model_type', '?')} model's logits are not its output layer applied "
                "to its decoder's hidden states (as far as dpokit knows the architecture); scoring replies through "
                "the model's full logits instead: exact, but without the chunked log-prob memory savings",
                stacklevel=3,
            )
        model.__dict__["_dpokit_head_plan"] = cached
    return cached


def _rows_kept_apart(model: nn.Module, restart_positions: bool, own_mask: bool, rows: int = 1) -> bool:
    """Whether ``model`` keeps two 6-token sequences in one row apart, given restarting position ids
    (0..5 0..5, as the packed layout has) or running ones (0..11), with or without dpokit's own
    (block-diagonal) mask, or what stands for it under the attention (:func:`row_attention_inputs`).
    The second sequence's hidden states must be nearer to its hidden states alone than to those of
    the row under one causal mask over both (what a model that ignores the restarts, or the mask,
    computes). ``rows``: that row repeated, as a batch of several rows. Eval mode, no grad, the
    caller's device and autocast."""
    device = model.get_output_embeddings().weight.device
    ids = (torch.arange(1, 13, device=device) % text_config(model.config).vocab_size).repeat(rows, 1)  # [rows, 12]: two sequences each
    positions = torch.arange(6, device=device).repeat(2) if restart_positions else torch.arange(12, device=device)
    positions, row_inputs = positions.repeat(rows, 1), {"attention_mask": None}  # [rows, 12]
    if own_mask:
        groups = (torch.arange(12, device=device) >= 6).long().repeat(rows, 1)
        row_inputs = row_attention_inputs(groups, None, getattr(model.config, "_attn_implementation", None), model.dtype)
    decoder = decoder_of(model)

    def hidden(**inputs) -> torch.Tensor:
        return decoder(**inputs, use_cache=False).last_hidden_state[0, -6:].float()

    with torch.no_grad(), eval_mode(model):
        alone = hidden(input_ids=ids[:, 6:], position_ids=positions[:, 6:])
        apart = hidden(input_ids=ids, position_ids=positions, **row_inputs)
        mixed = hidden(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids))
    error = (apart - alone).abs().max()
    return bool(error < (apart - mixed).abs().max() and _same_hidden(apart, alone, model))


def _same_hidden(ours: torch.Tensor, theirs: torch.Tensor, model: nn.Module) -> bool:
    """Whether two computations of the same tokens' hidden states agree to round-off: 1e-4 of their
    largest value in float32, 0.1 where the forward computes in 16 bits (weights or autocast; what a
    mask ignored, a window or ALiBi changes is of the order of the values themselves). A
    model whose recurrent or convolutional layers carry state from one sequence of a row into the next
    (hybrid linear-attention, Mamba) passes the nearer-than-mixed test but not this."""
    return bool((ours - theirs).abs().max() <= (0.1 if _computes_in_16_bits(model, ours.device) else 1e-4) * theirs.abs().max())


def _computes_in_16_bits(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model``'s forward on ``device`` computes in 16 bits here: 16-bit weights, or autocast on."""
    return model.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(device.type)


def _shared_row_kept_apart(model: nn.Module, windows: Windows = None) -> bool:
    """Whether a prefix-shared row as dpokit builds it (prompt, chosen, rejected: the rejected reply's
    positions restart after the prompt, columns do not; its mask keeping ``windows``) gives each reply
    the hidden states of ``prompt + reply`` alone. Catches a model that ignores dpokit's mask, and one
    whose attention depends on columns rather than positions (ALiBi) or carries state across the
    chosen reply. 8-token sequences: a window of fewer tokens is in play."""
    from dpokit.data.batching import make_batch
    from dpokit.data.tokenize import TokenizedPair

    vocab = text_config(model.config).vocab_size
    prompt, chosen, rejected = ([(t % (vocab - 1)) + 1 for t in range(start, start + 4)] for start in (1, 11, 21))
    batch = make_batch([TokenizedPair(prompt, chosen, rejected)], "prefix_packed")
    device = model.get_output_embeddings().weight.device
    decoder = decoder_of(model)
    positions = batch.position_ids.to(device)
    inputs = row_attention_inputs(batch.groups.to(device), batch.branches.to(device),
                                  getattr(model.config, "_attn_implementation", None), model.dtype,
                                  positions=positions, windows=windows)
    with torch.no_grad(), eval_mode(model):
        row = decoder(input_ids=batch.input_ids.to(device), position_ids=positions, **inputs,
                      use_cache=False).last_hidden_state[0].float()
        kept = True
        for columns, reply in ((slice(4, 8), chosen), (slice(8, 12), rejected)):
            ids = torch.tensor([prompt + reply], device=device)
            alone = decoder(input_ids=ids, position_ids=torch.arange(8, device=device)[None], use_cache=False).last_hidden_state[0, 4:].float()
            kept = kept and _same_hidden(row[columns], alone, model)
    return kept


def attention_window(config) -> int | None:
    """The narrowest span of tokens some layer of ``config``'s model attends within (a sliding window,
    chunked or local attention); None where every layer sees the whole sequence."""
    windows = []
    sliding, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if sliding and getattr(config, "use_sliding_window", True) is not False and (
        layer_types is None or any("sliding" in str(kind) for kind in layer_types)
    ):
        windows.append(int(sliding))
    if getattr(config, "attention_chunk_size", None):
        windows.append(int(config.attention_chunk_size))
    if getattr(config, "window_size", None) and "local" in str(getattr(config, "attention_layers", "")):
        windows.append(int(config.window_size))  # GPT-Neo's local layers
    return min(windows) if windows else None


def mask_windows(config) -> Windows:
    """The sliding windows dpokit's own row masks keep for ``config``'s model: one for every layer
    (an int: Mistral), one per layer type where the model names them (a dict for its forward, which
    takes one mask per type: Gemma 2/3, gpt-oss, Cohere 2; None for the types that see everything),
    or None: no sliding window, or one its masks cannot follow (chunked or local attention, which
    :func:`attention_window` still sees)."""
    sliding, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if not sliding or getattr(config, "use_sliding_window", True) is False:
        return None
    if layer_types is None:
        return int(sliding)
    kinds = set(layer_types)
    if "sliding_attention" not in kinds or not kinds <= {"full_attention", "sliding_attention"}:
        return None
    return {kind: int(sliding) if kind == "sliding_attention" else None for kind in sorted(kinds)}


def _windows_in_probe(config) -> Windows:
    """The windows dpokit's masks keep in :func:`_shared_row_kept_apart`'s 8-token row: the model's,
    where one is shorter than that (longer ones are probed shrunk, when they matter: :func:`check_window`)."""
    window = attention_window(config)
    return mask_windows(config) if window is not None and window < 8 else None


PROBE_WINDOW = 3
"""The window the windowed-mask probe shrinks a model's to: shorter than its 8-token sequences."""


def check_window(model: nn.Module, layout: str, mask_packed_rows: bool, max_length: int) -> Windows:
    """The sliding windows dpokit's own attention mask must keep for ``model`` (see :func:`mask_windows`),
    or None when no layer attends within a window shorter than ``max_length`` or the rows take no
    mask of dpokit's.

    Prefix-shared rows under a dense mask (sdpa, eager) keep the model's windows, once a probe with
    the window shrunk below its length (the model's own masks read it from the config) shows that the
    model reads them as its own; other layouts whose mask would ignore a window (packed rows of a
    model that needs dpokit's mask, flex_attention, chunked or local attention, a model that does
    not follow the windowed masks) are refused, naming what to set. Packed rows without dpokit's mask
    follow the window through their position ids; dpokit_varlen and flash-attention pass it to their kernels.
    """
    shared = layout.startswith("prefix")
    window = attention_window(text_config(model.config))
    if window is None or window >= max_length or not (shared or mask_packed_rows):
        return None
    attn = getattr(model.config, "_attn_implementation", None)
    if attn == VARLEN_ATTENTION or is_flash_attention(attn):  # their kernels keep each sequence's window
        return None
    windows = mask_windows(text_config(model.config))
    if shared and windows is not None and attn in (*DENSE_MASK_ATTENTION, None) and _windows_followed(model, windows):
        return windows
    fix = ("training.prefix_sharing=false (packed rows then follow the window through their position ids)" if shared and not mask_packed_rows
           else "training.prefix_sharing=false and training.padding_free=false")
    raise ConfigError(
        f"the {getattr(model.config, 'model_type', '?')} model attends within {window} tokens on some layers, and dpokit's own "
        f"attention mask for {'prefix-shared' if shared else 'packed'} rows cannot keep that window here (max_length {max_length}): "
        f"set {fix}, or data.max_length <= {window}, or attn_implementation=dpokit_varlen on a CUDA GPU"
    )


def _windows_followed(model: nn.Module, windows: Windows) -> bool:
    """Whether prefix-shared rows masked with ``windows`` (shrunk to :data:`PROBE_WINDOW` tokens, as is
    the model's own ``sliding_window`` for the probe) give each reply what it gets alone: the model
    takes the masks, per layer type where there are several, and applies them as it applies its own
    window. Checked once per model."""
    checked = model.__dict__.get("_dpokit_windows_checked")
    if checked is None:
        shrunk = ({kind: window and PROBE_WINDOW for kind, window in windows.items()} if isinstance(windows, dict)
                  else PROBE_WINDOW)
        config = text_config(model.config)  # the one its attention layers read
        window = config.sliding_window
        config.sliding_window = PROBE_WINDOW
        try:
            checked = _shared_row_kept_apart(model, shrunk)
        except (*NO_4D_MASK, KeyError):  # a forward that takes no dict of masks, or other keys
            checked = False
        finally:
            config.sliding_window = window
        model.__dict__["_dpokit_windows_checked"] = checked
    return checked


PROBES = ("_dpokit_head_plan", "_dpokit_rows_checked", "_dpokit_windows_checked")
"""Where :func:`head_plan`, :func:`check_rows_kept_apart` and :func:`check_window` keep what their
forwards found, on the model."""


def probe_findings(model: nn.Module) -> dict:
    """What the one-time probes of ``model`` found (:data:`PROBES`), for a process that cannot run them."""
    return {key: model.__dict__[key] for key in PROBES if key in model.__dict__}


def adopt_findings(model: nn.Module, findings: dict) -> None:
    """Take another process's :func:`probe_findings` for ``model`` (the same architecture): its probes
    then run no forwards here (a process whose weights are not loaded yet)."""
    model.__dict__.update(findings)


def check_rows_kept_apart(model: nn.Module, layout: str) -> bool:
    """Make sure the sequences of a row in ``layout`` cannot see each other; returns whether
    dpokit must give the packed rows its own mask for that.

    The packed layout gives only restarting position ids, from which transformers derives the
    block-diagonal mask (sdpa, eager and flex_attention from torch 2.6). A model that ignores them
    (Falcon before transformers 5.24; remote code may) gets dpokit's block-diagonal mask instead,
    when it honours that (True is returned). Under a flash-attention kernel packed rows always bring
    their sequences' bounds (True; see :mod:`dpokit.masks`), checked over two rows. The prefix-shared
    layouts always give dpokit's 4D mask or BlockMask. A model that honours neither is refused: its
    log-probs would be silently wrong. Under dpokit_varlen attention both kinds of row are always
    regrouped for the varlen kernel (True), and the check is that the model's forward passes the
    regrouped rows on to its attention. The padded layout (one sequence per row) needs nothing.
    Checked once per model and kind of row.
    """
    if layout == "padded":
        return False
    shared = layout.startswith("prefix")
    checked = model.__dict__.setdefault("_dpokit_rows_checked", {})
    if shared not in checked:
        checked[shared] = _rows_checked(model, shared)
    return checked[shared]


NO_4D_MASK = (TypeError, ValueError, AttributeError, RuntimeError)
"""What a model that cannot take dpokit's 4D mask raises from its forward (Bloom's ALiBi: ValueError)."""


def _rows_checked(model: nn.Module, shared: bool) -> bool:
    """For :func:`check_rows_kept_apart`: False (no mask needed), True (dpokit's mask needed for
    packed rows), or a ConfigError."""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn == VARLEN_ATTENTION:  # rows always regrouped; running positions show a model that drops them
        try:
            if _rows_kept_apart(model, restart_positions=False, own_mask=True):
                return True
            problem = "does not pass dpokit's regrouped rows to its attention"
        except ConfigError:  # the kernel's own refusal (on CUDA: float32 compute), which names its fix
            raise
        except NO_4D_MASK as e:  # a forward that takes no extra keyword arguments, or attention shaped otherwise
            problem = f"does not take dpokit's regrouped rows ({str(e).splitlines()[0]})"
        raise ConfigError(f"the {getattr(model.config, 'model_type', '?')} model {problem}: use attn_implementation=sdpa or flex_attention")
    who = f"the {getattr(model.config, 'model_type', '?')} model ({attn} attention)"
    if shared:
        try:
            # flex_attention: the sequence alone (transformers' own flex mask) is unreliable on the CPU, where
            # torch compiles it (NaN, compile errors); its rows get dpokit's BlockMask, checked as packed rows are
            kept = (_rows_kept_apart(model, restart_positions=False, own_mask=True) if attn == "flex_attention"
                    else _shared_row_kept_apart(model, _windows_in_probe(text_config(model.config))))
        except NO_4D_MASK as e:
            raise ConfigError(f"{who} cannot take dpokit's attention mask for prefix-shared rows ({str(e).splitlines()[0]}): "
                              "set training.prefix_sharing=false") from None
        if kept:
            return False
        problem = ("does not give a prefix-shared row's replies what each gets after the prompt alone (it ignores dpokit's "
                   "attention mask, or its attention depends on columns, as ALiBi does, or its layers carry state along the "
                   "row): set training.prefix_sharing=false")
    elif is_flash_attention(attn):
        # packed rows always bring their bounds (several rows hide the sequences from transformers' search of the
        # position ids, which covers one row only): two rows show that the model passes the bounds to its attention
        try:
            if _rows_kept_apart(model, restart_positions=True, own_mask=True, rows=2):
                return True
            problem = "does not pass the bounds of a packed row's sequences (cu_seq_lens) on to its attention"
        except NO_4D_MASK as e:  # a forward that takes no extra keyword arguments
            problem = f"does not take the bounds of a packed row's sequences ({str(e).splitlines()[0]})"
        problem += f": set training.padding_free=false, or attn_implementation to one of {', '.join(PREFIX_ATTENTION)}"
    else:
        if _rows_kept_apart(model, restart_positions=True, own_mask=False):
            return False
        can_mask = attn is None or attn in PREFIX_ATTENTION
        try:
            if can_mask and _rows_kept_apart(model, restart_positions=True, own_mask=True):
                return True
        except NO_4D_MASK as e:
            raise ConfigError(f"{who} cannot take dpokit's attention mask for packed rows ({str(e).splitlines()[0]}): "
                              "set training.padding_free=false and training.prefix_sharing=false") from None
        problem = "lets the sequences of a packed row reach each other (its layers carry state along the row, or it ignores the position ids that mark where each " + (
            "one starts, and dpokit's attention mask): set training.padding_free=false" if can_mask else
            f"one starts): set training.padding_free=false, or attn_implementation to one of {', '.join(PREFIX_ATTENTION)} "
            "(dpokit then masks packed rows itself)"
        )
    raise ConfigError(f"{who} {problem}")


class LoadBalancing(NamedTuple):
    """A mixture-of-experts model's load-balancing loss (Switch Transformer's, as its transformers class
    computes it): ``loss(router_logits, num_experts, top_k, token_weights)``."""

    loss: Callable
    num_experts: int
    top_k: int


def load_balancing_of(model: nn.Module) -> LoadBalancing | None:
    """The load-balancing loss ``model``'s transformers class adds with ``output_router_logits``
    (Mixtral, Qwen2/3-MoE, OLMoE, ...), or None for a model without one (dense, or an unknown kind)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    loss = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if loss is None or not isinstance(experts, int) or not isinstance(top_k, int):
        return None
    return LoadBalancing(loss, experts, top_k)


def naive_token_counts(attention_mask: torch.Tensor | None, groups: torch.Tensor | None, branches: torch.Tensor | None,
                       input_ids: torch.Tensor) -> torch.Tensor:
    """How many times each token of the rows stands in the naive batch (a padded row per sequence):
    0 for padding, 2 for a prefix-shared prompt token (both sequences' prompt), else 1. Weighing each
    token's routing by it makes the load-balancing loss of any layout the naive batch's. [R, T] float32."""
    if branches is not None:
        return (groups >= 0).float() * (1 + (branches == 0).float())
    if groups is not None:
        return (groups >= 0).float()
    if attention_mask is not None:
        return attention_mask.float()
    return torch.ones(input_ids.shape, dtype=torch.float32, device=input_ids.device)


class ReplyLogProbs(nn.Module):
    """Wraps a causal LM so that its forward returns summed reply log-probs per sequence.

    This wrapper is what the training loop hands to Accelerate, so DDP and FSDP2 see one forward
    that covers both the decoder and the output layer.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, chunked: bool = True, mask_packed_rows: bool = False,
                 windows: Windows = None):
        """``chunked=False`` (``training.chunked_logps``) always takes the model's full logits;
        otherwise they are taken only for a model whose head dpokit cannot reproduce.
        ``mask_packed_rows``: give packed rows dpokit's block-diagonal mask (for a model that
        ignores restarting position ids), under dpokit_varlen their regrouping, under a
        flash-attention kernel their sequences' bounds (see :func:`check_rows_kept_apart`).
        ``windows``: the sliding windows dpokit's masks keep (:func:`check_window`)."""
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.mask_packed_rows = mask_packed_rows
        self.windows = windows
        self.scale, self.softcap, self.chunked = head_plan(model) if chunked else (1.0, None, False)
        self.load_balancing = load_balancing_of(model)

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The model's layer classes: Accelerate's FSDP makes each such layer a unit (see :mod:`dpokit.sharding`)."""
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self) -> None:
        """Tie the model's output layer to its embedding again where its config says so: Accelerate's
        FSDP2 preparation moves the module to the meta device and back, which unties them."""
        self.model.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        pred_rows: torch.Tensor,
        pred_cols: torch.Tensor,
        targets: torch.Tensor,
        seq_index: torch.Tensor,
        num_seqs: int,
        groups: torch.Tensor | None = None,
        branches: torch.Tensor | None = None,
        varlen=None,
        reply_tail: torch.Tensor | None = None,
        token_stats: tuple[str, ...] = (),
        router_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Summed log-probs of the reply tokens of each sequence.

        Args:
            input_ids, attention_mask, position_ids: [R, T] model inputs (mask may be None).
            pred_rows, pred_cols: [N] where the hidden state predicting each reply token sits.
            targets: [N] the reply token ids.
            seq_index: [N] which sequence (0..num_seqs-1) each reply token belongs to.
            groups, branches: [R, T] each token's sequence or pair, and its part of the pair (see
                :mod:`dpokit.masks`). With ``branches`` (prefix-shared rows), or with ``groups`` alone
                (packed rows) and ``mask_packed_rows``, the attention mask (or dpokit_varlen's
                regrouping, or flash-attention's sequence bounds) is built from them here, on the
                model's device; packed rows otherwise go by their position ids.
            varlen: under dpokit_varlen, the rows' regrouping, under flash-attention their
                :class:`dpokit.masks.SequenceBounds`, if the batch brings them (else built here).
            reply_tail: [N] bool, the reply tokens past their pair's shared length (LD-DPO): each
                sequence's sum then comes in two parts, the tokens before and those past it.
            token_stats: :data:`TOKEN_STATS` or :data:`WPO_TOKEN_STATS`: also return each sequence's
                sums of these :func:`token_statistics` over its reply tokens.
            router_aux: also return a mixture-of-experts model's load-balancing loss over every token
                of the batch, counted as in the naive batch (:func:`naive_token_counts`); chunked path only.

        Returns:
            [num_seqs] float32 summed log-probs ([num_seqs, 2] with ``reply_tail``); with ``token_stats``
            also [num_seqs, len(token_stats)] float32 sums over all reply tokens (no gradient), columns
            as ``token_stats``; with ``router_aux`` then the 0-d load-balancing loss.
        """
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if router_aux:
            if self.load_balancing is None or not self.chunked:
                raise ValueError(f"{type(self.model).__name__} computes no load-balancing loss of its experts"
                                 if self.load_balancing is None else "the load-balancing loss needs the chunked log-probs")
            inputs["output_router_logits"] = True  # the decoder's router logits (the whole model's forward would
            # take its own load-balancing loss, which cannot read dpokit's row masks)
            counts = naive_token_counts(attention_mask, groups, branches, input_ids)
        if branches is not None or (groups is not None and self.mask_packed_rows):
            attn = getattr(self.model.config, "_attn_implementation", None)
            inputs.update(row_attention_inputs(groups, branches, attn, self.model.dtype, varlen, position_ids, self.windows))
        if self.chunked:
            outputs = decoder_of(self.model)(**inputs)
            hidden = outputs.last_hidden_state
            selected = hidden[pred_rows, pred_cols]  # [N, H]
            head = self.model.get_output_embeddings()
            logps, stats = token_logps_and_statistics(selected, head, targets, self.chunk_size, self.softcap, self.scale,
                                                      token_stats)
        else:  # the naive way: [R, T, V] logits over every position, then the reply rows
            outputs = self.model(**inputs)
            logits = outputs.logits[pred_rows, pred_cols].float()  # [N, V]
            lse = torch.logsumexp(logits, dim=-1)
            logps = logits.gather(1, targets[:, None]).squeeze(1) - lse
            stats = token_statistics(logits, targets, len(token_stats)) if token_stats else None
        if reply_tail is None:
            seq_logps = torch.zeros(num_seqs, dtype=torch.float32, device=logps.device).index_add(0, seq_index, logps)
        else:
            parts = 2 * seq_index + reply_tail.long()
            seq_logps = torch.zeros(2 * num_seqs, dtype=torch.float32, device=logps.device).index_add(0, parts, logps)
            seq_logps = seq_logps.view(num_seqs, 2)
        returned = [seq_logps]
        if token_stats:
            returned.append(torch.zeros(num_seqs, len(token_stats), dtype=torch.float32, device=logps.device).index_add(
                0, seq_index, stats.float()))
        if router_aux:
            balance = self.load_balancing
            returned.append(balance.loss(outputs.router_logits, balance.num_experts, balance.top_k, counts))
        return returned[0] if len(returned) == 1 else tuple(returned)
