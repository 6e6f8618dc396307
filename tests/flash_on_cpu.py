"""The flash-attn package's two kernels, emulated on the CPU, under transformers' own dispatch.

``attn_implementation="flash_attention_2"`` runs transformers' ``_flash_attention_forward``, which
decides from its inputs whether to call flash-attention's dense kernel (each row one causal
sequence), its varlen kernel (sequences bounded by ``cu_seqlens``) or to unpad a padding mask
first. That decision is what dpokit's packed rows depend on, so the tests run it as it is, and
replace only the kernels (which need the flash-attn package and a GPU) with exact sdpa loops of the
same signatures. Each call is recorded, so a test also sees which kernel ran.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

CALLS: list[str] = []
"""The emulated kernels called since the fixture was set up (see each kernel)."""


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """One causal sequence: q [S, Hq, D], k/v [S, Hkv, D] -> [S, Hq, D] (grouped heads repeated)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(repeat, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale)
    return out.transpose(0, 1)


def _check(dropout_p: float, causal: bool, window_size, softcap: float) -> None:
    if dropout_p or not causal or tuple(window_size) != (-1, -1) or softcap:
        raise NotImplementedError("the emulated flash kernels are causal only, without dropout, window or soft-cap")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_func: q [B, S, Hq, D], k/v [B, S, Hkv, D] -> [B, S, Hq, D], each row one causal sequence."""
    _check(dropout_p, causal, window_size, softcap)
    CALLS.append("dense")
    return torch.stack([_causal(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash_attn_varlen_func: q [M, Hq, D], k/v [M, Hkv, D] -> [M, Hq, D], causal within each
    ``cu_seqlens`` span. Recorded as "varlen" when ``max_seqlen`` is a Python int, "varlen, max read
    from the device" when it is a tensor (the kernel takes an int: on a GPU, reading it is a synchronisation)."""
    _check(dropout_p, causal, window_size, softcap)
    CALLS.append("varlen" if isinstance(max_seqlen_q, int) else "varlen, max read from the device")
    with _disable_current_modes():  # the real kernel reads the bounds on the device: hidden from tests that watch for host reads
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(max_seqlen_q) == int(max_seqlen_k)
        bounds = cu_seqlens_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == q.shape[0] and max(b - a for a, b in zip(bounds, bounds[1:])) == int(max_seqlen_q)
    return torch.cat([_causal(q[a:b], k[a:b], v[a:b], softmax_scale) for a, b in zip(bounds, bounds[1:])])


@pytest.fixture
def flash_on_cpu(monkeypatch):
    """Make transformers' flash_attention_2 run the emulated kernels (any transformers dpokit supports)."""
    import transformers.modeling_flash_attention_utils as fa

    real = fa.lazy_import_flash_attention
    process = fa._lazy_define_process_function(flash_attn_varlen_func)
    if "attention_wrapper" in inspect.signature(real).parameters:  # transformers 5: a kv-cache kernel too
        kernels = ((flash_attn_func, flash_attn_varlen_func, None, fa._pad_input, fa._unpad_input), (process, dict))
    else:  # transformers 4.56
        kernels = ((flash_attn_func, flash_attn_varlen_func, fa._pad_input, fa._unpad_input), process)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *args, **kwargs: kernels)
    CALLS.clear()
    yield CALLS
