"""Flash-attention's variable-length kernel, from torch itself, for rows that hold several sequences.

``attn_implementation: dpokit_varlen`` registers this module's attention with transformers. Packed
and prefix-shared rows then never build a ``[T, T]`` mask: the tokens of each row are regrouped
into plain causal sequences laid back to back, and one varlen call (``torch.nn.attention.varlen``,
torch's own flash-attention build: no ``flash-attn`` package, no compiler) attends within each.

The regrouping follows dpokit's one attention rule (:func:`dpokit.masks.visible`): a token sees
the earlier tokens of its own group whose branch is 0 (the shared prompt) or its own. A packed
sequence (one group, branch 0) is one kernel sequence. A prefix-shared pair becomes two,
``prompt + chosen`` and ``prompt + rejected``: the prompt's keys and values are gathered twice (an
index, no recomputation of the layers), chosen and rejected outputs come from their own sequence,
the prompt's from the first. Gradients flow back through the gathers onto the row's tokens.

On CUDA the kernel needs bfloat16/float16 inputs (``bf16=true`` autocasts them, or
``dtype=bfloat16``). Without CUDA the same regrouping runs an exact per-sequence sdpa loop, which
is how the regrouping is tested on any machine; there it is about as fast as ``sdpa`` over masked
rows (0.94x the step time and 1.07x the memory in the CPU benchmark, see the README). A forward without
dpokit's rows (a plain ``model(...)`` call, generation) is transformers' sdpa attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from dpokit.config import VARLEN_ATTENTION, ConfigError
from dpokit.data.batching import counting_runs, to_device


@dataclass
class VarlenRows:
    """How the tokens of ``[R, T]`` rows are regrouped into back-to-back causal sequences.

    gather: [M] long, the flat index (``row * T + col``) of each token of the kernel's sequences
    take: [R * T] long, for each row token, the position in ``gather`` whose output it takes
    cu_seqlens: [S + 1] int32, where each of the S sequences starts in ``gather`` (then M)
    max_seqlen: the longest sequence
    """

    gather: torch.Tensor
    take: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    def to(self, device: torch.device | str) -> "VarlenRows":
        return VarlenRows(to_device(self.gather, device), to_device(self.take, device), to_device(self.cu_seqlens, device), self.max_seqlen)


def varlen_rows(groups: torch.Tensor, branches: torch.Tensor | None) -> VarlenRows:
    """The regrouping of rows tagged with ``groups`` / ``branches`` (see :mod:`dpokit.masks`).

    groups: [R, T] long, each token's pair or sequence (-1 padding); branches: [R, T] long (0 shared
    prompt, 1.. a reply), or None (packed rows: every token shared). Within a group the shared
    tokens must come first, as every dpokit layout places them. Built on the host, run by run (a
    run: consecutive tokens of one group and branch), not token by token.
    """
    rows, width = groups.shape
    groups, branches = groups.cpu(), torch.zeros_like(groups, device="cpu") if branches is None else branches.cpu()
    new_run = torch.ones(rows, width, dtype=torch.bool)
    new_run[:, 1:] = (groups[:, 1:] != groups[:, :-1]) | (branches[:, 1:] != branches[:, :-1])
    starts = new_run.reshape(-1).nonzero().squeeze(1)
    ends = starts[1:].tolist() + [rows * width]
    members: dict[tuple[int, int], list[tuple[int, int, int]]] = {}  # (row, group) -> its runs, in order
    for start, end, group, branch in zip(starts.tolist(), ends, groups.reshape(-1)[starts].tolist(), branches.reshape(-1)[starts].tolist()):
        members.setdefault((start // width, group), []).append((start, end, branch))
    pieces: list[tuple[int, int, bool]] = []  # (first flat index, length, whether the row token takes this output)
    lengths: list[int] = []
    for (r, group), runs in members.items():
        shared = [(a, b) for a, b, branch in runs if branch == 0]
        own: dict[int, list[tuple[int, int]]] = {}
        for a, b, branch in runs:
            if branch:
                own.setdefault(branch, []).append((a, b))
        if own and shared and shared[-1][1] - 1 > min(a for spans in own.values() for a, _ in spans):
            raise ValueError(f"row {r}, group {group}: a shared token follows a reply token")
        for k, replies in enumerate(list(own.values()) or [[]]):
            # the prompt's output comes from the first sequence
            pieces += [(a, b - a, k == 0) for a, b in shared] + [(a, b - a, True) for a, b in replies]
            lengths.append(sum(b - a for a, b in shared + replies))
    sizes = torch.tensor([n for _, n, _ in pieces], dtype=torch.long)
    placed = sizes.cumsum(0) - sizes  # where each piece starts in ``gather``
    taken = torch.tensor([t for *_, t in pieces], dtype=torch.bool)
    take = torch.zeros(rows * width, dtype=torch.long)
    take[counting_runs([a for a, _, t in pieces if t], sizes[taken])] = counting_runs(placed[taken].tolist(), sizes[taken])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return VarlenRows(counting_runs([a for a, _, _ in pieces], sizes), take, cu, max(lengths))


def _reference_kernel(q, k, v, cu_seqlens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """Causal attention within each sequence, one sdpa call per sequence (exact; any device/dtype).

    q, k: [M, Hq or Hkv, D], v: [M, Hkv, Dv] -> [M, Hq, Dv] (Dv may differ from D: DeepSeek's MLA).
    """
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))  # [1, H, L, D]
        if ks.shape[1] != qs.shape[1]:
            ks, vs = (x.repeat_interleave(qs.shape[1] // x.shape[1], dim=1) for x in (ks, vs))
        length = end - start
        mask = None
        if window is not None and window < length:
            i = torch.arange(length, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        attended = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scale)
        out[start:end] = attended[0].transpose(0, 1)
    return out


_PARAMETER_NAMES: dict = {}


def _parameter_names(function) -> frozenset[str]:
    """The parameter names of ``function``, read once (the kernel is called in every layer). A plain
    dict, filled by the eager model check before any compile: torch.compile then reads the entry
    instead of tracing ``inspect`` (or warning about an ``lru_cache``)."""
    if function not in _PARAMETER_NAMES:
        _PARAMETER_NAMES[function] = frozenset(inspect.signature(function).parameters)
    return _PARAMETER_NAMES[function]


def _flash_kernel(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, window: int | None) -> torch.Tensor:
    """torch's flash-attention varlen kernel (CUDA). Shapes as :func:`_reference_kernel`; a value head
    size other than the query's is padded with zeros to the larger (flash kernels take one size;
    zeros add nothing to the scores, and the output is cut back)."""
    value_dim, size = v.shape[-1], max(q.shape[-1], v.shape[-1])
    if value_dim != q.shape[-1]:
        q, k, v = (torch.nn.functional.pad(x, (0, size - x.shape[-1])) for x in (q, k, v))
        return _flash_kernel(q, k, v, cu_seqlens, max_seqlen, scale, window)[..., :value_dim]
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        raise ConfigError(
            f"attn_implementation={VARLEN_ATTENTION} needs torch.nn.attention.varlen, which torch {torch.__version__} "
            "lacks (torch 2.10 and later have it): upgrade torch, or use attn_implementation=sdpa or flex_attention"
        ) from None
    dtype = q.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        if not torch.is_autocast_enabled("cuda"):
            raise ConfigError(
                f"attn_implementation={VARLEN_ATTENTION} runs flash-attention, which takes bfloat16 or float16, and this "
                f"model computes in {str(dtype).replace('torch.', '')}: set bf16=true (or fp16=true), or use sdpa"
            )
        dtype = torch.get_autocast_dtype("cuda")
    q, k, v = (x.to(dtype) for x in (q, k, v))
    heads, kv_heads = q.shape[1], k.shape[1]
    params = _parameter_names(varlen_attn)
    gqa = {}
    if heads != kv_heads:
        if "enable_gqa" in params:  # the newest API takes grouped-query heads
            gqa = {"enable_gqa": True}
        else:  # the earlier ones (torch 2.11 too) take as many key/value heads as query heads
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    if "window_size" in params:  # windows (right edge 0: causal) and a scale
        left = -1 if window is None else window - 1
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale,
                           window_size=(left, 0), **gqa)
    # the first releases: is_causal, no window, maybe no scale
    if window is not None and window < max_seqlen:
        raise ConfigError(f"sliding-window attention with {VARLEN_ATTENTION} needs a newer torch (varlen_attn with "
                          "window_size): upgrade torch, or use sdpa")
    if "scale" in params:
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=True, scale=scale)
    q = q * (scale * q.shape[-1] ** 0.5)  # the default scale is 1/sqrt(D)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, is_causal=True)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    dpokit_varlen: VarlenRows | None = None,
    **kwargs,
):
    """transformers' attention-function signature: query [B, Hq, T, D], key/value [B, Hkv, T, D]
    -> ([B, T, Hq, D], None). With ``dpokit_varlen`` (passed to the model's forward by
    :class:`dpokit.logps.ReplyLogProbs`) the rows are regrouped and attended by the varlen kernel;
    without, this is transformers' sdpa attention with the mask transformers built."""
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None:
        raise ConfigError(f"{VARLEN_ATTENTION} cannot soft-cap attention scores or add attention sinks: use attn_implementation=eager")
    if dpokit_varlen is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      sliding_window=sliding_window, **kwargs)
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} runs without attention dropout (dpokit disables dropout), got {dropout}")
    batch, heads, width, dim = query.shape
    scale = dim**-0.5 if scaling is None else scaling

    rows = dpokit_varlen

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, D] -> [M, H, D], the kernel's sequences
        return x.transpose(1, 2).reshape(batch * width, x.shape[1], x.shape[-1]).index_select(0, rows.gather)

    q, k, v = flat(query), flat(key), flat(value)
    if q.is_cuda:
        out = _flash_kernel(q, k, v, rows.cu_seqlens, rows.max_seqlen, scale, sliding_window)
    else:
        out = _reference_kernel(q, k, v, rows.cu_seqlens, scale, sliding_window)
    out = out.to(query.dtype).index_select(0, rows.take)  # [B * T, Hq, Dv], row order
    return out.reshape(batch, width, heads, out.shape[-1]), None


def register_varlen_attention() -> None:
    """Make ``attn_implementation="dpokit_varlen"`` known to transformers (idempotent). Its mask
    builder is sdpa's, for forwards without dpokit's rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
