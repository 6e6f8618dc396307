"""dpokit_varlen: rows regrouped into plain causal sequences for a varlen kernel give exactly the
attention of dpokit's mask rule, and reply log-probs and gradients equal the naive computation.
Without CUDA the regrouping runs the exact per-sequence sdpa loop; tests/test_cuda.py runs torch's
flash-attention kernel."""

from __future__ import annotations

import pytest
import torch

from dpokit.config import VARLEN_ATTENTION, ConfigError, load_config
from dpokit.data.batching import LAYOUTS, make_batch
from dpokit.logps import ReplyLogProbs, check_rows_kept_apart
from dpokit.masks import dense_row_mask
from dpokit.varlen import _reference_kernel, register_varlen_attention, varlen_attention_forward, varlen_rows
from runs import LORA
from test_logps import naive_logps, ragged_pairs, tiny_lm


def varlen_lm(arch: str = "qwen2", seed: int = 0):
    register_varlen_attention()
    model = tiny_lm(arch, seed)
    model.config._attn_implementation = VARLEN_ATTENTION
    return model


def test_a_prefix_shared_pair_becomes_prompt_plus_chosen_and_prompt_plus_rejected():
    # row 0: pair 0 = prompt [0, 1], chosen [2, 3], rejected [4]; then padding [5]
    # row 1: packed-style group without branches would be one sequence: tested below
    groups = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branches = torch.tensor([[0, 0, 1, 1, 2, 0]])
    rows = varlen_rows(groups, branches)
    assert rows.gather.tolist() == [0, 1, 2, 3, 0, 1, 4, 5]
    assert rows.cu_seqlens.tolist() == [0, 4, 7, 8] and rows.max_seqlen == 4
    # prompt and chosen outputs from the first sequence, rejected from the second, padding its own
    assert rows.take.tolist() == [0, 1, 2, 3, 6, 7]


def test_packed_rows_become_one_sequence_each():
    groups = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    rows = varlen_rows(groups, None)
    assert rows.gather.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert rows.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12] and rows.max_seqlen == 4
    assert rows.take.tolist() == list(range(12))


def test_a_shared_token_after_a_reply_is_refused():
    with pytest.raises(ValueError, match="row 0, group 0: a shared token follows a reply token"):
        varlen_rows(torch.tensor([[0, 0, 0]]), torch.tensor([[0, 1, 0]]))


