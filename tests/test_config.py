"""Config: YAML + overrides, defaults, and errors that name the key and the fix."""

import re
from pathlib import Path

import pytest
import yaml

from dpokit.config import (
    ConfigError,
    DataSource,
    LossConfig,
    RunConfig,
    TrainingConfig,
    load_config,
    needs_reference,
    save_config,
)


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    (tmp_path / "pairs.jsonl").write_text("")
    return path


BASE = """
model:
  name_or_path: some/model
data:
  train: pairs.jsonl
  max_length: 256
training:
  learning_rate: 1.0e-6
"""


def test_sections_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.name_or_path == "some/model"
    assert cfg.data.train == DataSource(path=str(tmp_path / "pairs.jsonl"))
    assert cfg.data.max_length == 256
    assert cfg.training.per_device_train_batch_size == 8  # default filled
    assert cfg.loss.loss_type == ["sigmoid"]


def test_plain_and_dotted_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        ["learning_rate=5e-7", "training.max_steps=200", "output_dir=runs/try2", "loss_type=[sigmoid,sft]",
         "loss.loss_weights=[1.0,0.2]", "data.eval.path=ev.jsonl", "data.eval.split=test", "gradient_checkpointing=true"],
    )
    assert cfg.training.learning_rate == 5e-7
    assert cfg.training.max_steps == 200
    assert cfg.run.output_dir == "runs/try2"
    assert cfg.loss.loss_type == ["sigmoid", "sft"]
    assert cfg.loss.loss_weights == [1.0, 0.2]
    assert cfg.data.eval == DataSource(path="ev.jsonl", split="test")
    assert cfg.training.gradient_checkpointing is True


def test_flat_keys_at_top_level_of_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "train: pairs.jsonl\nbeta: 0.3\nloss_type: ipo\n"))
    assert cfg.loss.beta == 0.3 and cfg.loss.loss_type == ["ipo"]


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat'.*Did you mean 'learning_rate'"):
        load_config(write(tmp_path, BASE), ["learning_rat=1e-5"])
    with pytest.raises(ConfigError, match="'training.per_device_batch_size'.*per_device_train_batch_size"):
        load_config(write(tmp_path, BASE + "  per_device_batch_size: 4\n"))


