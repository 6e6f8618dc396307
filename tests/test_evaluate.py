"""``dpokit eval`` and the MODEL argument: same numbers as training, defaults from the run, errors."""

import json
import shutil
import sys

import pytest

from dpokit.cli import main
from dpokit.config import ConfigError
from dpokit.resolve import default_reference, resolve_model
from runs import read_rows
from trained import trained_run

EXTRA_KEYS = {"eval/logps/accuracies", "eval/ref_logps/chosen", "eval/ref_logps/rejected", "eval/ref_logps/accuracies"}


def _last_eval_row(run_dir):
    return [r for r in read_rows(run_dir) if "eval/loss" in r][-1]


def _assert_same_as_training(metrics: dict, row: dict) -> None:
    eval_keys = [k for k in row if k.startswith("eval/") and k != "eval/seconds"]  # the time is training's own
    assert len(eval_keys) >= 7
    for key in eval_keys:
        assert metrics[key] == pytest.approx(row[key], abs=1e-6), key


def test_eval_of_a_run_equals_its_training_eval_metrics(workdir, capsys):
    run = trained_run(workdir)
    main(["eval", str(run)])
    report = json.loads((run / "eval.json").read_text())
    _assert_same_as_training(report["metrics"], _last_eval_row(run))
    assert EXTRA_KEYS <= set(report["metrics"])
    assert report["pairs"] == 12 and report["model"] == str(run / "final")
    assert report["reference"] == str(workdir / "model")  # the run's starting policy
    out = capsys.readouterr().out
    for name in ("reward accuracy", "reward margin", "log-prob chosen", "log-prob accuracy", "12 pairs"):
        assert name in out


def test_eval_of_a_bfloat16_lora_run_equals_its_training_eval_metrics(workdir):
    """A LoRA run on a bfloat16 base is evaluated with its float32 adapters beside the base, as it
    trained: merged into the bfloat16 weights (as export does) the adapter was rounded away and the
    eval disagreed with the run's own (accuracy 0.5 against 0.625)."""
    pytest.importorskip("peft")
    from runs import LORA

    run = trained_run(workdir, "lora-bf16", *LORA, "dtype=bfloat16", "learning_rate=1e-2")
    main(["eval", str(run)])
    row = _last_eval_row(run)
    assert row["eval/rewards/margins"] != 0  # the adapter moved the model
    _assert_same_as_training(json.loads((run / "eval.json").read_text())["metrics"], row)


def test_eval_split_off_train_and_reference_free_loss(workdir):
    """eval_fraction split (same seed as training) and a SimPO run, which trained without a reference."""
    run = trained_run(workdir, "use-simpo", "data.eval=null", "eval_fraction=0.25", "loss_type=[simpo]")
    main(["eval", str(run), "--output", str(run / "mine.json")])
    metrics = json.loads((run / "mine.json").read_text())["metrics"]
    _assert_same_as_training(metrics, _last_eval_row(run))
    assert EXTRA_KEYS <= set(metrics)


def test_reference_alone_and_policy_equal_reference(workdir, tmp_path):
    model = str(workdir / "model")
    out = tmp_path / "self.json"
    main(["eval", model, "--reference", model, "--data", str(workdir / "eval.jsonl"), "--max-pairs", "5",
          "--batch-size", "2", "--output", str(out)])
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert report["pairs"] == 5
    assert m["eval/rewards/margins"] == 0 and m["eval/rewards/accuracies"] == 0  # β(log π − log ref) ≡ 0
    for key in ("chosen", "rejected", "accuracies"):
        assert m[f"eval/logps/{key}"] == pytest.approx(m[f"eval/ref_logps/{key}"], abs=1e-6)


def test_eval_of_a_checkpoint_writes_beside_the_final_eval(workdir):
    run = trained_run(workdir)
    main(["eval", str(run / "checkpoints" / "step-2"), "--max-pairs", "3"])
    report = json.loads((run / "eval-step-2.json").read_text())
    assert report["model"] == str(run / "checkpoints" / "step-2") and report["pairs"] == 3


def _exit_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dpokit: error: ") and "Traceback" not in err
    return err


