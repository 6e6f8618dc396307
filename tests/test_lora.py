"""LoRA through peft: one copy of the base, exact references, adapters saved, merged export."""

import json
import os

import pytest
import torch

pytest.importorskip("peft")

from dpokit.cli import main  # noqa: E402
from dpokit.config import ConfigError  # noqa: E402
from dpokit.train import train  # noqa: E402
from runs import LORA, read_rows, run_config, sft_adapter, train_rows  # noqa: E402


def test_lora_trains_adapters_only_and_saves_an_adapter(workdir, capsys):
    out = train(run_config(workdir, "lora", *LORA, "save_steps=2"))
    # r=4 on q_proj (32 -> 32) and v_proj (32 -> 2 kv heads x 8 = 16) of 2 layers: A is r x in, B out x r
    assert f"({2 * (4 * (32 + 32) + 4 * (32 + 16)):,} trainable" in capsys.readouterr().out
    rows = train_rows(out)
    assert rows[0]["rewards/margins"] == 0.0  # step 1: policy == reference (B = 0)
    assert rows[-1]["rewards/margins"] != 0.0
    for folder in (out / "final", out / "checkpoints" / "step-2"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= names
        assert "model.safetensors" not in names  # no copy of the base weights
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["lora_alpha"] == 8 and config["lora_dropout"] == 0.0  # scaling alpha / r = 2


def test_live_reference_is_the_policy_with_adapters_off_and_never_a_copy(workdir, no_second_model):
    cached = train_rows(train(run_config(workdir, "lora-table", *LORA, "max_steps=3")))
    live = train_rows(train(run_config(workdir, "lora-live", *LORA, "max_steps=3", "precompute_ref_log_probs=false")))
    for a, b in zip(cached, live, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_adapter_off_reference_equals_the_base_model(workdir):
    from transformers import AutoModelForCausalLM

    from dpokit.config import load_config
    from dpokit.data.batching import make_batch
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.logps import ReplyLogProbs
    from dpokit.modeling import load_policy
    from dpokit.reference import AdapterOffReference

    config = load_config(None, [f"model.name_or_path={workdir / 'model'}", "data.train=x.jsonl", *LORA])
    policy = load_policy(config.model)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)  # a trained adapter
    pairs = [TokenizedPair([1, 40, 41, 42], [50, 51, 2], [60, 2]), TokenizedPair([1, 43], [52, 2], [61, 62, 63, 2])]
    batch = make_batch(pairs, "prefix_packed")
    reference = AdapterOffReference(ReplyLogProbs(policy)).logps(batch, [0, 1])
    base = ReplyLogProbs(AutoModelForCausalLM.from_pretrained(workdir / "model").eval())(**batch.model_inputs())
    torch.testing.assert_close(reference, base.detach(), atol=1e-5, rtol=0)
    with torch.no_grad():
        adapted = ReplyLogProbs(policy)(**batch.model_inputs())
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter does change the policy


def test_starting_from_an_sft_adapter(workdir, tmp_path):
    adapter = sft_adapter(workdir, tmp_path / "sft")
    sft = ("use_peft=true", f"adapter_name_or_path={adapter}", "max_steps=2", "save_steps=1")
    out = train(run_config(workdir, "lora-from-sft", *sft))
    rows = train_rows(out)
    assert rows[0]["rewards/margins"] == 0.0  # the reference is base + the SFT adapter, as the policy starts
    base_only = train_rows(train(run_config(workdir, "lora-fresh", *LORA, "max_steps=1")))
    assert rows[0]["logps/chosen"] != pytest.approx(base_only[0]["logps/chosen"], abs=1e-3)  # it did start from the adapter
    with pytest.raises(ConfigError, match="keep precompute_ref_log_probs=true"):
        train(run_config(workdir, "lora-from-sft-live", "use_peft=true", f"adapter_name_or_path={adapter}",
                         "precompute_ref_log_probs=false"))
    # dpokit eval scores the run against the same reference, base + the SFT adapter
    main(["eval", str(out), "--output", str(tmp_path / "eval.json")])
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["reference"] == str(adapter)
    trained = [r for r in read_rows(out) if "eval/loss" in r][-1]
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
        assert report["metrics"][key] == pytest.approx(trained[key], abs=1e-5), key
    # resumed, the reference is still base + the SFT adapter (loaded again, not the base alone): step 2 repeats
    train(run_config(workdir, "lora-from-sft", *sft, f"resume_from_checkpoint={out / 'checkpoints' / 'step-1'}"))
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        assert train_rows(out)[1][key] == pytest.approx(rows[1][key], abs=1e-5), key


def test_lora_resume_continues_exactly(workdir):
    run_dir = train(run_config(workdir, "lora-resume", *LORA, "save_steps=2"))
    uninterrupted = train_rows(run_dir)
    train(run_config(workdir, "lora-resume", *LORA, "save_steps=2", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    for a, b in zip(uninterrupted, train_rows(run_dir), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_gradient_checkpointing_with_lora(workdir):
    plain = train_rows(train(run_config(workdir, "lora-gc-off", *LORA, "max_steps=2", "eval=null")))
    checkpointed = train_rows(train(run_config(workdir, "lora-gc-on", *LORA, "max_steps=2", "eval=null", "gradient_checkpointing=true")))
    for a, b in zip(plain, checkpointed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)


@pytest.mark.parametrize("targets, saved", [("q_proj,v_proj", None), ("q_proj,lm_head", None), ("q_proj,embed_tokens", None),
                                            ("q_proj,v_proj", "lm_head")])
def test_export_merge_gives_the_adapter_models_logits(workdir, tmp_path, capsys, targets, saved):
    """The tiny model ties its output layer to its input embeddings: an adapter on either is merged
    into an untied copy (merging into the shared weight changed both layers); an output layer trained
    whole (lora_modules_to_save) is a copy already, and stays apart from the embeddings."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = train(run_config(workdir, "lora-export", *LORA, f"lora_target_modules=[{targets}]", "learning_rate=1e-2",
                           "max_steps=2", "eval=null", *([f"lora_modules_to_save=[{saved}]"] if saved else [])))
    main(["export", str(out), "-o", str(tmp_path / "merged")])
    assert "wrote" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapter = AutoPeftModelForCausalLM.from_pretrained(str(out / "final")).eval()
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "final" / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"]).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        assert (adapter(ids).logits - base(ids).logits).abs().max() > 1e-3  # the adapter changed something
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-5, rtol=0)
    untied = targets != "q_proj,v_proj" or saved is not None
    assert merged.config.tie_word_embeddings is not untied
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) is not untied
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_qlora_and_8bit_adam_need_cuda_and_say_so_before_loading(workdir, monkeypatch, capsys):
    import dpokit.modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dpokit.modeling, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    for extra in ("load_in_4bit=true", "optim=adamw_8bit", "attn_implementation=flex_attention"):
        with pytest.raises(SystemExit):
            main(["train", f"model.name_or_path={workdir / 'model'}", f"data.train={workdir / 'train.jsonl'}",
                  *LORA, extra, f"output_dir={workdir / 'qlora'}"])
        assert "need a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="set use_peft=true"):
        run_config(workdir, "q", "load_in_4bit=true")


def test_only_the_bitsandbytes_options_need_bitsandbytes(workdir, monkeypatch):
    """On a CUDA machine without bitsandbytes, QLoRA is refused naming the package; flex_attention
    (torch's own) is not."""
    import sys

    from dpokit.modeling import check_device_requirements

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it fails
    check_device_requirements(run_config(workdir, "x", "attn_implementation=flex_attention").model, "adamw_torch", cuda=True)
    with pytest.raises(ConfigError, match="need the bitsandbytes package: pip install bitsandbytes"):
        check_device_requirements(run_config(workdir, "x", *LORA, "load_in_4bit=true").model, "adamw_torch", cuda=True)


@pytest.mark.parametrize("name", ["qwen2.5-1.5b-lora.yaml", "qlora-7b.yaml"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    from dpokit.config import load_config

    config = load_config(Path(__file__).parents[1] / "examples" / name)
    assert config.model.use_peft


def test_export_takes_the_runs_base_dtype_and_never_a_users_folder(workdir, tmp_path, monkeypatch, capsys):
    """A LoRA run trained from a relative model path is exported onto that base from any folder (the
    adapter named its base by the relative path: from another folder holding a ``model`` of its own, the
    merge went onto that one, silently); the written dtype is the run's (bfloat16 here; float32 was
    forced); a folder named OUT.tmp of the user's is left alone (it was deleted)."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dpokit.tiny import build_tiny_model

    monkeypatch.chdir(workdir)
    out = train(run_config(workdir, str(tmp_path / "rel"), *LORA, "model.name_or_path=model", "dtype=bfloat16",
                           "learning_rate=1e-2", "max_steps=2", "eval=null"))
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(workdir / "model")
    other = tmp_path / "elsewhere"
    build_tiny_model(other / "model", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, seed=7)
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "model"  # as an older dpokit wrote it
    (out / "final" / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(other)
    (other / "merged.tmp").mkdir()
    (other / "merged.tmp" / "notes.txt").write_text("mine")
    main(["export", str(out), "--output-dir", "merged"])
    assert (other / "merged.tmp" / "notes.txt").read_text() == "mine"
    umask = _umask()
    assert (other / "merged").stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp's 0700 opened as a mkdir's
    assert (other / "merged" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # safetensors' 0600
    assert {t.dtype for t in load_file(other / "merged" / "model.safetensors").values()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(other / "merged", dtype=torch.float32).eval()
    assert merged.config.use_cache
    shutil.rmtree(other / "model")
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    expected = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16)
    from peft import PeftModel

    expected = PeftModel.from_pretrained(expected, str(out / "final")).merge_and_unload().float().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected(ids).logits, atol=1e-3, rtol=0)


def test_a_tied_layer_trained_whole_is_said_plainly(tmp_path):
    """peft's warnings (other words in each release, none for some cases) name options and issue
    threads; dpokit says, on every release, what happens to the model, once."""
    import warnings

    from dpokit.config import ModelConfig
    from dpokit.modeling import load_policy
    from dpokit.tiny import build_tiny_model

    path = build_tiny_model(tmp_path / "tied", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    for targets, whole, said in ((["q_proj"], ["lm_head"], "the output layer (lora_modules_to_save)"),
                                 (["q_proj"], ["embed_tokens"], "the input embeddings (lora_modules_to_save)"),
                                 (["q_proj", "lm_head"], None, "the output layer (lora_target_modules)"),
                                 (["q_proj"], None, None)):
        config = ModelConfig(name_or_path=str(path), use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=targets,
                             lora_modules_to_save=whole)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = load_policy(config)
        notes = [str(w.message) for w in caught if "tie_word_embeddings" in str(w.message)]
        assert notes == ([] if said is None else [f"dpokit: the input embeddings and the output layer share one weight matrix "
                         f"(tie_word_embeddings), and the adapter changes {said} on its own: the two differ from the first "
                         "step, and a merged export keeps them apart (tie_word_embeddings=false)"]), (targets, whole)
        if whole:  # trained as a copy
            assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    # a model whose two layers are apart: nothing to say
    untied = build_tiny_model(tmp_path / "untied", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, tie_word_embeddings=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_policy(ModelConfig(name_or_path=str(untied), use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "lm_head"]))
    assert not [w for w in caught if "tie_word_embeddings" in str(w.message)]


def _umask() -> int:
    """The process's umask (read by setting it, then setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_export_of_a_full_model_writes_the_dtype_asked_for_beside_out(workdir, tmp_path, monkeypatch):
    """A full model (no adapter, no run) is copied as it is: in its checkpoint's own dtype (float32
    here) unless --dtype names another; into parent folders made as needed, through a folder beside
    OUT (so the rename stays on one filesystem), readable as the umask allows; the path returned is
    OUT, and the process's umask is as it was. A save that fails leaves nothing behind."""
    from pathlib import Path

    from safetensors.torch import load_file

    import dpokit.export
    from dpokit.export import export_model

    written_in, fail = [], []
    real = dpokit.export.load_model

    def load(*args, **kwargs):
        lm = real(*args, **kwargs)
        save = lm.save_pretrained

        def save_pretrained(path, **kw):
            written_in.append(Path(path).parent)
            if fail:
                raise OSError("No space left on device")
            return save(path, **kw)

        lm.save_pretrained = save_pretrained
        return lm

    monkeypatch.setattr(dpokit.export, "load_model", load)
    out = tmp_path / "a" / "b" / "plain"
    previous = os.umask(0o027)
    try:
        assert export_model(str(workdir / "model"), out, merge=False) == out
        assert _umask() == 0o027
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750 and (out / "model.safetensors").stat().st_mode & 0o777 == 0o640
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}
    assert written_in == [out.parent] and [p.name for p in out.parent.iterdir()] == ["plain"]  # no temp folder left
    half = tmp_path / "half"
    assert export_model(str(workdir / "model"), half, merge=True, dtype="bfloat16") == half
    assert {t.dtype for t in load_file(half / "model.safetensors").values()} == {torch.bfloat16}
    fail.append(True)
    with pytest.raises(OSError, match="No space left"):
        export_model(str(workdir / "model"), tmp_path / "full" / "out", merge=False)
    assert list((tmp_path / "full").iterdir()) == []
