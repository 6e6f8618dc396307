"""QLoRA and 8-bit AdamW, run through bitsandbytes' CPU backend.

Training refuses both on a machine without CUDA (``check_device_requirements``): bitsandbytes'
CPU kernels are slow, and its CPU inference path repacks 4-bit weights after an eval-mode
forward, which breaks the next training step (``fix_cpu_repacking`` below). These tests lift the
refusal to run everything of dpokit's own on the way: 4-bit nf4 loading, k-bit preparation, LoRA
over ``Linear4bit`` layers (fresh, or continuing an SFT adapter), the one-time model checks,
chunked log-probs, the adapters-off reference (precomputed or live), 16-bit loss scaling, saving
and ``export --merge``, the planner's 4-bit weight bytes, 8-bit optimizer state through a
checkpoint and resume. What they leave to ``tests/test_cuda.py`` is bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", minversion="0.50")  # its CPU backend runs 8-bit AdamW from 0.50
pytest.importorskip("peft")

import dpokit.modeling  # noqa: E402
import dpokit.train  # noqa: E402
from dpokit.config import ConfigError  # noqa: E402
from dpokit.train import train  # noqa: E402
from runs import LORA, make_workdir, run_config, sft_adapter, train_rows  # noqa: E402

QLORA = (*LORA, "load_in_4bit=true", "gradient_checkpointing=true")


@pytest.fixture(scope="module")
def wide_workdir(tmp_path_factory):
    """The end-to-end tiny model, 128 wide: bitsandbytes' CPU kernels quantize in 64-value blocks
    along a row, so every Linear needs at least 64 inputs."""
    return make_workdir(tmp_path_factory.mktemp("bnb"), hidden_size=128, intermediate_size=256)


@pytest.fixture
def on_cpu_anyway(monkeypatch):
    """Let training use bitsandbytes on the CPU: the requirement check sees a GPU."""
    check = dpokit.modeling.check_device_requirements
    monkeypatch.setattr(dpokit.train, "check_device_requirements", lambda model, optim, cuda: check(model, optim, True))


@pytest.fixture
def fix_cpu_repacking(monkeypatch):
    """bitsandbytes repacks a Linear4bit's weights for its AVX512-BF16 CPU kernel on the first
    eval-mode, no-grad forward, and that layout only does inference: the reference pass then breaks
    training. CUDA has no such path; on the CPU keep the portable kernel."""
    init = bnb.nn.Linear4bit.__init__

    def portable_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.support_avx512bf16_for_cpu = False

    monkeypatch.setattr(bnb.nn.Linear4bit, "__init__", portable_init)


@pytest.fixture
def loaded_policies(monkeypatch):
    """The policies training loads, kept for inspection."""
    policies = []

    def keep(*args, **kwargs):
        policies.append(load_policy(*args, **kwargs))
        return policies[-1]

    load_policy = dpokit.train.load_policy
    monkeypatch.setattr(dpokit.train, "load_policy", keep)
    return policies


def test_qlora_and_adamw_8bit_are_refused_on_a_cpu_before_loading(wide_workdir, loaded_policies):
    for option in ("load_in_4bit=true", "optim=adamw_8bit"):
        with pytest.raises(ConfigError, match="need a CUDA GPU"):
            train(run_config(wide_workdir, "refused", *LORA, option))
    assert not loaded_policies


@pytest.mark.parametrize("precision", [("dtype=bfloat16",), ("dtype=float16", "fp16=true")], ids=["bf16", "fp16"])
def test_qlora_trains_adapters_over_a_4bit_base(wide_workdir, on_cpu_anyway, fix_cpu_repacking, loaded_policies, precision):
    """Every decoder Linear is 4-bit nf4 with double quantization (the output layer stays 16-bit),
    only the adapters train, step 1's policy is the reference (the 4-bit base, adapters off), and
    the run leaves an adapter, not a base."""
    out = train(run_config(wide_workdir, f"qlora-{precision[0]}", *QLORA, *precision, "max_steps=4"))
    (policy,) = loaded_policies
    quantized = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    state = quantized[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantization
    compute = torch.float16 if "fp16=true" in precision else torch.bfloat16
    assert {m.compute_dtype for m in quantized} == {compute}
    assert not isinstance(policy.get_output_embeddings(), bnb.nn.Linear4bit)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == {
        n for n, _ in policy.named_parameters() if "lora_" in n}

    rows = train_rows(out)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert abs(rows[0]["rewards/margins"]) < 1e-4  # float16 batches round differently in the reference pass
    assert rows[-1]["rewards/margins"] > 1e-3
    names = {p.name for p in (out / "final").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= names
    assert "model.safetensors" not in names


def test_qlora_live_reference_switches_the_adapters_off(wide_workdir, on_cpu_anyway, fix_cpu_repacking, no_second_model):
    """``precompute_ref_log_probs=false``: the 4-bit policy scores the reference with its adapters
    off, loading no second model, and trains as with the precomputed table."""
    cached = train_rows(train(run_config(wide_workdir, "qlora-table", *QLORA, "dtype=bfloat16", "max_steps=3", "eval=null")))
    live = train_rows(train(run_config(wide_workdir, "qlora-live", *QLORA, "dtype=bfloat16", "max_steps=3", "eval=null",
                                       "precompute_ref_log_probs=false")))
    for a, b in zip(cached, live, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)


def test_qlora_continues_an_sft_adapter(wide_workdir, on_cpu_anyway, fix_cpu_repacking, tmp_path):
    """The policy is the 4-bit base + the SFT adapter (trainable), the reference the same, frozen."""
    adapter = sft_adapter(wide_workdir, tmp_path / "sft")
    rows = train_rows(train(run_config(wide_workdir, "qlora-from-sft", "use_peft=true", f"adapter_name_or_path={adapter}",
                                       "load_in_4bit=true", "dtype=bfloat16", "max_steps=3", "eval=null")))
    assert abs(rows[0]["rewards/margins"]) < 1e-4 and rows[-1]["rewards/margins"] > 1e-3
    fresh = train_rows(train(run_config(wide_workdir, "qlora-fresh", *QLORA, "dtype=bfloat16", "max_steps=1", "eval=null")))
    assert abs(rows[0]["logps/chosen"] - fresh[0]["logps/chosen"]) > 0.5  # it did start from the adapter (1.5 apart)


def test_qlora_run_exports_a_full_precision_merged_model(wide_workdir, on_cpu_anyway, fix_cpu_repacking, tmp_path):
    """``export --merge`` folds the adapter into the unquantized base (not the 4-bit one): a plain model
    with no quantization config, in the run's dtype by default, and with ``--dtype float32`` the logits
    of the float32 base with the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpokit.cli import main

    out = train(run_config(wide_workdir, "qlora-export", *QLORA, "dtype=bfloat16", "max_steps=2", "eval=null"))
    main(["export", str(out), "--merge", str(tmp_path / "as-trained")])
    config = json.loads((tmp_path / "as-trained" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    main(["export", str(out), "--merge", str(tmp_path / "merged"), "--dtype", "float32"])
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(wide_workdir / "model", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, out / "final").eval()  # wraps base in place
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-5, rtol=0)
        assert (with_adapter(ids).logits - base_logits).abs().max() > 1e-4  # the adapter did train


def test_adamw_8bit_keeps_8bit_state_and_resumes_exactly(wide_workdir, on_cpu_anyway, monkeypatch):
    """8-bit AdamW trains; its moments of the larger tensors are uint8 (bitsandbytes keeps tensors
    under 4096 values in 32-bit); a run resumed from a checkpoint repeats the uninterrupted one."""
    optimizers = []

    class Recorded(bnb.optim.AdamW8bit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(bnb.optim, "AdamW8bit", Recorded)
    run_dir = train(run_config(wide_workdir, "adamw-8bit", "optim=adamw_8bit", "save_steps=2"))
    uninterrupted = train_rows(run_dir)
    assert uninterrupted[-1]["rewards/margins"] > uninterrupted[0]["rewards/margins"]
    (optimizer,) = optimizers
    large = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if p.numel() >= 4096]
    assert large and all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in large)

    train(run_config(wide_workdir, "adamw-8bit", "optim=adamw_8bit", "save_steps=2",
                     f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    resumed = train_rows(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_plan_counts_4bit_weights_as_bitsandbytes_stores_them(tmp_path):
    """The planner's QLoRA weights (nf4 with double quantization for the Linear layers, 16-bit for
    the rest) against the bytes of every tensor a 4-bit model holds: packed weights, 8-bit block
    scales, their float32 scales and code books. The formula leaves out each layer's code books
    (16 + 256 float32 values: a few KiB in a model) and counts biases as quantized; with the code
    books added it is within 0.5% here, and the block scales alone are 1.6%."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dpokit.config import ModelConfig
    from dpokit.modeling import load_causal_lm
    from dpokit.plan import ADAPTER_BYTES, QLORA_COMPUTE_BYTES, RunShape, count_model, estimate

    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "model"), load_in_4bit=True))
    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert quantized == 2 * 7
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    shape = count_model(config)
    planned = estimate(shape, RunShape(batch_size=1, max_length=64))["qlora"]["weights"]
    planned -= shape.lora_params * ADAPTER_BYTES + shape.largest_linear * QLORA_COMPUTE_BYTES  # adapters, one dequantized weight
    planned += quantized * (16 + 256) * 4  # nf4's and the nested 8-bit quantization's code books
    print(f"planned {planned:.0f} B, stored {stored} B, ratio {planned / stored:.4f}")
    assert planned == pytest.approx(stored, rel=0.005)
