"""The architectures users bring, each as a tiny random model: reply log-probs equal the naive
computation (padded batch, full logits) in every batch layout (with dpokit's own mask for packed
rows where a model ignores their restarts); LoRA trains and merges on the ones with unusual linear
layers.
New transformers releases change models' attention and mask code; this is where such a change
would show."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from dpokit.config import ConfigError
from dpokit.data.batching import LAYOUTS, make_batch
from dpokit.logps import ReplyLogProbs, check_rows_kept_apart
from runs import TRANSFORMERS_4
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
FALCON_READS_RESTARTS = Version(transformers.__version__) >= Version("5.24")
"""Whether Falcon's causal mask is built from the position ids (from transformers 5.24), and so keeps packed rows apart."""


def tiny_model(model_type: str, **overrides):
    """A float32 random model of ``model_type`` (seed 0) in eval mode, with its test attention;
    ``overrides`` replace config settings (None included)."""
    settings = {k: v for k, v in {**COMMON, **ARCHITECTURES[model_type]}.items() if v is not None} | overrides
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).float().eval()
    model.config._attn_implementation = ATTENTION.get(model_type, "sdpa")
    return model


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_architecture_is_exact_in_every_layout(model_type):
    """Every layout gives the naive log-probs through the chunked path. Before transformers 5.24
    Falcon builds its causal mask without the position ids and ignores where packed sequences
    restart (on transformers 4.x, so do Qwen2-MoE and StableLM): the check finds it, and dpokit
    masks their packed rows itself; the mask is needed (the check is never needlessly strict) and
    not given to the models that do not need it (Falcon from 5.24)."""
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers release has no {model_type}")
    model, pairs = tiny_model(model_type), ragged_pairs(seed=1)
    naive = naive_logps(model, pairs)
    assert ReplyLogProbs(model).chunked, f"{model_type}: dpokit does not reproduce its output layer"
    masked = set()
    for layout in LAYOUTS:
        mask_packed_rows = check_rows_kept_apart(model, layout)
        inputs = make_batch(pairs, layout).model_inputs()
        scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=mask_packed_rows)
        error = (scorer(**inputs) - naive).abs().max().item()
        assert error < 1e-4, f"{model_type} {layout}: off by {error:.3g}"
        if mask_packed_rows:
            masked.add(layout)
            unmasked = ReplyLogProbs(model, chunk_size=7)(**inputs)
            assert (unmasked - naive).abs().max() > 1e-3, f"{model_type} {layout}: masked, yet exact without"
    expected = {"packed"} if model_type == "falcon" and not FALCON_READS_RESTARTS else set()
    if TRANSFORMERS_4 and model_type in ("qwen2_moe", "stablelm"):
        expected = masked & {"packed"}  # some 4.x releases keep their packed rows apart, some do not
    assert masked == expected


DROPS_ROWS = "does not (pass|take) dpokit's regrouped rows"
VARLEN_REFUSED = {  # model_type -> why dpokit_varlen cannot run it (the check says so before training)
    "falcon": DROPS_ROWS,  # their forwards do not hand extra arguments on to transformers' attention
    "stablelm": DROPS_ROWS,
    **({"qwen2_moe": DROPS_ROWS} if TRANSFORMERS_4 else {}),
    "gemma2": "cannot soft-cap attention scores",
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_architecture_is_exact_under_dpokit_varlen_or_refused(model_type):
    """dpokit_varlen (rows regrouped for a varlen kernel; here its exact CPU loop) gives the naive
    log-probs in both multi-sequence layouts, or the check refuses the model with the reason."""
    from dpokit.config import VARLEN_ATTENTION
    from dpokit.varlen import register_varlen_attention

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers release has no {model_type}")
    register_varlen_attention()
    model, pairs = tiny_model(model_type), ragged_pairs(seed=1)
    naive = naive_logps(model, pairs)
    model.config._attn_implementation = VARLEN_ATTENTION
    for layout in ("packed", "prefix_packed"):
        if model_type in VARLEN_REFUSED:
            with pytest.raises(ConfigError, match=VARLEN_REFUSED[model_type]):
                check_rows_kept_apart(model, layout)
            continue
        scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=check_rows_kept_apart(model, layout))
        error = (scorer(**make_batch(pairs, layout).model_inputs()) - naive).abs().max().item()
        assert error < 1e-4, f"{model_type} {layout}: off by {error:.3g}"