def test_plain_model_needs_reference_and_data(workdir, capsys):
    model = str(workdir / "model")
    assert "--reference" in _exit_message(["eval", model, "--data", str(workdir / "eval.jsonl")], capsys)
    assert "--data" in _exit_message(["eval", model, "--reference", model], capsys)


def test_paths_that_cannot_be_written_are_refused_before_loading(workdir, tmp_path, capsys):
    """eval --output naming a folder, export --merge and compare --output-dir naming a file: one line saying what to give."""
    model = str(workdir / "model")
    err = _exit_message(["eval", model, "--reference", model, "--data", str(workdir / "eval.jsonl"), "--output", str(tmp_path)], capsys)
    assert f"--output {tmp_path} is a folder: give the JSON file to write" in err
    (tmp_path / "afile").write_text("")
    assert "afile is a file, not a folder" in _exit_message(["export", model, "--merge", str(tmp_path / "afile")], capsys)
    assert "afile is a file, not a folder" in _exit_message(["compare", model, "--reference", model, "--from-data", str(workdir / "eval.jsonl"), "--output-dir", str(tmp_path / "afile")], capsys)


def test_lora_adapter_without_peft_says_how_to_install(workdir, tmp_path, capsys, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(workdir / "model")}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (workdir / "model" / name).exists():
            shutil.copy(workdir / "model" / name, adapter / name)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    resolved = resolve_model(str(adapter))
    assert resolved.is_adapter and default_reference(resolved).path == str(workdir / "model")
    err = _exit_message(["eval", str(adapter), "--data", str(workdir / "eval.jsonl")], capsys)
    assert "pip install peft" in err and str(adapter) in err


def test_resolve_model_forms(workdir, tmp_path):
    run = trained_run(workdir)
    by_run = resolve_model(str(run))
    assert by_run.path == str(run / "final") and by_run.label == "final" and by_run.run_dir == run
    step = resolve_model(str(run / "checkpoints" / "step-2"))
    assert step.run_dir == run and step.file_suffix == "-step-2" and step.run_config is not None
    assert resolve_model(str(run / "final")).run_dir == run
    plain = resolve_model(str(workdir / "model"))
    assert plain.run_dir is None and default_reference(plain) is None
    assert resolve_model("some-org/some-model").path == "some-org/some-model"  # a hub id passes through

    partial = tmp_path / "partial"  # a run with a checkpoint but no final/ yet
    partial.mkdir()
    shutil.copy(run / "config.yaml", partial / "config.yaml")
    shutil.copytree(run / "checkpoints", partial / "checkpoints")
    assert resolve_model(str(partial)).label == "step-4"  # the newest (the last step is saved too)
    shutil.rmtree(partial / "checkpoints")
    with pytest.raises(ConfigError, match="no final/ and no checkpoints"):
        resolve_model(str(partial))
    with pytest.raises(ConfigError, match="not a model"):
        resolve_model(str(tmp_path))


def test_hub_revisions_and_a_models_own_config_yaml(tmp_path):
    """A hub MODEL keeps its revision, and a run's reference its ref_revision (or, for a run that
    started from an adapter, is that adapter); a model folder that happens to hold a config.yaml
    (another tool's) is a model, not a run."""
    from dpokit.config import Config, ModelConfig
    from dpokit.resolve import ResolvedModel, model_config

    hub = resolve_model("some-org/some-model", "v2")
    assert (hub.path, hub.revision, hub.run_dir) == ("some-org/some-model", "v2", None)
    with pytest.raises(ConfigError, match=r"--dtype must be one of \[.*'bfloat16'.*\], got 'float64'"):
        model_config(hub, "float64")
    run = Config(model=ModelConfig(name_or_path="org/base", revision="b1", ref_model_name_or_path="org/ref", ref_revision="r1"))
    reference = default_reference(ResolvedModel("unused", tmp_path, run, "final"))
    assert (reference.path, reference.revision) == ("org/ref", "r1")
    run.model.ref_model_name_or_path = run.model.ref_revision = None
    reference = default_reference(ResolvedModel("unused", tmp_path, run, "final"))  # the starting policy
    assert (reference.path, reference.revision) == ("org/base", "b1")
    adapter = tmp_path / "sft-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    for use_peft in (True, False):  # adapter_name_or_path alone trains that adapter too
        run.model.use_peft, run.model.adapter_name_or_path = use_peft, str(adapter)
        reference = default_reference(ResolvedModel("unused", tmp_path, run, "final"))
        assert reference.path == str(adapter) and reference.load_settings == run.model  # base + the starting adapter
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "config.yaml").write_text("unrelated: true\n")
    resolved = resolve_model(str(model))
    assert (resolved.path, resolved.run_dir, resolved.run_config) == (str(model), None, None)


