"""What only a CUDA GPU can check: flex_attention gradients, flash-attention varlen packing and training
(the flash-attn package's, and torch's own through dpokit_varlen), bfloat16 and float16 training, QLoRA,
8-bit AdamW, FSDP2 and DeepSpeed ZeRO-3 over NCCL, and the memory planner against the allocator's peak
(one process's, and ZeRO-3's).

Skipped on machines without CUDA (CI has none); run them on a GPU with
``python -m pytest tests/test_cuda.py -v`` (``bash scripts/gpu_checks.sh`` runs them and the GPU benchmark).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math

import pytest
import torch

from runs import LORA, read_rows, run_config, train_rows
from test_logps import naive_logps, ragged_pairs, tiny_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HIDDEN = 64
"""Tiny models here have heads of 16 (HIDDEN / 4): flex_attention's CUDA kernels take no fewer."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The shared tiny model and data (runs.make_workdir), with heads of 16."""
    from runs import make_workdir

    return make_workdir(tmp_path_factory.mktemp("cuda"), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN)


@pytest.mark.parametrize("layout", ["packed", "prefix_packed", "prefix_padded"])
def test_flex_attention_logps_and_gradients_match_naive(layout):
    """float32 on the GPU: flex_attention with dpokit's BlockMask (prefix layouts) or transformers'
    (packed) gives the naive log-probs and gradients within 1e-4."""
    from dpokit.data.batching import make_batch
    from dpokit.logps import ReplyLogProbs

    pairs = ragged_pairs(seed=3, n=6)
    naive_model, flex_model = (tiny_lm("llama", seed=1, tie=False, hidden_size=HIDDEN).train() for _ in range(2))
    flex_model.cuda()
    flex_model.config._attn_implementation = "flex_attention"
    weights = torch.linspace(-1, 1, 2 * len(pairs), device="cuda")
    batch = make_batch(pairs, layout, row_tokens=80).to("cuda")
    ours = ReplyLogProbs(flex_model, chunk_size=16)(**batch.model_inputs())
    (ours * weights).sum().backward()
    naive = naive_logps(naive_model, pairs)  # on the CPU, sdpa, full logits
    (naive * weights.cpu()).sum().backward()
    torch.testing.assert_close(ours.cpu(), naive, atol=1e-4, rtol=0)
    grads = dict(naive_model.named_parameters())
    for name, param in flex_model.named_parameters():
        torch.testing.assert_close(param.grad.cpu(), grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "dpokit_varlen"])
def test_a_micro_batch_never_waits_for_the_gpu(attn):
    """No host synchronisation in moving a training micro-batch and its reference log-probs to the
    GPU or in its forward (bfloat16, prefix-shared packed rows, the batch built as training builds
    it): the host keeps queueing kernels while the GPU runs them. torch's sync debug mode makes any
    synchronising call an error. (The backward is not checked: torch's CUDA embedding backward
    counts its segments on the host, once, at its end.)"""
    if attn == "dpokit_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    from dpokit.data.batching import make_batch
    from dpokit.logps import ReplyLogProbs, check_rows_kept_apart
    from dpokit.reference import TableReference
    from dpokit.varlen import register_varlen_attention, varlen_rows

    register_varlen_attention()
    model = tiny_lm("qwen2", seed=0, hidden_size=HIDDEN).cuda().to(torch.bfloat16).train()
    model.config._attn_implementation = attn
    scorer = ReplyLogProbs(model, chunk_size=16, mask_packed_rows=check_rows_kept_apart(model, "prefix_packed"))
    batch = make_batch(ragged_pairs(seed=2, n=6), "prefix_packed", row_tokens=80)
    if attn == "dpokit_varlen":
        batch.varlen = varlen_rows(batch.groups, batch.branches)  # as train.build_batch does, on the host
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = batch.to("cuda")  # pinned, non-blocking copies
        ref = TableReference(torch.randn(6, 2)).logps(batch, list(range(6)))
        logps = scorer(**batch.model_inputs()) + 0 * ref
    finally:
        torch.cuda.set_sync_debug_mode("default")
    logps.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("row_tokens", [None, 60], ids=["one-row", "several-rows"])