def save_tiny_model(model_type: str, workdir, tmp_path, **overrides):
    """``tiny_model(model_type, **overrides)`` sized to the workdir's tokenizer, saved with it; returns the folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    tiny_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **overrides).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_falcon_trains_packed_rows_with_dpokits_mask(workdir, tmp_path):
    """End to end: Falcon with packed rows and no prefix sharing trains step for step as in the
    padded layout: through dpokit's own block-diagonal mask before transformers 5.24, through
    its own mask from 5.24 (which reads where the sequences restart)."""
    from dpokit.train import train
    from runs import run_config, train_rows

    model_dir = save_tiny_model("falcon", workdir, tmp_path)
    runs = {padding_free: train_rows(train(run_config(
        workdir, f"falcon-packed-{padding_free}", f"model.name_or_path={model_dir}", "max_steps=3", "prefix_sharing=false",
        f"padding_free={str(padding_free).lower()}", "precompute_ref_log_probs=false")))
        for padding_free in (True, False)}
    for packed, padded in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), key


def test_gemma3_trains_prefix_shared_rows_within_its_sliding_window(workdir, tmp_path):
    """End to end: Gemma 3 with a sliding window shorter than max_length trains on prefix-shared rows
    (the default layout; dpokit's masks keep the window, one per layer type) step for step as in the
    padded layout with the model's own masks."""
    from dpokit.train import train
    from runs import run_config, train_rows

    model_dir = save_tiny_model("gemma3_text", workdir, tmp_path, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"])
    runs = {shared: train_rows(train(run_config(
        workdir, f"gemma3-window-{shared}", f"model.name_or_path={model_dir}", "max_steps=3", "precompute_ref_log_probs=false",
        *([] if shared else ["prefix_sharing=false", "padding_free=false"]))))
        for shared in (True, False)}
    for shared, padded in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert shared[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-5), key


MULTIMODAL_TEXT = dict(COMMON, **HEAD_DIM, sliding_window=5, layer_types=["sliding_attention", "full_attention"])
MULTIMODAL_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)


@pytest.mark.parametrize("model_type", ["gemma3", "gemma4"])
def test_image_text_checkpoints_train_on_text_exactly(model_type):
    """Gemma 3 from 4B up and Gemma 4 ship as image-text checkpoints: AutoModelForCausalLM gives their
    ...ForConditionalGeneration model, whose vocabulary, sliding window and logit soft cap live in
    ``config.text_config`` (the probes read ``config.vocab_size`` and failed). Text pairs score through its
    language model in every layout, the window (5 tokens here) kept in the prefix-shared rows' masks,
    to 1e-4 of the naive log-probs."""
    from dpokit.logps import check_window

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers release has no {model_type}")
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, text_config=MULTIMODAL_TEXT, vision_config=MULTIMODAL_VISION)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.config._attn_implementation = "sdpa"
    assert "ConditionalGeneration" in type(model).__name__
    pairs = ragged_pairs(seed=1)
    naive = naive_logps(model, pairs)
    for layout in LAYOUTS:
        mask_packed_rows = check_rows_kept_apart(model, layout)
        windows = check_window(model, layout, mask_packed_rows, max_length=64)
        assert windows == ({"full_attention": None, "sliding_attention": 5} if layout.startswith("prefix") else None)
        scorer = ReplyLogProbs(model, chunk_size=7, mask_packed_rows=mask_packed_rows, windows=windows)
        assert scorer.chunked
        error = (scorer(**make_batch(pairs, layout).model_inputs()) - naive).abs().max().item()
        assert error < 1e-4, f"{model_type} {layout}: off by {error:.3g}"