def test_an_adapter_folders_own_tokenizer_wins_over_its_bases(workdir, tmp_path, chat_tokenizer):
    from dpokit.resolve import load_model_tokenizer, model_config

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(workdir / "model")}))
    resolved = resolve_model(str(adapter))
    base = load_model_tokenizer(resolved, model_config(resolved)).get_vocab()  # no tokenizer of its own: the base's
    chat_tokenizer.save_pretrained(str(adapter))  # one saved with the adapter (added tokens, say)
    own = load_model_tokenizer(resolved, model_config(resolved)).get_vocab()
    assert own == chat_tokenizer.get_vocab() != base


def test_reports_name_a_builtin_model_by_its_name_and_others_by_their_path():
    from dpokit.resolve import ResolvedModel

    assert ResolvedModel("/cache/builtin/tiny-qwen2", given="builtin:tiny-qwen2").shown == "builtin:tiny-qwen2"
    assert ResolvedModel("/home/u/models/m", given="models/m").shown == "/home/u/models/m"
    assert ResolvedModel("/home/u/models/m", given="models/m").name == "models/m"


def _lora_adapter(workdir, folder):
    """A LoRA adapter on the tiny model with non-zero weights (so it changes the model), saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload()


def test_lora_adapter_is_evaluated_as_base_plus_adapter(workdir, tmp_path):
    pytest.importorskip("peft")
    import torch

    from dpokit.data.batching import make_batch
    from dpokit.data.formats import to_pairs
    from dpokit.data.sources import load_rows
    from dpokit.config import DataSource
    from dpokit.data.tokenize import tokenize_pairs
    from dpokit.logps import ReplyLogProbs
    from transformers import AutoTokenizer

    merged = _lora_adapter(workdir, tmp_path / "adapter")
    out = tmp_path / "lora.json"
    main(["eval", str(tmp_path / "adapter"), "--data", str(workdir / "eval.jsonl"), "--max-pairs", "4",
          "--output", str(out)])
    report = json.loads(out.read_text())
    assert report["reference"] == str(workdir / "model")  # an adapter's default reference is its base
    # the policy log-probs are the merged model's
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    pairs, _ = to_pairs(load_rows(DataSource(path=str(workdir / "eval.jsonl"))), "eval")
    tokenized, _ = tokenize_pairs(pairs[:4], tokenizer, max_length=1024, truncation="truncate")
    with torch.no_grad():
        logps = ReplyLogProbs(merged.eval())(**make_batch(tokenized, "padded").model_inputs())
    assert report["metrics"]["eval/logps/chosen"] == pytest.approx(logps[0::2].mean().item(), abs=1e-4)
    assert report["metrics"]["eval/rewards/margins"] != 0  # the adapter changed the model


def test_compare_and_chat_accept_a_lora_adapter(workdir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("peft")
    import io

    _lora_adapter(workdir, tmp_path / "adapter")
    main(["compare", str(tmp_path / "adapter"), "--from-data", str(workdir / "eval.jsonl"), "--n", "2",
          "--max-new-tokens", "4", "--output-dir", str(tmp_path / "cmp")])
    rows = [json.loads(line) for line in (tmp_path / "cmp" / "compare.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\n"))
    main(["chat", str(tmp_path / "adapter"), "--max-new-tokens", "4"])
    assert capsys.readouterr().out


def test_eval_on_two_processes_equals_one_and_writes_once(workdir, tmp_path):
    """``accelerate launch`` with 2 (gloo CPU) processes: the pairs are split between them, the
    gathered metrics equal one process's, and only the main process writes and prints."""
    from runs import accelerate_launch

    run = trained_run(workdir)
    main(["eval", str(run), "--output", str(tmp_path / "one.json")])
    result = accelerate_launch("-m", "dpokit", "eval", str(run), "--batch-size", "4", "--output", str(tmp_path / "two.json"),
                               timeout=300)
    assert result.stdout.count("wrote ") == 1 and result.stdout.count("reward accuracy") == 1
    assert result.stdout.count("data: ") == 1
    one = json.loads((tmp_path / "one.json").read_text())["metrics"]
    two = json.loads((tmp_path / "two.json").read_text())["metrics"]
    assert one.keys() == two.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