def test_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'training.learning_rate' must be a number, got 'fast'"):
        load_config(write(tmp_path, BASE), ["learning_rate=fast"])
    with pytest.raises(ConfigError, match="'training.max_steps' must be an integer"):
        load_config(write(tmp_path, BASE), ["max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"'loss.loss_type\[0\]' must be one of .*Did you mean 'sigmoid'"):
        load_config(write(tmp_path, BASE), ["loss_type=sigmod"])
    with pytest.raises(ConfigError, match="'training.gradient_checkpointing' must be true or false"):
        load_config(write(tmp_path, BASE), ["gradient_checkpointing=3"])
    for override, key in (("beta=.nan", "loss.beta"), ("learning_rate=.inf", "training.learning_rate"),
                          ("loss_weights=[1.0,.nan]", r"loss.loss_weights\[1\]"), ("simpo_gamma=-.inf", "loss.simpo_gamma")):
        with pytest.raises(ConfigError, match=f"'{key}' must be a finite number, got"):  # YAML's .nan / .inf
            load_config(write(tmp_path, BASE), ["loss_type=[sigmoid,simpo]", override])


def test_cross_field_validation(tmp_path):
    with pytest.raises(ConfigError, match="2 weights for 1 losses"):
        load_config(write(tmp_path, BASE), ["loss_weights=[1.0,2.0]"])
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        load_config(write(tmp_path, BASE), ["label_smoothing=0.5"])
    with pytest.raises(ConfigError, match="data.train is not set"):
        load_config(None, ["beta=0.1"])
    with pytest.raises(ConfigError, match="per_device_train_batch_size must be at least 1"):
        load_config(write(tmp_path, BASE), ["per_device_train_batch_size=0"])
    with pytest.raises(ConfigError, match="overwrite_output_dir=true deletes an earlier run.*set only one of them"):
        load_config(write(tmp_path, BASE), ["overwrite_output_dir=true", "resume_from_checkpoint=latest"])
    with pytest.raises(ConfigError, match=r"loss_weights must each be > 0, got \[1.0, -0.2\]"):
        load_config(write(tmp_path, BASE), ["loss_type=[sigmoid,sft]", "loss_weights=[1.0,-0.2]"])
    for overrides, said in ((["beta=0"], "loss.beta must be > 0, got 0"),  # the boundaries, not only far outside them
                            (["loss_type=[sigmoid,sft]", "loss_weights=[1.0,0]"], r"loss_weights must each be > 0"),
                            (["loss_type=[sigmoid,sft,sigmoid]"], "loss.loss_type lists a loss twice"),
                            (["warmup_ratio=1.01"], r"warmup_ratio must be in \[0, 1\], got 1.01"),
                            (["warmup_ratio=-0.1"], r"warmup_ratio must be in \[0, 1\]"),
                            (["label_smoothing=-0.1"], "label_smoothing must be in")):
        with pytest.raises(ConfigError, match=said):
            load_config(write(tmp_path, BASE), overrides)
    for fine in (["warmup_ratio=1.0"], ["label_smoothing=0.49"], ["beta=1e-4"]):
        load_config(write(tmp_path, BASE), fine)
    for key, meaning in (("warmup_steps", "0 uses warmup_ratio"), ("max_grad_norm", "0 turns clipping off"), ("weight_decay", "0 is none")):
        with pytest.raises(ConfigError, match=rf"training.{key} must be 0 or more \({meaning}\), got -1"):
            load_config(write(tmp_path, BASE), [f"{key}=-1"])


def test_trls_sigmoid_norm_is_told_its_dpokit_spelling(tmp_path):
    with pytest.raises(ConfigError, match=r"'loss.loss_type\[0\]' 'sigmoid_norm': TRL's sigmoid_norm is dpokit's loss_type "
                                          "sigmoid with length_normalize: true"):
        load_config(write(tmp_path, BASE), ["loss_type=[sigmoid_norm]"])


def test_a_loss_setting_no_chosen_loss_reads_is_refused(tmp_path):
    """label_smoothing, length_normalize and simpo_gamma each refused where no loss in loss_type reads
    them (they would change nothing), accepted where one does."""
    refused = {
        ("loss_type=[ipo,hinge]", "label_smoothing=0.2"): "label_smoothing=0.2 applies to sigmoid, robust, simpo",
        ("loss_type=[sft]", "length_normalize=true"): "length_normalize applies to the losses with a reference",
        ("loss_type=[simpo,sft]", "length_normalize=false"): "length_normalize applies to the losses with a reference",
        ("loss_type=[sigmoid,simpo]", "length_normalize=false"): "cannot apply to simpo",
        ("loss_type=[sigmoid]", "simpo_gamma=1.0"): "simpo_gamma=1.0 is SimPO's target margin",
        ("loss_type=[sigmoid]", "discopop_tau=0.1"): "discopop_tau=0.1 is DiscoPOP's temperature",
        ("loss_type=[exo_pair]",): r"loss exo_pair needs label_smoothing > 0.*e\.g\. 1e-3",
        ("loss_type=[discopop]", "discopop_tau=0"): r"loss.discopop_tau must be > 0, got 0",
        ("loss_type=[apo_zero]", "label_smoothing=0.1"): "applies to sigmoid, robust, simpo, exo_pair",
        ("loss_type=[sigmoid,nca_pair]", "f_divergence_type=forward_kl"): "has nca_pair, whose f-divergence form does not hold",
        ("loss_type=[aot]", "f_divergence_type=js_divergence"): "has aot, whose",
        ("loss_type=[simpo,sft]", "f_divergence_type=forward_kl"): r"loss_type \['simpo', 'sft'\] has none of them",
        ("loss_type=[sigmoid]", "f_alpha_divergence_coef=0.3"): "is α of the α-divergence, but f_divergence_type is reverse_kl",
        ("f_divergence_type=forward_kl", "f_alpha_divergence_coef=0.3"): "f_divergence_type is forward_kl",
        ("loss_type=[sigmoid,aot_unpaired]", "use_weighting=true"): "but aot_unpaired sorts the pairs' margins",
        ("loss_type=[simpo,sft]", "ld_alpha=0.5"): r"ld_alpha=0.5 weighs .* has none of them",
        ("ld_alpha=1.5",): r"loss.ld_alpha must be in \[0, 1\] \(or null\), got 1.5",
        ("ld_alpha=-0.1",): r"loss.ld_alpha must be in \[0, 1\]",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, BASE), list(overrides))
    for overrides in (["loss_type=[ipo,sigmoid]", "label_smoothing=0.2"], ["loss_type=[simpo]", "label_smoothing=0.1"],
                      ["loss_type=[ipo]", "length_normalize=false"], ["loss_type=[simpo,sigmoid]", "length_normalize=true"],
                      ["loss_type=[simpo]", "simpo_gamma=1.0"], ["loss_type=[sft]", "simpo_gamma=0.5"],
                      ["loss_type=[discopop]", "discopop_tau=0.1"], ["loss_type=[exo_pair]", "label_smoothing=1e-3"],
                      ["loss_type=[nca_pair]", "length_normalize=true"], ["loss_type=[aot_unpaired]", "label_smoothing=0.1"],
                      ["loss_type=[ipo,sft]", "f_divergence_type=js_divergence"],
                      ["loss_type=[discopop]", "f_divergence_type=alpha_divergence", "f_alpha_divergence_coef=0.3"],
                      ["loss_type=[simpo,sft]", "use_weighting=true"], ["loss_type=[ipo,sft]", "ld_alpha=0.0"],
                      ["ld_alpha=1.0"]):
        load_config(write(tmp_path, BASE), overrides)


def test_live_reference_from_a_starting_adapter_is_refused_before_loading(tmp_path):
    """Starting from an adapter, the reference is base + that adapter: scored once (the default), or
    refused when asked to be live; reference-free losses need none."""
    adapter = ["use_peft=true", "adapter_name_or_path=runs/sft/final"]
    with pytest.raises(ConfigError, match="would need the base loaded twice.*precompute_ref_log_probs=true"):
        load_config(write(tmp_path, BASE), [*adapter, "precompute_ref_log_probs=false"])
    assert load_config(write(tmp_path, BASE), adapter).training.precompute_ref_log_probs
    with pytest.raises(ConfigError, match=r"model.lora_r, model.lora_modules_to_save describe new adapters, but "
                       r"adapter_name_or_path trains the existing adapter runs/sft/final further"):
        load_config(write(tmp_path, BASE), [*adapter, "lora_r=8", "lora_modules_to_save=[embed_tokens]"])
    load_config(write(tmp_path, BASE), [*adapter, "loss_type=[simpo]"])
    load_config(write(tmp_path, BASE), ["use_peft=true", "precompute_ref_log_probs=false"])  # fresh adapters: base is the reference


def test_settings_of_what_a_run_does_not_use_are_refused(tmp_path):
    """Each of these trained without a word: LoRA settings without use_peft did full fine-tuning;
    reference settings with a reference-free loss, eval batch size without eval data, a chunk size
    with chunking off, a checkpoint limit without checkpoints all did nothing."""
    refused = {
        ("lora_r=8", "lora_target_modules=[q_proj]"): r"model.lora_r, model.lora_target_modules describe LoRA adapters, "
                                                      r"but model.use_peft is false, so the whole model would train",
        ("loss_type=[simpo]", "ref_model_name_or_path=builtin:tiny-llama"): r"model.ref_model_name_or_path concern.*"
                                                                           r"uses none \(reference-free\): remove it",
        ("loss_type=[simpo]", "precompute_ref_log_probs=false"): "training.precompute_ref_log_probs=false concern",
        ("ref_revision=main",): "model.ref_revision is the revision of model.ref_model_name_or_path, which is not set",
        ("chunked_logps=false", "logps_chunk_size=64"): "logps_chunk_size=64 sizes the chunks of chunked_logps, which is false",
        ("save_total_limit=5", "save_steps=null"): "save_total_limit=5 keeps the newest checkpoints, and run.save_steps is not set",
        ("per_device_eval_batch_size=2",): "per_device_eval_batch_size=2 sizes eval batches, and there is no eval data",
    }
    for overrides, message in refused.items():
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, BASE), list(overrides))
        load_config(write(tmp_path, BASE), list(overrides), for_training=False)  # a finished run's config, a plan
    for overrides in (["use_peft=true", "lora_r=8"], ["ref_model_name_or_path=org/reference", "ref_revision=main"],
                      ["save_total_limit=5", "save_steps=10"], ["per_device_eval_batch_size=2", "eval_fraction=0.1"],
                      ["loss_type=[simpo]"], ["save_steps=null"]):
        load_config(write(tmp_path, BASE), overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(write(tmp_path, BASE), ["learning_rate"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["loss_type=[sigmoid,sft]"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert "per_device_train_batch_size" in yaml.safe_load((tmp_path / "resolved.yaml").read_text())["training"]


def test_saved_config_is_read_the_same_from_anywhere(tmp_path, monkeypatch):
    """Local paths found relative to where the run started are saved absolute: `dpokit train
    runs/x/config.yaml` repeats the run from any folder (a hub id stays as it is)."""
    (tmp_path / "start" / "data").mkdir(parents=True)
    (tmp_path / "start" / "data" / "tr.jsonl").write_text("{}\n")
    (tmp_path / "start" / "sft").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    cfg = load_config(None, ["data.train=data/tr.jsonl", "data.eval=[{path: data/tr.jsonl}, {path: org/hub-set}]",
                             "model.name_or_path=Qwen/Qwen2.5-0.5B", "adapter_name_or_path=sft", "use_peft=true",
                             "output_dir=runs/x"])
    (tmp_path / "start" / "runs" / "x").mkdir(parents=True)  # a run saves its config into it
    save_config(cfg, tmp_path / "start" / "resolved.yaml")
    monkeypatch.chdir(tmp_path)
    again = load_config(tmp_path / "start" / "resolved.yaml")
    assert again.data.train.path == str(tmp_path / "start" / "data" / "tr.jsonl")
    assert [s.path for s in again.data.eval] == [str(tmp_path / "start" / "data" / "tr.jsonl"), "org/hub-set"]
    assert again.model.adapter_name_or_path == str(tmp_path / "start" / "sft")
    assert again.model.name_or_path == "Qwen/Qwen2.5-0.5B"
    assert again.run.output_dir == str(tmp_path / "start" / "runs" / "x")


def test_a_setting_given_twice_in_a_file_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a second training: section silently dropped the first's
    settings; a key at the top level and under its section, one of them."""
    twice = BASE + "training:\n  max_steps: 10\n"
    with pytest.raises(ConfigError, match=r"cfg.yaml, line 9: 'training' is given twice in the same mapping"):
        load_config(write(tmp_path, twice))
    with pytest.raises(ConfigError, match=r"'learning_rate' is set twice in .*cfg.yaml, at the top level and under "
                                          r"'training:' \(1e-06 and 0.001\): keep one"):
        load_config(write(tmp_path, BASE + "learning_rate: 1.0e-3\n"))
    assert load_config(write(tmp_path, BASE), ["learning_rate=1e-3"]).training.learning_rate == 1e-3  # overrides override


def test_eval_settings_without_eval_data_and_a_file_for_output_dir_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, BASE)
    for overrides, said in ((["eval_steps=5"], "run.eval_steps=5 evaluates on data.eval or a data.eval_fraction"),
                            (["eval_on_start=true"], "run.eval_on_start=true evaluates on data.eval"),
                            (["data.eval=pairs.jsonl", "eval_fraction=0.1"], "data.eval gives eval data already")):
        with pytest.raises(ConfigError, match=said):
            load_config(path, overrides)
    assert load_config(path, ["eval_steps=5", "eval_fraction=0.1"]).run.eval_steps == 5
    (tmp_path / "afile").write_text("")
    for output_dir in ("afile", "afile/sub"):
        with pytest.raises(ConfigError, match=f"run.output_dir={output_dir}: afile is a file, not a folder"):
            load_config(path, [f"output_dir={output_dir}"])


def test_a_finished_runs_config_is_read_as_it_trained(tmp_path):
    """A run's saved config.yaml is read back by eval, export, compare and chat: settings that a run
    about to start is refused for (they would do nothing) stay readable there, as an older dpokit saved them."""
    text = BASE + "run:\n  eval_steps: 5\n  eval_on_start: true\nloss:\n  loss_type: ipo\n  label_smoothing: 0.1\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="run.eval_steps=5 evaluates"):
        load_config(path)
    config = load_config(path, for_training=False)
    assert config.run.eval_steps == 5 and config.loss.label_smoothing == 0.1


def test_a_data_path_found_both_from_here_and_beside_the_config_is_refused(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "pairs.jsonl").write_text("")
    (tmp_path / "exp" / "c.yaml").write_text("data: {train: pairs.jsonl}\n")
    monkeypatch.chdir(tmp_path / "exp")
    assert load_config("c.yaml").data.train.path == "pairs.jsonl"  # one file, found both ways
    monkeypatch.chdir(tmp_path)
    assert load_config("exp/c.yaml").data.train.path == str(Path("exp") / "pairs.jsonl")
    (tmp_path / "pairs.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"data.train=pairs.jsonl names two files, .* give the one you mean as an absolute path"):
        load_config("exp/c.yaml")


def test_reference_needed_only_for_reference_losses(tmp_path):
    assert needs_reference(load_config(write(tmp_path, BASE)))
    assert not needs_reference(load_config(write(tmp_path, BASE), ["loss_type=[simpo,sft]"]))


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_prefix_sharing_with_mask_free_attention_kernels_is_refused(tmp_path, attn):
    with pytest.raises(ConfigError, match="prefix_sharing=false.*flex_attention"):
        load_config(write(tmp_path, BASE), [f"attn_implementation={attn}"])
    cfg = load_config(write(tmp_path, BASE), [f"attn_implementation={attn}", "prefix_sharing=false"])
    assert cfg.training.padding_free


def test_prefix_sharing_takes_sdpa_eager_and_flex(tmp_path):
    for attn in ("sdpa", "eager", "flex_attention"):
        assert load_config(write(tmp_path, BASE), [f"attn_implementation={attn}"]).training.prefix_sharing


def test_layout_switches():
    from dpokit.config import TrainingConfig, batch_layout

    assert batch_layout(TrainingConfig()) == "prefix_packed"
    assert batch_layout(TrainingConfig(prefix_sharing=False)) == "packed"
    assert batch_layout(TrainingConfig(padding_free=False)) == "prefix_padded"
    assert batch_layout(TrainingConfig(padding_free=False, prefix_sharing=False)) == "padded"


def test_readme_config_tour_shows_every_key(tmp_path):
    """The README's config tour is a loadable config that lists every key of every section."""
    import dataclasses
    import re
    from pathlib import Path

    from dpokit.config import Config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tour = re.search(r"### Config tour\n\n```yaml\n(.*?)```", readme, re.S).group(1)
    shown = yaml.safe_load(tour)
    for section in dataclasses.fields(Config):
        keys = {f.name for f in dataclasses.fields(getattr(Config(), section.name))}
        assert set(shown[section.name]) == keys, section.name
    path = tmp_path / "tour.yaml"
    path.write_text(tour)
    assert load_config(path).training.chunked_logps is True
    examples = {("model", "name_or_path"), ("data", "train")}  # what a user must give; every other value is the default
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(getattr(Config(), section.name)):
            if (section.name, field.name) not in examples:
                default = getattr(getattr(Config(), section.name), field.name)
                assert shown[section.name][field.name] == default, (section.name, field.name)


@pytest.mark.parametrize("override, said", [
    ("max_steps=true", "'training.max_steps' must be an integer, got True"),  # not read as 1
    ("beta=true", "'loss.beta' must be a number, got True"),  # not read as 1.0
    ("name_or_path=true", "'model.name_or_path' must be a string, got True"),  # not read as "True"
])
def test_a_boolean_is_not_read_as_a_number_or_a_string(tmp_path, override, said):
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        load_config(write(tmp_path, BASE), [override])


def test_a_number_given_for_a_string_setting_is_its_text(tmp_path):
    """YAML reads `revision: 2024` or `name: 2023` as numbers: they are what the user typed, as text."""
    cfg = load_config(write(tmp_path, BASE), ["revision=2024", "data.train.name=2023"])
    assert cfg.model.revision == "2024" and cfg.data.train.name == "2023"


def test_empty_and_malformed_sections_and_files(tmp_path):
    """A section with every key commented out is empty, not an error; a section or a file that is not
    a mapping is refused in one line (no AttributeError traceback)."""
    cfg = load_config(write(tmp_path, BASE + "loss:\nrun:\n"))
    assert cfg.loss == LossConfig() and cfg.run.output_dir == RunConfig().output_dir
    with pytest.raises(ConfigError, match=r"section 'loss' in .*cfg.yaml must be a mapping of keys, got 5"):
        load_config(write(tmp_path, BASE + "loss: 5\n"))
    empty = write(tmp_path, "")
    assert load_config(empty, [f"data.train={tmp_path / 'pairs.jsonl'}"]).training == TrainingConfig()
    with pytest.raises(ConfigError, match=r"cfg.yaml must hold a mapping of config keys, got list"):
        load_config(write(tmp_path, "- learning_rate\n- beta\n"))


def test_override_values_are_taken_whole(tmp_path):
    """Only the first `=` splits key from value; text YAML cannot read stays the text typed."""
    path = write(tmp_path, BASE)
    assert load_config(path, ["system_prompt=Use a=b, c=d."]).data.system_prompt == "Use a=b, c=d."
    assert load_config(path, ["system_prompt=Note: a: b"]).data.system_prompt == "Note: a: b"  # YAML: not a mapping
    with pytest.raises(ConfigError, match="override '=5' has an empty key"):
        load_config(path, ["=5"])


def test_a_config_file_with_an_equals_sign_in_its_name_is_a_file():
    from dpokit.config import split_config_argument

    assert split_config_argument("runs/lr=1e-6.yaml", ["beta=0.2"]) == ("runs/lr=1e-6.yaml", ["beta=0.2"])
    assert split_config_argument("sweep/b=2.yml", []) == ("sweep/b=2.yml", [])
    assert split_config_argument("learning_rate=1e-6", ["beta=0.2"]) == (None, ["learning_rate=1e-6", "beta=0.2"])


@pytest.mark.parametrize("overrides, said", [
    (["num_proc=0"], r"data.num_proc must be at least 1 or null, got 0"),
    (["eval_fraction=1.0"], r"data.eval_fraction must be in \[0, 1\), got 1.0"),  # nothing left to train
    (["max_length=1"], "data.max_length must be at least 2, got 1"),
    (["logging_steps=0"], "run.logging_steps must be at least 1, got 0"),
    (["logps_chunk_size=0"], "training.logps_chunk_size must be at least 1, got 0"),
    (["eval_fraction=0.1", "eval_steps=0"], "run.eval_steps must be at least 1 or null, got 0"),
    (["save_steps=0"], "run.save_steps must be at least 1 or null, got 0"),
    (["save_total_limit=0"], "run.save_total_limit must be at least 1 or null, got 0"),
    (["num_train_epochs=0"], r"set training.max_steps > 0 or training.num_train_epochs > 0"),
    (["loss_type=[]"], "loss.loss_type is empty: name at least one of"),
    (["use_peft=true", "lora_r=0"], r"LoRA needs lora_r >= 1, .*got 0, 32, 0.05"),
    (["use_peft=true", "lora_alpha=0"], r"LoRA needs .*lora_alpha >= 1.*got 16, 0, 0.05"),
    (["use_peft=true", "lora_dropout=1.0"], r"LoRA needs .*lora_dropout in \[0, 1\): got 16, 32, 1.0"),
    (["lora_dropout=0.1"], r"model.lora_dropout describe LoRA adapters, but model.use_peft is false"),
    (["use_peft=true", "ref_model_name_or_path=org/reference"], "with LoRA the reference is the base model.*unset ref_model_name_or_path"),
    (["report_to=[none,wandb]"], r"run.report_to mixes 'none' with trackers: \['none', 'wandb'\]"),
    (["data.eval.split=test"], r"data.eval.path is not set: give a .jsonl/.json/.parquet/.csv file or a hub dataset id"),
    (["data.eval=[{path: pairs.jsonl}, {split: test}]"], r"data.eval\[1\].path is not set"),
])
def test_values_just_outside_their_range_are_refused(tmp_path, overrides, said):
    """The first value past each bound (0 where 1 is the least, 1.0 where [0, 1) ends), not only far outside."""
    with pytest.raises(ConfigError, match=said):
        load_config(write(tmp_path, BASE), overrides)


@pytest.mark.parametrize("overrides", [["learning_rate=0"], ["num_proc=1"], ["eval_fraction=0.99"], ["max_length=2"],
                                       ["use_peft=true", "lora_r=1", "lora_alpha=1", "lora_dropout=0.0"],
                                       ["max_steps=5", "num_train_epochs=0"]])
def test_values_at_their_bound_are_accepted(tmp_path, overrides):
    load_config(write(tmp_path, BASE), overrides)


def test_saved_config_makes_the_reference_and_resume_paths_absolute(tmp_path, monkeypatch):
    """Like the data and model paths: a saved run config names the same reference and checkpoint from any folder."""
    (tmp_path / "start" / "ref").mkdir(parents=True)
    (tmp_path / "start" / "runs" / "x" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "start" / "pairs.jsonl").write_text("")
    monkeypatch.chdir(tmp_path / "start")
    cfg = load_config(None, ["data.train=pairs.jsonl", "ref_model_name_or_path=ref", "output_dir=runs/x",
                             "resume_from_checkpoint=runs/x/checkpoints/step-2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    saved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert saved["model"]["ref_model_name_or_path"] == str(tmp_path / "start" / "ref")
    assert saved["run"]["resume_from_checkpoint"] == str(tmp_path / "start" / "runs" / "x" / "checkpoints" / "step-2")
