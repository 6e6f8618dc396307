"""The architectures users bring, each as a tiny random model: reply log-probs equal the naive
computation (padded batch, full logits) in every batch layout, or the layout is refused with a
clear message before training; LoRA trains and merges on the ones with unusual linear layers.
New transformers releases change models' attention and mask code; this is where such a change
would show."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from dpokit.config import ConfigError
from dpokit.data.batching import LAYOUTS, make_batch
from dpokit.logps import ReplyLogProbs, check_rows_kept_apart
from test_logps import VOCAB, naive_logps, ragged_pairs

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
HEAD_DIM = dict(head_dim=8)
ARCHITECTURES = {  # model_type -> config settings beyond COMMON
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": HEAD_DIM, "gemma": HEAD_DIM, "gemma3_text": HEAD_DIM,
    "gemma2": HEAD_DIM, "phi": {}, "phi3": {}, "olmo": {}, "olmo2": {}, "starcoder2": {}, "stablelm": {}, "granite": {}, "cohere": {},
    "glm": {}, "smollm3": {}, "exaone4": {}, "seed_oss": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(HEAD_DIM, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "gpt_neox": dict(num_key_value_heads=None),
    "gpt2": {},  # its config maps the common names onto n_embd, n_layer, n_head, n_positions
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2),
}
ATTENTION = {"gemma2": "eager"}  # soft-capped attention: not sdpa
# Falcon's attention builds its own causal mask and ignores where packed sequences restart: its
# packed rows are refused (prefix sharing, dpokit's own mask, works).
TRANSFORMERS_4 = transformers.__version__.startswith("4.")


def tiny_model(model_type: str, **overrides):
    """A float32 random model of ``model_type`` (seed 0) in eval mode, with its test attention;
    ``overrides`` replace config settings (None included)."""
    settings = {k: v for k, v in {**COMMON, **ARCHITECTURES[model_type]}.items() if v is not None} | overrides
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).float().eval()
    model.config._attn_implementation = ATTENTION.get(model_type, "sdpa")
    return model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_architecture_is_exact_in_every_layout_or_refused(model_type):
    """Accepted layouts give the naive log-probs through the chunked path; a refused one would not
    have (the check is never needlessly strict). Only the known cases are refused: transformers 4.x
    also refuses packed rows for a few models its older mask code does not pack (Qwen2-MoE, StableLM)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers release has no {model_type}")
    model, pairs = tiny_model(model_type), ragged_pairs(seed=1)
    naive = naive_logps(model, pairs)
    scorer = ReplyLogProbs(model, chunk_size=7)
    assert scorer.chunked, f"{model_type}: dpokit does not reproduce its output layer"
    refused = set()
    for layout in LAYOUTS:
        error = (scorer(**make_batch(pairs, layout).model_inputs()) - naive).abs().max().item()
        try:
            check_rows_kept_apart(model, layout)
        except ConfigError as e:
            assert "attend to each other" in str(e) or "ignores dpokit's attention mask" in str(e)
            assert error > 1e-3, f"{model_type} {layout}: refused, yet exact"
            refused.add(layout)
            continue
        assert error < 1e-4, f"{model_type} {layout}: accepted, yet off by {error:.3g}"
    expected = {"packed"} if model_type == "falcon" else set()
    if TRANSFORMERS_4 and model_type in ("qwen2_moe", "stablelm"):
        expected = refused & {"packed"}
    assert refused == expected


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "phi3", "gemma2"])
def test_lora_trains_and_merges_on_unusual_layers(workdir, tmp_path, model_type):
    """End to end on architectures whose linear layers are not Llama's: GPT-2's Conv1D (weights
    stored transposed), Falcon's fused query_key_value, Phi-3's fused qkv_proj and gate_up_proj,
    Gemma 2's soft-capped eager attention. LoRA on all-linear trains, and the merged export gives
    the adapter model's logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from dpokit.export import export_model
    from dpokit.train import train
    from runs import run_config, train_rows

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tiny_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=None).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    attn = ATTENTION.get(model_type, "sdpa")
    out = train(run_config(workdir, f"arch-lora-{model_type}", f"model.name_or_path={tmp_path / 'model'}",
                           f"attn_implementation={attn}", "max_steps=2", "use_peft=true", "lora_r=4", "lora_alpha=8",
                           "lora_dropout=0.0", "lora_target_modules=[all-linear]"))
    rows = train_rows(out)
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and rows[-1]["loss"] < rows[0]["loss"]
    merged = AutoModelForCausalLM.from_pretrained(export_model(str(out), tmp_path / "merged", merge=True),
                                                  attn_implementation=attn).eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out / "final"), attn_implementation=attn).eval()
    ids = torch.tensor([[5, 9, 30, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
