"""eval / compare / chat / export: arguments that cannot be what was meant, refused in one line
before any model is loaded, naming what the user wrote (a flag, the run's config.yaml, a path)."""

from __future__ import annotations

import re

import pytest

from dpokit.cli import main
from dpokit.config import ConfigError, save_config
from dpokit.modeling import not_here, resolve_model_path
from runs import run_config


def _exit_message(argv, capsys, lines: int = 1) -> str:
    """The error of a command that must fail with exit status 2: at most ``lines`` lines, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dpokit: error: ") and "Traceback" not in err and 1 <= err.count("\n") <= lines
    return err


def _fake_run(workdir, folder, *overrides: str):
    """A run directory as training leaves it (config.yaml, final/), without training: the
    checks below all come before any model is loaded."""
    folder.mkdir()
    save_config(run_config(workdir, "unused", *overrides), folder / "config.yaml")
    (folder / "final").mkdir()
    return folder


def test_eval_of_a_run_without_eval_data_names_its_config_yaml(workdir, tmp_path, capsys):
    run = _fake_run(workdir, tmp_path / "run", "data.eval=null")
    err = _exit_message(["eval", str(run)], capsys)
    assert f"{run / 'config.yaml'} has no eval data" in err and "--data" in err
    assert "train.jsonl" not in err  # not the train data's path


def test_eval_split_without_data_is_refused(workdir, tmp_path, capsys):
    run = _fake_run(workdir, tmp_path / "run")
    err = _exit_message(["eval", str(run), "--split", "test"], capsys)
    assert "--split test applies to --data only" in err and str(run / "config.yaml") in err


def test_eval_and_compare_data_errors_name_the_flag(workdir, tmp_path, capsys):
    model = str(workdir / "model")
    missing = str(tmp_path / "nothere.jsonl")
    err = _exit_message(["eval", model, "--reference", model, "--data", missing], capsys)
    assert f"data file {missing} does not exist (check the path given to --data)" in err and "data.train" not in err
    err = _exit_message(["eval", model, "--reference", model, "--data", str(workdir / "eval.jsonl"), "--split", "test"], capsys)
    assert "--split test has no effect on --data" in err
    err = _exit_message(["compare", model, "--reference", model, "--from-data", missing], capsys)
    assert "check the path given to --from-data" in err
    err = _exit_message(["compare", model, "--reference", model, "--from-data", str(workdir / "eval.jsonl"), "--split", "test"], capsys)
    assert "--split test has no effect on --from-data" in err
    (tmp_path / "p.txt").write_text("hi\n")
    err = _exit_message(["compare", model, "--reference", model, "--prompts", str(tmp_path / "p.txt"), "--split", "test"], capsys)
    assert "--split test applies to --from-data only" in err


def test_model_paths_that_cannot_be_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for path in ("./nomodel", "/abs/nothere", "~/nothere", "a/b/c", "bad name", "a--b"):
        with pytest.raises(ConfigError, match=r"^no such folder: .* \(model.name_or_path / MODEL argument; .*\): fix the path"):
            resolve_model_path(path)
    (tmp_path / "runs").mkdir()  # runs/nothere can be a hub id: left to the hub, whose error then says so
    assert resolve_model_path("runs/nothere") == "runs/nothere"
    assert not_here("runs/nothere") == " (there is no folder runs/nothere either: runs/ holds no such entry)"
    assert not_here("Qwen/Qwen2.5-0.5B") == ""
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ConfigError, match="weights.bin is a file, not a model folder"):
        resolve_model_path("weights.bin")
    (tmp_path / "home" / "m").mkdir(parents=True)
    assert resolve_model_path("~/m") == str(tmp_path / "home" / "m")  # ~ expanded for the loaders
    assert resolve_model_path("runs") == str(tmp_path / "runs")  # a folder, made absolute (an adapter names its base so)
    for hub_id in ("gpt2", "some-org/some-model", "Qwen/Qwen2.5-0.5B-Instruct"):  # plausible hub ids: left to the hub
        assert resolve_model_path(hub_id) == hub_id


@pytest.mark.parametrize("path", ["./nomodel", "runs/nothere"])
def test_every_model_command_says_no_such_folder(workdir, tmp_path, monkeypatch, capsys, path):
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # runs/nothere goes to the hub: no network waits
    (tmp_path / "runs").mkdir()
    model = str(workdir / "model")
    for argv in (["eval", path, "--data", str(workdir / "eval.jsonl")],
                 ["eval", model, "--reference", path, "--data", str(workdir / "eval.jsonl")],
                 ["export", path, "--merge", str(tmp_path / "out")],
                 ["chat", path],
                 ["compare", path, "--prompts", str(workdir / "eval.jsonl")],
                 ["data", "inspect", str(workdir / "eval.jsonl"), f"model.name_or_path={path}"]):
        err = _exit_message(argv, capsys, lines=2 if path == "runs/nothere" else 1)
        said = ("there is no folder runs/nothere either: runs/ holds no such entry" if path == "runs/nothere"
                else f"no such folder: {path} (model.name_or_path / MODEL argument")
        assert said in err, (argv, err)


def test_a_run_saved_with_settings_now_refused_at_start_still_resolves(workdir, tmp_path):
    """eval, export, compare and chat read a finished run's config.yaml as it trained: an older dpokit
    saved eval_steps without eval data, which a new run is refused for, and the run stays usable."""
    import shutil

    from dpokit.config import load_config
    from dpokit.resolve import resolve_model

    run = tmp_path / "old-run"
    shutil.copytree(workdir / "model", run / "final")
    config = load_config(None, [f"model.name_or_path={workdir / 'model'}", f"data.train={workdir / 'train.jsonl'}",
                                "eval_steps=5", f"output_dir={run}"], for_training=False)
    save_config(config, run / "config.yaml")
    resolved = resolve_model(str(run))
    assert resolved.run_config.run.eval_steps == 5 and resolved.path == str(run / "final")


def test_a_builtin_model_is_named_as_written(workdir, tmp_path, capsys):
    """`dpokit eval builtin:tiny-qwen2 --data ...` said "<cache folder> is not a dpokit run"."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n')
    err = _exit_message(["eval", "builtin:tiny-qwen2", "--data", str(data)], capsys)
    assert err.startswith("dpokit: error: builtin:tiny-qwen2 is not a dpokit run, so it has no default reference")
    err = _exit_message(["compare", "builtin:tiny-qwen2", "--prompts", str(data)], capsys)
    assert "builtin:tiny-qwen2 is not a dpokit run" in err