def test_use_commands_load_as_the_run_did_minus_training_only_settings(workdir, monkeypatch):
    """The run's reference loads with the run's settings; 4-bit loading and, without CUDA, GPU
    attention kernels are left behind (an adapter merges into unquantized weights; sdpa computes
    the same numbers on a CPU)."""
    import dataclasses

    from dpokit.resolve import ResolvedModel, model_config
    from runs import run_config

    config = run_config(workdir, "unused", "attn_implementation=eager", "trust_remote_code=true")
    policy = ResolvedModel(str(workdir / "model"), workdir, config, "final")
    reference = default_reference(policy)
    assert reference.path == str(workdir / "model") and reference.run_config is None
    loaded = model_config(reference, "bfloat16")
    assert (loaded.attn_implementation, loaded.trust_remote_code, loaded.dtype) == ("eager", True, "bfloat16")

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for attn in ("flash_attention_2", "flex_attention"):
        gpu_run = dataclasses.replace(config, model=dataclasses.replace(config.model, attn_implementation=attn, load_in_4bit=True))
        for model in (dataclasses.replace(policy, run_config=gpu_run), default_reference(dataclasses.replace(policy, run_config=gpu_run))):
            loaded = model_config(model)
            assert loaded.load_in_4bit is False
            assert loaded.attn_implementation == "sdpa"  # on a machine without CUDA


def test_data_flag_is_scored_whole_with_the_command_line_settings(tmp_path):
    """--data replaces the run's datasets and is scored whole (no eval_fraction split taken off it);
    --beta, --max-length and --batch-size override the run's; the run's own config is left as it was."""
    import dataclasses

    from dpokit.config import Config, DataSource
    from dpokit.evaluate import eval_config
    from dpokit.resolve import ResolvedModel

    base = Config()
    run_config = dataclasses.replace(base, data=dataclasses.replace(base.data, train=DataSource(path="run-train.jsonl"),
                                                                    eval=DataSource(path="run-eval.jsonl"), eval_fraction=0.25,
                                                                    max_length=512))
    model = ResolvedModel("org/policy", tmp_path, run_config, "final")
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    config = eval_config(model, str(data), "train", batch_size=3, max_length=64, beta=0.5)
    assert config.data.train == DataSource(path=str(data), split="train")
    assert config.data.eval is None and config.data.eval_fraction == 0.0
    assert config.data.max_length == 64 and config.training.per_device_eval_batch_size == 3 and config.loss.beta == 0.5
    assert (run_config.data.eval_fraction, run_config.data.max_length, run_config.loss.beta) == (0.25, 512, base.loss.beta)
    assert run_config.training.per_device_eval_batch_size == base.training.per_device_eval_batch_size
    kept = eval_config(model, None, "train", None, None, None)  # nothing given: the run's own
    assert kept.data == run_config.data and kept.loss.beta == base.loss.beta
    assert kept.training.per_device_eval_batch_size == base.training.per_device_eval_batch_size


def test_a_reference_with_another_tokenizer_is_refused_before_any_model_loads(workdir, tmp_path, monkeypatch):
    """DPO compares log-probs of the same token ids: a reference whose vocabulary differs is refused."""
    import re

    import dpokit.evaluate
    from transformers import AutoTokenizer

    reference = tmp_path / "other-vocab"
    shutil.copytree(workdir / "model", reference)
    tokenizer = AutoTokenizer.from_pretrained(reference)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(reference)

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(dpokit.evaluate, "load_model", refuse)
    policy = str(workdir / "model")
    with pytest.raises(ConfigError, match=re.escape(f"the reference {reference} has a different tokenizer than the policy {policy}")):
        dpokit.evaluate.evaluate_model(policy, reference=str(reference), data=str(workdir / "eval.jsonl"))