@pytest.mark.parametrize("layout", ["packed", "prefix_padded", "prefix_packed"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_regrouped_attention_is_the_mask_rule(layout, kv_heads):
    """For random queries, keys and values, the varlen attention over the regrouped rows equals sdpa
    under dpokit's dense mask, outputs and input gradients, grouped-query heads included."""
    batch = make_batch(ragged_pairs(seed=3), layout, row_tokens=64)
    rows, width = batch.groups.shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, width, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(rows, kv_heads, width, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    regrouped = varlen_rows(batch.groups, batch.branches)
    out, _ = varlen_attention_forward(None, q, k, v, None, scaling=0.3, dpokit_varlen=regrouped)  # [R, T, H, D]
    mask = dense_row_mask(batch.groups, batch.branches, torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4 // kv_heads, 1), v.repeat_interleave(4 // kv_heads, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    real = (batch.groups >= 0)[:, :, None, None]  # padding sees other padding in the mask, itself here
    assert torch.allclose(out * real, expected * real, atol=1e-10)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64) * real
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, exp in zip(grads, want):
        assert torch.allclose(got, exp, atol=1e-10)


def test_reference_kernel_applies_a_sliding_window():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 7], dtype=torch.int32)
    out = _reference_kernel(q, k, v, cu, 0.5, window=3)
    i = torch.arange(7)
    allowed = (i[None] <= i[:, None]) & (i[:, None] - i[None] < 3)
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.5
    expected = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    assert torch.allclose(out, expected, atol=1e-12)


def _fake_varlen_attn(api: str):
    """Stand-ins for each signature torch's varlen_attn has had, computing with the reference loop,
    asserting the arguments the GPU path must pass to that signature."""

    def attend(q, k, v, cu, scale, window):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash kernels take one head size"
        return _reference_kernel(q.double(), k.double(), v.double(), cu, scale, window).to(q.dtype)

    def newest(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False,
               seqused_k=None, block_table=None, num_splits=None):
        assert window_size[1] == 0 and enable_gqa == (q.shape[1] != k.shape[1]) and max_q == max_k
        return attend(q, k, v, cu_q, scale, None if window_size[0] < 0 else window_size[0] + 1)

    def windows(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):  # torch 2.11
        assert window_size[1] == 0 and q.shape[1] == k.shape[1] and max_q == max_k
        return attend(q, k, v, cu_q, scale, None if window_size[0] < 0 else window_size[0] + 1)

    def with_scale(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None, scale=None):
        assert is_causal and q.shape[1] == k.shape[1]
        return attend(q, k, v, cu_q, scale, None)

    def first(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and q.shape[1] == k.shape[1]
        return attend(q, k, v, cu_q, q.shape[-1] ** -0.5, None)

    return {"newest": newest, "windows": windows, "with_scale": with_scale, "first": first}[api]


@pytest.mark.parametrize("api", ["newest", "windows", "with_scale", "first"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("value_dim", [8, 6])
def test_gpu_path_adapts_to_each_varlen_attn_signature(monkeypatch, api, window, value_dim):
    """The CUDA path's call (scale, grouped-query heads, sliding window, a value head size other than
    the query's, as DeepSeek's MLA has) under each signature torch's varlen_attn has had, against
    stand-ins computing with the reference loop: the same attention."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    from dpokit.varlen import _flash_kernel

    monkeypatch.setattr(varlen, "varlen_attn", _fake_varlen_attn(api))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(15, 4, 8, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(15, 2, dim, generator=g).to(torch.bfloat16) for dim in (8, value_dim))
    cu = torch.tensor([0, 6, 7, 15], dtype=torch.int32)
    expected = _reference_kernel(q.double(), k.double(), v.double(), cu, 0.3, window)
    if window is not None and api not in ("newest", "windows"):
        with pytest.raises(ConfigError, match="sliding-window attention with dpokit_varlen needs a newer torch"):
            _flash_kernel(q, k, v, cu, 8, 0.3, window)
        return
    torch.testing.assert_close(_flash_kernel(q, k, v, cu, 8, 0.3, window).double(), expected, atol=3e-2, rtol=3e-2)


def test_gpu_path_refuses_float32_compute_outside_autocast():
    pytest.importorskip("torch.nn.attention.varlen")
    from dpokit.varlen import _flash_kernel

    q = torch.zeros(3, 2, 8)
    with pytest.raises(ConfigError, match="takes bfloat16 or float16.*set bf16=true"):
        _flash_kernel(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, 0.3, None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_varlen_takes_value_heads_of_another_size(layout):
    """DeepSeek V3's multi-head latent attention: value heads of 12, query/key heads of 16. Regrouped
    rows give the naive log-probs (was a reshape error from inside the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "deepseek_v3" not in CONFIG_MAPPING:
        pytest.skip("no DeepSeek V3 in this transformers release")
    register_varlen_attention()
    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    pairs = ragged_pairs(seed=1)
    with torch.no_grad():
        naive = naive_logps(model, pairs)
        model.config._attn_implementation = VARLEN_ATTENTION
        scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=check_rows_kept_apart(model, layout))
        got = scorer(**make_batch(pairs, layout, row_tokens=80).model_inputs())
    assert (got - naive).abs().max() < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_varlen_logps_match_naive(arch, layout):
    model = varlen_lm(arch)
    pairs = ragged_pairs(seed=1)
    with torch.no_grad():
        naive = naive_logps(model, pairs)
    mask_packed_rows = check_rows_kept_apart(model, layout)
    assert mask_packed_rows == (layout != "padded")  # every multi-sequence row is regrouped
    scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=mask_packed_rows)
    with torch.no_grad():
        got = scorer(**make_batch(pairs, layout, row_tokens=80).model_inputs())
    assert (got - naive).abs().max() < 1e-4


@pytest.mark.parametrize("layout", ["packed", "prefix_packed"])
def test_varlen_gradients_match_naive(layout):
    model, pairs = varlen_lm(), ragged_pairs(seed=2)
    naive_grads = torch.autograd.grad(naive_logps(model, pairs).square().sum(), list(model.parameters()))
    scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=check_rows_kept_apart(model, layout))
    got = scorer(**make_batch(pairs, layout).model_inputs())
    grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
    for a, b in zip(grads, naive_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_plain_forwards_under_varlen_are_sdpa():
    """Without dpokit's rows (generation, a plain call) the model runs transformers' sdpa path with
    its own mask: left padding included."""
    model, plain = varlen_lm(), tiny_lm()
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-5)


def test_the_kernels_own_refusal_reaches_the_user_unchanged(monkeypatch):
    """The model check runs the kernel: its refusal (on CUDA, float32 compute outside autocast) names
    its own fix, and must not come out as "the model does not take dpokit's regrouped rows"."""
    import dpokit.varlen

    def refusing_kernel(*args):
        raise ConfigError("attn_implementation=dpokit_varlen runs flash-attention, which takes bfloat16 or float16: set bf16=true")

    monkeypatch.setattr(dpokit.varlen, "_reference_kernel", refusing_kernel)
    with pytest.raises(ConfigError, match="^attn_implementation=dpokit_varlen runs flash-attention.*set bf16=true$"):
        check_rows_kept_apart(varlen_lm(), "packed")


def test_a_model_that_drops_the_regrouped_rows_is_refused(monkeypatch):
    """A forward that does not pass extra keyword arguments on to its attention would silently run
    one causal mask over the whole row: the check refuses it, naming the attention to use."""
    model = varlen_lm()
    decoder_forward = type(model.model).forward

    def forward_dropping_extras(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **extra):
        return decoder_forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)

    monkeypatch.setattr(type(model.model), "forward", forward_dropping_extras)
    with pytest.raises(ConfigError, match="does not pass dpokit's regrouped rows to its attention: use attn_implementation=sdpa"):
        check_rows_kept_apart(model, "packed")


def test_prefix_sharing_is_allowed_with_varlen_and_refused_with_flash_attention_2(tmp_path):
    path = tmp_path / "c.yaml"
    (tmp_path / "pairs.jsonl").write_text("")
    path.write_text("data:\n  train: pairs.jsonl\nmodel:\n  attn_implementation: dpokit_varlen\n")
    assert load_config(path).training.prefix_sharing
    path.write_text("data:\n  train: pairs.jsonl\nmodel:\n  attn_implementation: flash_attention_2\n")
    with pytest.raises(ConfigError, match="dpokit_varlen"):
        load_config(path)


@pytest.mark.parametrize("extra", [(), ("precompute_ref_log_probs=false", "gradient_checkpointing=true"),
                                   ("prefix_sharing=false", *LORA)], ids=["cached", "live-checkpointed", "packed-lora"])
def test_training_under_varlen_matches_sdpa_step_for_step(workdir, extra):
    """``dpokit train`` with attn_implementation=dpokit_varlen: the same losses, margins, log-probs
    and gradient norms as sdpa with its mask, for prefix-shared packed rows (the default layout) with
    the reference cached or scored live (activation checkpointing recomputing the layers), and for
    packed rows with LoRA (the reference is the model with its adapters off)."""
    from dpokit.train import train
    from runs import run_config, train_rows

    name = "-".join(x.split("=")[0] for x in extra[:2]) or "cached"
    runs = [train_rows(train(run_config(workdir, f"varlen-{attn}-{name}", f"attn_implementation={attn}", "max_steps=3", *extra)))
            for attn in (VARLEN_ATTENTION, "sdpa")]
    for varlen, sdpa in zip(*runs, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert varlen[key] == pytest.approx(sdpa[key], rel=1e-4, abs=1e-5), key


def test_training_batches_bring_their_regrouping_from_the_host(workdir, monkeypatch):
    """Under dpokit_varlen ``build_batch`` regroups the rows on the host, with the batch, so a forward
    on a GPU never copies its rows back to build them (a synchronisation each time); the forward uses
    the batch's regrouping, and the log-probs equal those built in the forward."""
    import dpokit.varlen
    from dpokit.train import build_batch

    config = load_config(None, [f"data.train={workdir / 'train.jsonl'}", f"attn_implementation={VARLEN_ATTENTION}"])
    pairs = ragged_pairs(seed=4)
    batch = build_batch(pairs, config, pad_id=0)
    expected = varlen_rows(batch.groups, batch.branches)
    assert [torch.equal(getattr(batch.varlen, f), getattr(expected, f)) for f in ("gather", "take", "cu_seqlens")] == [True] * 3
    model = varlen_lm()
    scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=check_rows_kept_apart(model, "prefix_packed"))
    with torch.no_grad():
        built_in_forward = scorer(**{**batch.model_inputs(), "varlen": None})

        def no_rebuild(*args):
            raise AssertionError("the forward rebuilt the regrouping")

        monkeypatch.setattr(dpokit.varlen, "varlen_rows", no_rebuild)
        assert torch.equal(scorer(**batch.to("cpu").model_inputs()), built_in_forward)
    sdpa = load_config(None, [f"data.train={workdir / 'train.jsonl'}"])
    assert build_batch(pairs, sdpa, pad_id=0).varlen is None


@pytest.mark.parametrize("attn", ["flex_attention", VARLEN_ATTENTION, "flash_attention_2"])
def test_windowed_row_masks_are_refused_for_attention_that_reads_no_dense_mask(attn):
    """A sliding window is kept by the dense mask only: asked of another attention it is refused
    with a clear error rather than built and ignored; sdpa and eager get the windowed mask."""
    from dpokit.masks import row_attention_mask

    groups, branches = torch.tensor([[0, 0, 0, 0, 0, -1]]), torch.tensor([[0, 0, 1, 1, 2, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 2, 0]])
    with pytest.raises(ValueError, match=f"^dpokit's windowed row masks are dense, which {attn} does not read$"):
        row_attention_mask(groups, branches, attn, torch.float32, positions, windows=2)
    for dense in ("sdpa", "eager", None):
        mask = row_attention_mask(groups, branches, dense, torch.float32, positions, windows=2)
        assert torch.equal(mask, dense_row_mask(groups, branches, torch.float32, positions, 2))


def test_row_masks_by_hand():
    """The mask rule on one prefix-shared row, written out: prompt (columns 0-1), chosen (2-3),
    rejected (4, position 2) and a padding token (group -1). 1 = may attend. A reply sees its
    prompt and itself, the rejected token never the chosen ones, padding only itself; with a
    window of 2 positions (one per layer type, or none), a token sees positions p - 1 and p only
    (so rejected, at position 2, still sees the prompt's position 1 although 3 columns back). Packed
    rows (no branches) get the block-diagonal causal mask. Blocked entries are dtype's min."""
    from dpokit.masks import row_attention_mask

    groups, branches = torch.tensor([[0, 0, 0, 0, 0, -1]]), torch.tensor([[0, 0, 1, 1, 2, 0]])
    positions = torch.tensor([[0, 1, 2, 3, 2, 0]])
    full = [[1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 1]]
    windowed = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [0, 1, 1, 0, 0, 0],
                [0, 0, 1, 1, 0, 0],
                [0, 1, 0, 0, 1, 0],
                [0, 0, 0, 0, 0, 1]]

    def allowed(mask):
        assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, torch.finfo(torch.float32).min}
        return (mask[0, 0] == 0).int().tolist()

    for attn in ("sdpa", "eager", None):
        assert allowed(row_attention_mask(groups, branches, attn, torch.float32)) == full
        assert allowed(row_attention_mask(groups, branches, attn, torch.float32, positions, windows=2)) == windowed
        masks = row_attention_mask(groups, branches, attn, torch.float32, positions,
                                   windows={"full_attention": None, "sliding_attention": 2})
        assert allowed(masks["full_attention"]) == full and allowed(masks["sliding_attention"]) == windowed
    packed = row_attention_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]), None, "sdpa", torch.float32)
    assert allowed(packed) == [[1, 0, 0, 0, 0, 0],
                               [1, 1, 0, 0, 0, 0],
                               [0, 0, 1, 0, 0, 0],
                               [0, 0, 1, 1, 0, 0],
                               [0, 0, 1, 1, 1, 0],
                               [0, 0, 0, 0, 0, 1]]