def _no_model_load(monkeypatch):
    import dpokit.export

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the folders were checked")

    monkeypatch.setattr(dpokit.export, "load_model", refuse)


def test_export_into_a_non_empty_folder_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    _no_model_load(monkeypatch)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    err = _exit_message(["export", str(model), "--merge", str(out)], capsys)
    assert err == f"dpokit: error: {out} exists and is not empty: choose a new folder\n"
    assert (out / "notes.txt").read_text() == "mine\n"
    (tmp_path / "file").write_text("")
    err = _exit_message(["export", str(model), "--merge", str(tmp_path / "file")], capsys)
    assert f"{tmp_path / 'file'} is a file, not a folder: choose a new folder for the model" in err


def test_exporting_an_adapter_without_merging_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch):
    from dpokit.export import export_model

    _no_model_load(monkeypatch)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    said = f"{adapter.resolve()} is a LoRA adapter: pass --merge to write base + adapter as one model"
    with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
        export_model(str(adapter), tmp_path / "out", merge=False)
    assert not (tmp_path / "out").exists()


def test_export_writes_the_dtype_asked_for(tmp_path, monkeypatch, capsys):
    import dpokit.export

    asked = []
    monkeypatch.setattr(dpokit.export, "export_model", lambda model, out, merge, dtype: asked.append((model, out, merge, dtype)) or out)
    for flags, dtype in (([], None), (["--dtype", "bfloat16"], "bfloat16")):
        main(["export", "runs/x", "--merge", str(tmp_path / "out"), *flags])
        assert asked.pop() == ("runs/x", str(tmp_path / "out"), True, dtype)


def test_compare_takes_the_prompts_and_sampling_settings_asked_for(workdir, tmp_path, monkeypatch, capsys):
    """--n cuts either prompt source (20 from --from-data by default, all of --prompts); the sampling
    flags reach generation, and without them the settings are SamplingSettings' defaults."""
    import dpokit.compare
    from dpokit.generate import SamplingSettings
    from dpokit.resolve import resolve_model

    calls = []

    def compare(model, prompts, reference, settings, batch_size, dtype, template_kwargs):
        calls.append((prompts, settings))
        return None, resolve_model(model)

    monkeypatch.setattr(dpokit.compare, "compare", compare)
    monkeypatch.setattr(dpokit.compare, "write_comparison", lambda *a: ("compare.md", "compare.jsonl"))
    model = str(workdir / "model")
    assert sum(1 for _ in open(workdir / "train.jsonl")) > 20
    main(["compare", model, "--reference", model, "--from-data", str(workdir / "train.jsonl")])
    prompts, settings = calls.pop()
    assert len(prompts) == 20 and settings == SamplingSettings()
    lines = tmp_path / "p.txt"
    lines.write_text("".join(f"prompt {i}\n" for i in range(5)))
    main(["compare", model, "--reference", model, "--prompts", str(lines)])
    assert len(calls.pop()[0]) == 5
    main(["compare", model, "--reference", model, "--prompts", str(lines), "--n", "3", "--seed", "7", "--top-k", "5",
          "--top-p", "0.5", "--temperature", "0.2", "--max-new-tokens", "9"])
    prompts, settings = calls.pop()
    assert [p[-1]["content"] for p in prompts] == ["prompt 0", "prompt 1", "prompt 2"]
    assert settings == SamplingSettings(temperature=0.2, top_p=0.5, top_k=5, max_new_tokens=9, seed=7)
    err = _exit_message(["compare", model, "--reference", model, "--prompts", str(lines), "--n", "0"], capsys)
    assert "--n must be at least 1, got 0" in err and not calls


def test_ctrl_c_ends_a_use_command_with_status_130(monkeypatch, capsys):
    import dpokit.chat

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dpokit.chat, "chat", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["chat", "builtin:tiny-qwen2"])
    assert exc.value.code == 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    assert capsys.readouterr().err == "dpokit chat: interrupted\n"