def save_image_text_model(workdir, tmp_path):
    """A tiny Gemma 3 image-text model sized to the workdir's tokenizer, saved with it; returns the folder."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    vocab = len(tokenizer) + 3  # and the image markers
    text = dict(MULTIMODAL_TEXT, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None, sliding_window=16)
    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=MULTIMODAL_VISION, mm_tokens_per_image=4,
                                  boi_token_index=vocab - 3, eoi_token_index=vocab - 2, image_token_index=vocab - 1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "image-text")
    tokenizer.save_pretrained(tmp_path / "image-text")
    return tmp_path / "image-text"


def test_an_image_text_model_trains_its_language_model_only(workdir, tmp_path):
    """On text pairs the vision tower and projector never run: full training freezes them, and LoRA
    (all-linear, or named modules the vision tower shares) adapts the language model only. Left
    trainable, two DDP processes failed at the second step waiting for their gradients; here two
    gloo processes train to the end."""
    from dpokit.config import load_config
    from dpokit.modeling import load_policy
    from runs import accelerate_launch, run_args, train_rows

    model_dir = save_image_text_model(workdir, tmp_path)
    policy = load_policy(load_config(None, run_args(workdir, "unused", f"model.name_or_path={model_dir}")).model)
    trained = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("model.language_model.", "lm_head.")) for name in trained)
    assert any(name.startswith("model.vision_tower.") for name, _ in policy.named_parameters())
    for targets in ("all-linear", "[q_proj,out_proj,lm_head]"):
        lora = load_policy(load_config(None, run_args(workdir, "unused", f"model.name_or_path={model_dir}", "use_peft=true",
                                              f"lora_target_modules={targets}")).model)
        adapted = {name.split(".lora_")[0] for name, p in lora.named_parameters() if p.requires_grad}
        assert adapted and all(".language_model." in name or name.endswith(".lm_head") for name in adapted), targets
        assert any(name.endswith("q_proj") for name in adapted)
        assert (len([name for name in adapted if name.endswith("lm_head")]) == 1) == ("lm_head" in targets)
    with pytest.raises(ConfigError, match="LoRA target modules"):  # out_proj is the vision tower's only
        load_policy(load_config(None, run_args(workdir, "unused", f"model.name_or_path={model_dir}", "use_peft=true", "lora_target_modules=[out_proj]")).model)
    out = tmp_path / "ddp"
    result = accelerate_launch("-m", "dpokit", "train", *run_args(workdir, "unused", f"model.name_or_path={model_dir}",
                                                         "per_device_train_batch_size=2", "max_steps=3", f"output_dir={out}"),
                      timeout=300)
    assert [row["step"] for row in train_rows(out)] == [1, 2, 3]
    assert "an image-text model: its language model only, the vision parts frozen" in result.stdout


def test_dropout_is_off_in_causal_and_image_text_models():
    """DPO scores the policy and reference alike, so dropout is switched off: in nn.Dropout modules, in
    attention layers that copied the rate, and in the configs (an image-text model's text_config too),
    so that two training-mode forwards agree."""
    from dpokit.modeling import disable_dropout, text_config

    torch.manual_seed(0)
    image_text = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma3", text_config=dict(MULTIMODAL_TEXT, attention_dropout=0.5), vision_config=MULTIMODAL_VISION))
    for model in (tiny_model("qwen2", attention_dropout=0.5), tiny_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5),
                  image_text.float()):
        model.train()
        ids = torch.arange(1, 9)[None]
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        disable_dropout(model)
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        config = text_config(model.config)
        assert all(getattr(config, name, 0.0) == 0.0 for name in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"))


@pytest.mark.parametrize("model_type", ["gpt2", "falcon", "phi3", "gemma2", "mixtral"])
def test_lora_trains_and_merges_on_unusual_layers(workdir, tmp_path, model_type):
    """End to end on architectures whose linear layers are not Llama's: GPT-2's Conv1D (weights
    stored transposed), Falcon's fused query_key_value, Phi-3's fused qkv_proj and gate_up_proj,
    Gemma 2's soft-capped eager attention, Mixtral's experts (fused parameters on transformers 5,
    which peft adapts without dropout: the default lora_dropout is refused naming the fix). LoRA on
    all-linear trains, and the merged export gives the adapter model's logits."""
    from peft import AutoPeftModelForCausalLM

    from dpokit.export import export_model
    from dpokit.train import train
    from runs import run_config, train_rows

    model_dir = save_tiny_model(model_type, workdir, tmp_path)
    attn = ATTENTION.get(model_type, "sdpa")
    if model_type == "mixtral" and not TRANSFORMERS_4:
        with pytest.raises(ConfigError, match=r"lora_dropout != 0.*\(set model.lora_dropout: 0\)"):
            train(run_config(workdir, "arch-lora-mixtral-dropout", f"model.name_or_path={model_dir}", "max_steps=1",
                             "use_peft=true", "lora_dropout=0.05"))
    out = train(run_config(workdir, f"arch-lora-{model_type}", f"model.name_or_path={model_dir}",
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


def test_loaded_policies_and_references_score_without_dropout(tmp_path):
    """A model saved with dropout on is loaded with it off, as the policy and as a reference loaded
    again: two training-mode forwards agree (with dropout they differ, see above)."""
    from dpokit.config import load_config
    from dpokit.modeling import load_policy, load_reference

    tiny_model("qwen2", attention_dropout=0.5).save_pretrained(tmp_path / "dropout")
    config = load_config(None, [f"model.name_or_path={tmp_path / 'dropout'}", "data.train=x.jsonl"]).model
    ids = torch.arange(1, 9)[None]
    for model in (load_policy(config), load_reference(config)):
        model.train()
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos(tmp_path, chat_tokenizer):
    """Llama-style tokenizers name no pad token: batches are padded with the end-of-sequence token."""
    from transformers import AutoTokenizer

    from dpokit.config import ModelConfig
    from dpokit.modeling import load_tokenizer

    chat_tokenizer.save_pretrained(tmp_path / "saved")
    unpadded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    unpadded.pad_token = None
    unpadded.save_pretrained(tmp_path / "no-pad")
    assert AutoTokenizer.from_pretrained(tmp_path / "no-pad").pad_token_id is None
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "no-pad")))
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == chat_tokenizer.eos_token_id