def test_flash_attention_2_packed_rows_are_varlen_and_match_padded(row_tokens):
    """Packed rows bring their sequences' bounds (dpokit.masks.SequenceBounds) to flash-attention's
    varlen kernel, in one row or several. In bfloat16 the packed flash-attention log-probs match
    padded sdpa's."""
    from dpokit.data.batching import make_batch
    from dpokit.logps import ReplyLogProbs, check_rows_kept_apart
    from dpokit.masks import sequence_bounds

    pairs = ragged_pairs(seed=4, n=6)
    model = tiny_lm("qwen2", seed=2).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        padded = ReplyLogProbs(model)(**make_batch(pairs, "padded").to("cuda").model_inputs())
        model.config._attn_implementation = "flash_attention_2"
        assert check_rows_kept_apart(model, "packed") is True
        batch = make_batch(pairs, "packed", row_tokens=row_tokens)
        batch.varlen = sequence_bounds(batch.groups)
        packed = ReplyLogProbs(model, mask_packed_rows=True)(**batch.to("cuda").model_inputs())
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, padded, atol=0.1, rtol=0.02)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
@pytest.mark.parametrize("precision", ["dtype=bfloat16", "bf16=true"])
def test_flash_attention_2_training_keeps_chunked_logps(workdir, recwarn, precision):
    """Packed rows through flash-attention's varlen kernel, end to end. The one-time model checks run
    on the GPU under the run's autocast: float32 weights outside it would fail flash-attention and
    push the run onto the full-logits path."""
    from dpokit.train import train

    out = train(run_config(workdir, f"cuda-fa2-{precision.replace('=', '-')}", precision, "prefix_sharing=false",
                           "attn_implementation=flash_attention_2", "max_steps=6"))
    rows = train_rows(out)
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert not [w for w in recwarn if "full logits" in str(w.message)]


needs_torch_varlen = pytest.mark.skipif(importlib.util.find_spec("torch.nn.attention.varlen") is None,
                                        reason="this torch has no torch.nn.attention.varlen")


@needs_torch_varlen
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (2, 5)])
def test_torch_varlen_kernel_matches_the_reference_loop(dtype, kv_heads, window):
    """dpokit_varlen's CUDA kernel (torch's flash-attention varlen) against the per-sequence sdpa loop
    the CPU tests use, in float32 on the same 16-bit inputs: causal within each ragged sequence, the
    given scale, grouped-query heads, a sliding window; outputs and input gradients."""
    from dpokit.varlen import _flash_kernel, _reference_kernel

    lengths = [7, 1, 19, 12, 40]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sum(lengths), 4, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(sum(lengths), kv_heads, 64, device="cuda", generator=g).to(dtype).requires_grad_() for _ in range(2))
    out = _flash_kernel(q, k, v, cu, max(lengths), 0.2, window)
    ref = _reference_kernel(*(x.float() for x in (q, k, v)), cu, 0.2, window)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    weights = torch.randn(out.shape, device="cuda", generator=g)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    want = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got.float(), exp.float(), atol=5e-2, rtol=5e-2)


@needs_torch_varlen
@pytest.mark.parametrize("layout", ["packed", "prefix_packed"])
def test_dpokit_varlen_logps_match_padded_sdpa_in_bfloat16(layout):
    """Regrouped rows through torch's flash-attention kernel give padded sdpa's log-probs (bfloat16)."""
    from dpokit.config import VARLEN_ATTENTION
    from dpokit.data.batching import make_batch
    from dpokit.logps import ReplyLogProbs, check_rows_kept_apart
    from dpokit.varlen import register_varlen_attention

    register_varlen_attention()
    pairs = ragged_pairs(seed=4, n=6)
    model = tiny_lm("qwen2", seed=2).to("cuda", torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        padded = ReplyLogProbs(model)(**make_batch(pairs, "padded").to("cuda").model_inputs())
        model.config._attn_implementation = VARLEN_ATTENTION
        scorer = ReplyLogProbs(model, mask_packed_rows=check_rows_kept_apart(model, layout))
        ours = scorer(**make_batch(pairs, layout).to("cuda").model_inputs())
    torch.testing.assert_close(ours, padded, atol=0.1, rtol=0.02)


def test_prefix_shared_rows_keep_sliding_windows_in_bfloat16():
    """Gemma 3's sliding and full layers under dpokit's per-layer-type masks, on CUDA sdpa in bfloat16
    (the probe that shrinks the window runs there too): the padded layout's log-probs, where the model
    masks its own window, to bfloat16 round-off; without the windows, off by far more."""
    from dpokit.data.batching import make_batch
    from dpokit.logps import ReplyLogProbs, check_rows_kept_apart, check_window
    from test_logps import tiny_of

    pairs = ragged_pairs(seed=4, n=6)
    model = tiny_of("gemma3_text", sliding_window=6, head_dim=8, layer_types=["sliding_attention", "full_attention"])
    model.to("cuda", torch.bfloat16)
    assert check_rows_kept_apart(model, "prefix_packed") is False
    windows = check_window(model, "prefix_packed", False, max_length=64)
    assert windows == {"full_attention": None, "sliding_attention": 6}
    with torch.no_grad():
        padded = ReplyLogProbs(model)(**make_batch(pairs, "padded").to("cuda").model_inputs())
        ours = ReplyLogProbs(model, windows=windows)(**make_batch(pairs, "prefix_packed").to("cuda").model_inputs())
        unwindowed = ReplyLogProbs(model)(**make_batch(pairs, "prefix_packed").to("cuda").model_inputs())
    torch.testing.assert_close(ours, padded, atol=0.1, rtol=0.02)
    assert (unwindowed - padded).abs().max() > 0.2  # on the CPU, 0.6


@needs_torch_varlen
def test_dpokit_varlen_refuses_float32_compute_naming_bf16(workdir):
    from dpokit.config import ConfigError
    from dpokit.train import train

    with pytest.raises(ConfigError, match="bf16=true"):
        train(run_config(workdir, "cuda-varlen-float32", "attn_implementation=dpokit_varlen", "max_steps=1"))


@pytest.mark.parametrize("attn,precision", [("sdpa", "dtype=bfloat16"), ("flex_attention", "dtype=bfloat16"),
                                            ("sdpa", "bf16=true"), ("flex_attention", "bf16=true"), ("sdpa", "fp16=true"),
                                            *(pytest.param("dpokit_varlen", precision, marks=needs_torch_varlen)
                                              for precision in ("dtype=bfloat16", "bf16=true", "fp16=true"))])
def test_16bit_training_on_cuda(workdir, attn, precision):
    """Pure bfloat16 weights, float32 weights under bfloat16 autocast (every attention), and float16
    autocast with CUDA loss scaling. The reference table was scored in the first epoch's micro-batches,
    so before the first update the 16-bit kernels give the policy exactly its reference's numbers."""
    config = run_config(workdir, f"cuda-{precision.replace('=', '-')}-{attn}", precision, f"attn_implementation={attn}",
                        "max_steps=6")
    from dpokit.train import train

    torch.cuda.reset_peak_memory_stats()  # the peaks logged are then this run's
    out = train(config)
    rows = train_rows(out)
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    # the GPU's peak so far, never falling: at least the weights, gradients and AdamW states (16 bytes
    # per float32 parameter; 8 in bfloat16), at most this process's peak
    from safetensors.torch import load_file

    weights = sum(t.numel() for t in load_file(out / "final" / "model.safetensors").values())
    peaks = [r["memory/device_peak_gib"] * 2**30 for r in rows]
    assert peaks == sorted(peaks) and 8 * weights <= peaks[0] <= peaks[-1] <= torch.cuda.max_memory_allocated() + 2**17


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("precision", [("dtype=bfloat16",), ("dtype=float16", "fp16=true")])
def test_qlora_trains_4bit_base(workdir, precision):
    """bfloat16 compute, and float16 compute with loss scaling (GPUs without bfloat16), on
    bitsandbytes' CUDA kernels (tests/test_bitsandbytes.py runs the rest on its CPU backend).
    Step 1's rewards are 0: the reference (the 4-bit base, its fresh adapters adding exactly 0) was
    scored in the first epoch's micro-batches, so its 16-bit kernels saw the same shapes."""
    import json

    from dpokit.train import train

    out = train(run_config(workdir, f"cuda-qlora-{precision[0]}", *LORA, "load_in_4bit=true", *precision, "max_steps=6",
                           "gradient_checkpointing=true"))
    rows = train_rows(out)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["rewards/chosen"] == rows[0]["rewards/rejected"] == 0
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert json.loads((out / "final" / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "final" / "model.safetensors").exists()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_adamw_8bit_trains(workdir):
    from dpokit.train import train

    rows = train_rows(train(run_config(workdir, "cuda-adam8", "optim=adamw_8bit", "max_steps=4")))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["rewards/margins"] != rows[0]["rewards/margins"]


def test_plan_estimate_matches_cuda_peak():
    """Training steps' peak allocation above the weights vs. the planner's estimate (bfloat16,
    prefix_packed, sdpa). Tolerance 0.5x-2x, as on the CPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dpokit.data.batching import make_batch
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.logps import ReplyLogProbs
    from dpokit.plan import RunShape, count_model, estimate

    cfg = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    B, L, P = 4, 512, 128
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    batch = make_batch([TokenizedPair(ids(P), ids(L - P), ids(L - P)) for _ in range(B)], "prefix_packed",
                       row_tokens=2 * L).to("cuda")
    scorer = ReplyLogProbs(model, 1024).train()
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-5)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        logps = scorer(**batch.model_inputs())
        torch.nn.functional.logsigmoid(0.1 * (logps[0::2] - logps[1::2])).mean().neg().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() - base
    shape = RunShape(batch_size=B, max_length=L, prompt_length=P, layout="prefix_packed", dtype_bytes=2)
    full = estimate(count_model(cfg), shape)["full"]
    estimated = full["gradients"] + full["optimizer"] + full["activations"] + full["logps_buffer"]
    print(f"estimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB, ratio {estimated / measured:.2f}")
    assert 0.5 <= estimated / measured <= 2.0


@pytest.mark.skipif(not hasattr(__import__("accelerate").Accelerator, "is_fsdp2"), reason="Accelerate before 1.6 has no FSDP2")
def test_fsdp2_on_cuda_in_bfloat16(workdir):
    """FSDP2 on the GPU through Accelerate itself (NCCL; one process per GPU, so on a one-GPU machine a
    world of one): bfloat16 through its mixed-precision policy, the reference scored through the
    sharded model (rewards exactly 0 before the first update), the whole model saved; the run follows
    the unsharded autocast run within bfloat16 rounding."""
    from dpokit.train import train
    from runs import accelerate_launch, run_args

    processes = next(n for n in (4, 2, 1) if n <= torch.cuda.device_count())  # the same global batch of 4 pairs
    options = ("bf16=true", "max_steps=4", f"per_device_train_batch_size={4 // processes}")
    one = train(run_config(workdir, "cuda-fsdp-one", "bf16=true", "max_steps=4"))
    result = accelerate_launch("-m", "dpokit", "train", *run_args(workdir, "cuda-fsdp-sharded", *options),
                               launch=("--use_fsdp", "--fsdp_version=2"), processes=processes, timeout=900)
    assert "sharding: FSDP2 over" in result.stdout
    sharded = workdir / "cuda-fsdp-sharded"
    a, b = train_rows(one), train_rows(sharded)
    # the reference table comes from a no-grad pass: CUDA may pick other bf16 kernels than for training
    assert abs(b[0]["rewards/chosen"]) < 1e-3 and abs(b[0]["rewards/rejected"]) < 1e-3
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=5e-3), ra["step"]
    assert (sharded / "final" / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero3_trains_on_cuda_in_bfloat16(workdir):
    """DeepSpeed ZeRO-3 on the GPU through Accelerate itself (NCCL; one process per GPU, so on a one-GPU
    machine a world of one), in its bfloat16 mode with a live separate reference in an engine of its
    own: both partitioned, the reference scoring as the policy does (rewards 0 before the first
    update, to the no-grad pass's kernels), the run following one process's autocast run within
    bfloat16 rounding, the whole model saved in float32, the GPU's peak logged, and ``dpokit eval``
    launched the same way giving the run's last eval row."""
    from dpokit.train import train
    from runs import accelerate_launch, run_args
    from test_deepspeed import zero3_config

    processes = next(n for n in (4, 2, 1) if n <= torch.cuda.device_count())  # the same global batch of 4 pairs
    options = ("bf16=true", "max_steps=4", "eval_steps=4", f"per_device_train_batch_size={4 // processes}",
               f"model.ref_model_name_or_path={workdir / 'model'}", "precompute_ref_log_probs=false")
    launch = ("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir)))
    one = train(run_config(workdir, "cuda-zero3-one", "bf16=true", "max_steps=4"))
    result = accelerate_launch("-m", "dpokit", "train", *run_args(workdir, "cuda-zero3", *options), launch=launch,
                               processes=processes, timeout=900)
    output = result.stdout + result.stderr
    assert f"sharding: DeepSpeed ZeRO-3 over {processes} processes" in output
    assert f"weights partitioned over {processes} processes (ZeRO-3), in bfloat16" in output
    run = workdir / "cuda-zero3"
    a, b = train_rows(one), train_rows(run)
    assert abs(b[0]["rewards/chosen"]) < 1e-3 and abs(b[0]["rewards/rejected"]) < 1e-3
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=5e-3), ra["step"]
        assert rb["memory/device_peak_gib"] > 0
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(run / "final" / "model.safetensors").values()} == {torch.float32}
    accelerate_launch("-m", "dpokit", "eval", str(run), "--output", str(run / "eval-again.json"), launch=launch,
                      processes=processes, timeout=900)
    again = json.loads((run / "eval-again.json").read_text())["metrics"]
    last = [r for r in read_rows(run) if "eval/loss" in r][-1]
    for key in ("eval/loss", "eval/logps/chosen", "eval/rewards/margins"):
        assert again[key] == pytest.approx(last[key], rel=1e-6, abs=1e-6), key


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero3_peak_is_what_dpokit_plan_estimates(tmp_path, workdir):
    """`dpokit plan --zero 3 --processes N` against a ZeRO-3 bfloat16 run's logged GPU peak, on a model
    whose weights, gradients and AdamW states (16 bytes per parameter here) dominate: 23M parameters
    (hidden 512, 8 layers). Tolerance 0.5x-2x, as for the plan's other checks against the allocator."""
    from dpokit.cli import main
    from dpokit.tiny import build_tiny_model
    from runs import accelerate_launch, run_args
    from test_deepspeed import zero3_config

    build_tiny_model(tmp_path / "mid", hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=1408, seed=0)
    processes = next(n for n in (4, 2, 1) if n <= torch.cuda.device_count())
    overrides = (f"model.name_or_path={tmp_path / 'mid'}", "bf16=true", "max_steps=3", "eval=null",
                 f"per_device_train_batch_size={4 // processes}")
    accelerate_launch("-m", "dpokit", "train", *run_args(workdir, "cuda-zero3-mid", *overrides), processes=processes,
                      launch=("--use_deepspeed", "--deepspeed_config_file", str(zero3_config(workdir))), timeout=900)
    measured = max(r["memory/device_peak_gib"] for r in train_rows(workdir / "cuda-zero3-mid")) * 2**30
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["plan", *run_args(workdir, "cuda-zero3-mid", *overrides), "--zero", "3", "--processes", str(processes), "--json"])
    estimated = json.loads(printed.getvalue())["bytes"]["full"]["total"]
    print(f"ZeRO-3 x{processes}: estimated {estimated / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert 0.5 <= estimated / measured <= 2.0
