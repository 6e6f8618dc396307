"""Each training option does what it says (tiny model, a few steps each)."""

import copy
import json
import math

import pytest
import torch

from dpokit.cli import main
from dpokit.config import load_config
from dpokit.tiny import build_tiny_model
from dpokit.train import plan_steps, train
from runs import read_rows, run_config, summary_items, train_rows


def eval_rows(run_dir):
    return [r for r in read_rows(run_dir) if "eval/loss" in r]


@pytest.mark.parametrize(
    "scheduler,expected",
    [
        # 8 steps, 2 warmup steps, peak 1e-3; the rate logged at step k is the one step k used
        ("constant", [0.0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3]),
        ("linear", [0.0, 5e-4, 1e-3, 1e-3 * 5 / 6, 1e-3 * 4 / 6, 1e-3 * 3 / 6, 1e-3 * 2 / 6, 1e-3 * 1 / 6]),
        ("cosine", [0.0, 5e-4] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]),
    ],
)


def test_schedulers_with_warmup(workdir, scheduler, expected):
    out = train(run_config(workdir, f"sched-{scheduler}", f"lr_scheduler_type={scheduler}", "max_steps=8", "warmup_steps=2", "eval=null"))
    assert [r["learning_rate"] for r in train_rows(out)] == pytest.approx(expected, abs=1e-9)


def test_warmup_ratio_rounds_up(workdir):
    out = train(run_config(workdir, "wratio", "lr_scheduler_type=constant", "max_steps=4", "warmup_ratio=0.3", "eval=null"))
    # ceil(0.3 * 4) = 2 warmup steps
    assert [r["learning_rate"] for r in train_rows(out)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_epochs_decide_the_step_count(workdir):
    cfg = run_config(workdir, "epochs", "max_steps=-1", "num_train_epochs=0.25", "per_device_train_batch_size=4")
    assert plan_steps(48, 4, cfg) == (12, 3)
    out = train(cfg)
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["epoch"] == pytest.approx(0.25)


def test_a_run_over_an_epoch_boundary_reshuffles_and_saves_its_last_step(workdir, monkeypatch):
    """1.3 epochs of 12 steps: 16 steps (rounded up); the first 12 take every pair once, the next
    4 the second epoch's own order; checkpoints every 5 steps and at the last step (a finished run
    can be continued from it)."""
    import dpokit.train
    from dpokit.data.batching import global_batches

    taken = []
    real = dpokit.train.local_micro_batches
    monkeypatch.setattr(dpokit.train, "local_micro_batches", lambda batch, *a: taken.append(list(batch)) or real(batch, *a))
    cfg = run_config(workdir, "epochs-cross", "max_steps=-1", "num_train_epochs=1.3", "save_steps=5", "save_total_limit=2", "eval=null")
    assert plan_steps(48, 4, cfg) == (12, 16)
    out = train(cfg)
    assert len(taken) == 16 and sorted(i for batch in taken[:12] for i in batch) == list(range(48))
    assert taken[:12] == global_batches(48, 4, 3, 0) and taken[12:] == global_batches(48, 4, 3, 1)[:4]
    assert taken[12:] != taken[:4]
    assert [r["epoch"] for r in train_rows(out)][11:13] == [1.0, pytest.approx(13 / 12, abs=1e-4)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-15", "step-16"]


def test_logging_steps_average_the_window(workdir, monkeypatch):
    """A row averages the statistics of the steps since the last row, and counts their tokens and their
    training seconds (a clock that moves 1s per reading: 1s per step) for its rates."""
    import itertools
    import types

    import dpokit.train

    ticks = itertools.count()
    monkeypatch.setattr(dpokit.train, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    every = train_rows(train(run_config(workdir, "log1", "max_steps=4", "logging_steps=1", "eval=null")))
    pairs = train_rows(train(run_config(workdir, "log2", "max_steps=4", "logging_steps=2", "eval=null")))
    assert [r["step"] for r in pairs] == [2, 4]
    assert pairs[0]["loss"] == pytest.approx((every[0]["loss"] + every[1]["loss"]) / 2, abs=1e-6)
    assert pairs[1]["tokens"] == every[2]["tokens"] + every[3]["tokens"]
    assert [r["seconds"] for r in every] == [1.0] * 4 and [r["seconds"] for r in pairs] == [2.0, 2.0]
    assert [(r["pairs"], r["pairs_per_second"]) for r in pairs] == [(8, 4.0), (8, 4.0)]  # 2 steps of 4 pairs in 2s
    assert pairs[1]["tokens_per_second"] == pytest.approx((every[2]["tokens"] + every[3]["tokens"]) / 2)


@pytest.mark.parametrize("precision", [[], ["bf16=true"]])
def test_eval_on_start_gives_the_reference_baseline(workdir, precision):
    """In 16 bits too: the eval pass scores the policy under the autocast its reference table had."""
    out = train(run_config(workdir, "evalstart", "eval_on_start=true", "eval_steps=2", "max_steps=4", *precision))
    rows = eval_rows(out)
    assert [r["step"] for r in rows] == [0, 2, 4]
    # before any update the policy is the reference: zero rewards, loss log 2
    assert rows[0]["eval/rewards/margins"] == 0.0
    assert rows[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_separate_reference_model(workdir, tmp_path):
    other = build_tiny_model(tmp_path / "ref", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, seed=7)
    same = train_rows(train(run_config(workdir, "ref-copy", "max_steps=1", "eval=null")))
    separate = train_rows(train(run_config(workdir, "ref-other", "max_steps=1", "eval=null", f"ref_model_name_or_path={other}")))
    assert same[0]["rewards/margins"] == 0.0  # policy == frozen copy at step 1
    assert separate[0]["rewards/margins"] != 0.0  # a different model scores differently
    assert separate[0]["logps/chosen"] == pytest.approx(same[0]["logps/chosen"], abs=1e-5)  # the policy is the same


def test_reference_free_loss_loads_no_reference(workdir, capsys):
    train(run_config(workdir, "simpo-noref", "loss_type=simpo", "max_steps=1", "eval=null"))
    assert "reference: none (reference-free loss)" in capsys.readouterr().out


def test_gradient_checkpointing_gives_the_same_training(workdir):
    plain = train_rows(train(run_config(workdir, "gc-off", "max_steps=2", "eval=null")))
    checkpointed = train_rows(train(run_config(workdir, "gc-on", "max_steps=2", "eval=null", "gradient_checkpointing=true")))
    for a, b in zip(plain, checkpointed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)


def test_eager_attention_matches_sdpa(workdir):
    sdpa = train_rows(train(run_config(workdir, "attn-sdpa", "max_steps=2", "eval=null", "attn_implementation=sdpa")))
    eager = train_rows(train(run_config(workdir, "attn-eager", "max_steps=2", "eval=null", "attn_implementation=eager")))
    for a, b in zip(sdpa, eager, strict=True):
        assert a["logps/chosen"] == pytest.approx(b["logps/chosen"], abs=1e-3)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def _changed_fraction(run_dir, start_dir) -> float:
    """Share of the starting weights (in the run's dtype) that the run changed."""
    from safetensors.torch import load_file

    start, end = load_file(start_dir / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    changed = sum(int((end[k] != start[k].to(end[k].dtype)).sum()) for k in start)
    return changed / sum(v.numel() for v in start.values())


def test_pure_bfloat16_weights_lose_small_updates_and_dpokit_says_so(workdir, capsys):
    from transformers import AutoModelForCausalLM

    out = train(run_config(workdir, "bf16", "max_steps=2", "eval=null", "dtype=bfloat16", "learning_rate=1e-6"))
    assert all(math.isfinite(r["loss"]) for r in train_rows(out))
    assert AutoModelForCausalLM.from_pretrained(out / "final", dtype="auto").dtype == torch.bfloat16
    assert "dtype=float32 with bf16=true" in capsys.readouterr().out
    assert _changed_fraction(out, workdir / "model") < 0.2  # most AdamW steps rounded away


def test_the_low_precision_warning_is_about_trained_weights_only(workdir):
    """Frozen 16-bit weights lose no update (LoRA's float32 adapters on a bfloat16 base): no warning;
    trained 16-bit ones do."""
    from dpokit.train import warn_low_precision_weights

    said = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16).requires_grad_(False), torch.nn.Linear(4, 4))
    config = run_config(workdir, "unused")
    warn_low_precision_weights(model, config, said.append)
    assert said == []
    model[0].requires_grad_(True)
    warn_low_precision_weights(model, config, said.append)
    assert len(said) == 1 and said[0].startswith("warning: the trained weights are bfloat16")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_float32_weights_and_their_updates(workdir, capsys, precision):
    """dtype=float32 + bf16=true / fp16=true: 16-bit compute (the log-probs differ from float32's),
    float32 weights and optimizer (small updates land), the reference scored under the same
    autocast; fp16's loss scale is divided out of the gradients before their norm is taken."""
    from transformers import AutoModelForCausalLM

    fp32 = train_rows(train(run_config(workdir, "mp-off", "max_steps=2", "eval=null", "learning_rate=1e-6")))
    out = train(run_config(workdir, f"mp-{precision}", "max_steps=2", "eval=null", "learning_rate=1e-6", f"{precision}=true"))
    mixed = train_rows(out)
    assert "warning" not in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out / "final").dtype == torch.float32
    assert _changed_fraction(out, workdir / "model") > 0.5
    assert mixed[0]["logps/chosen"] != fp32[0]["logps/chosen"]  # computed in 16 bits ...
    assert mixed[0]["logps/chosen"] == pytest.approx(fp32[0]["logps/chosen"], rel=0.02)  # ... close to float32
    # the reference table was scored under the same autocast, over the first epoch's micro-batches:
    # before the first update the policy scores every pair exactly as its reference did
    assert mixed[0]["rewards/chosen"] == mixed[0]["rewards/rejected"] == 0 and mixed[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert all(r["grad_norm"] == pytest.approx(f["grad_norm"], rel=0.05) for r, f in zip(mixed, fp32))


def test_mixed_precision_settings_that_cannot_work_are_refused(workdir):
    from dpokit.config import ConfigError

    with pytest.raises(ConfigError, match="dtype=float32"):
        run_config(workdir, "x", "bf16=true", "dtype=float16")
    with pytest.raises(ConfigError, match="choose one"):
        run_config(workdir, "x", "bf16=true", "fp16=true")
    with pytest.raises(ConfigError, match="use dtype=float32"):  # GradScaler cannot unscale 16-bit gradients
        run_config(workdir, "x", "fp16=true", "dtype=float16")
    with pytest.raises(ConfigError, match="model.dtype is bfloat16"):
        run_config(workdir, "x", "fp16=true", "dtype=bfloat16", "use_peft=true")
    run_config(workdir, "x", "fp16=true", "dtype=float16", "use_peft=true")  # float32 adapters on a float16 base


def test_fp16_overflowing_steps_are_skipped_and_leave_weights_and_schedule(workdir, monkeypatch):
    """A loss scale so large that every scaled gradient overflows float16: each step is skipped
    (the weights stay, the learning-rate schedule does not advance), the scale halves, and the
    rows carry no grad_norm."""
    from safetensors.torch import load_file

    init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "init_scale": 2.0**120}))
    out = train(run_config(workdir, "fp16-overflow", "max_steps=3", "eval=null", "fp16=true", "learning_rate=1e-3",
                           "warmup_steps=2", "logging_steps=1"))
    rows = train_rows(out)
    assert [r["learning_rate"] for r in rows] == [0.0, 0.0, 0.0]  # warmup never moved past its first step
    assert all("grad_norm" not in r for r in rows)
    start, end = load_file(workdir / "model" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_fp16_resume_restores_the_loss_scale(workdir, monkeypatch):
    """The scale grows 256x after every step taken, so by step 3 it overflows: a resumed run must
    start step 3 from the checkpointed scale (and skip it too), not from the initial one."""
    init = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "growth_factor": 256.0, "growth_interval": 1}))
    run_dir = train(run_config(workdir, "fp16-resume", "save_steps=2", "fp16=true", "eval=null"))
    assert (run_dir / "checkpoints" / "step-2" / "scaler.pt").is_file()
    uninterrupted = train_rows(run_dir)
    assert "grad_norm" in uninterrupted[0] and "grad_norm" not in uninterrupted[2]  # step 3 overflowed
    train(run_config(workdir, "fp16-resume", "save_steps=2", "fp16=true", "eval=null",
                     f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    resumed = train_rows(run_dir)
    assert [set(r) for r in resumed] == [set(r) for r in uninterrupted]
    for a, b in zip(uninterrupted, resumed, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "learning_rate"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-5), (a["step"], key)
    # a checkpoint without a loss scale (saved by a float32 run) resumes under fp16 from the initial scale,
    # which step 1 took without overflowing
    (run_dir / "checkpoints" / "step-2" / "scaler.pt").unlink()
    train(run_config(workdir, "fp16-resume", "save_steps=2", "fp16=true", "eval=null",
                     f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    assert "grad_norm" in train_rows(run_dir)[2]


def test_gradient_clipping_bounds_the_update(workdir):
    from safetensors.torch import load_file

    start = load_file(workdir / "model" / "model.safetensors")
    # plain SGD-like check is not possible with Adam; instead: clipping leaves the logged (pre-clip) norm
    # unchanged and changes the trajectory when the norm exceeds the threshold
    free = train_rows(train(run_config(workdir, "clip-off", "max_steps=3", "eval=null", "max_grad_norm=0")))
    clipped = train_rows(train(run_config(workdir, "clip-on", "max_steps=3", "eval=null", "max_grad_norm=1e-4")))
    assert free[0]["grad_norm"] == pytest.approx(clipped[0]["grad_norm"], rel=1e-5)
    assert free[0]["grad_norm"] > 1e-4
    assert free[2]["loss"] != pytest.approx(clipped[2]["loss"], abs=1e-6)
    assert start  # the starting weights exist and were the same for both runs


def test_weight_decay_and_adam_settings_reach_the_optimizer(workdir):
    from dpokit.train import _optimizer

    cfg = run_config(workdir, "unused", "weight_decay=0.05", "adam_beta1=0.8", "adam_beta2=0.95", "adam_epsilon=1e-6")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = _optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and len(no_decay["params"]) == 3  # biases and norm weights skip decay
    assert decay["betas"] == (0.8, 0.95) and decay["eps"] == 1e-6
    assert decay["fused"]  # torch's fused kernel, on the CPU as on CUDA
    # training on CUDA: fused, even while the parameters are still on the host (FSDP2 shards them there)
    assert all(group["fused"] for group in _optimizer(model, cfg, torch.device("cuda")).param_groups)


def test_the_fused_adamw_steps_as_the_one_tensor_at_a_time_adamw(workdir):
    """The fused CPU kernel is the same AdamW: three steps with decay land where torch's reference
    implementation (``foreach=False``) does, to float32 round-off."""
    from dpokit.train import _optimizer

    cfg = run_config(workdir, "unused", "weight_decay=0.1", "learning_rate=1e-2")
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    plain_model = copy.deepcopy(fused_model)
    fused = _optimizer(fused_model, cfg, torch.device("cpu"))
    plain = torch.optim.AdamW([
        {"params": [p for p in plain_model.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in plain_model.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=1e-2, foreach=False)
    start = copy.deepcopy(plain_model)
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0].get("fused")
    x = torch.randn(32, 8)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(fused_model.parameters(), start.parameters()))  # they moved


def _tensorboard_losses(run_dir) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "dpokit"))
    events.Reload()
    assert {"train/rewards/margins", "train/learning_rate"} <= set(events.Tags()["scalars"])  # named as TRL's runs
    return [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")]


def test_tensorboard_events_follow_the_rows_through_resume_and_overwrite(workdir):
    """TensorBoard (in output_dir/dpokit/) holds what metrics.jsonl holds: a run resumed from an earlier
    checkpoint drops the events after it (they were logged twice), one resumed into a new folder gets
    those before it, and starting over removes them."""
    pytest.importorskip("tensorboard")
    settings = ("max_steps=6", "eval=null", "report_to=tensorboard", "save_steps=3", "logging_steps=2")
    out = train(run_config(workdir, "tb", *settings))
    rows = [(r["step"], round(r["loss"], 6)) for r in train_rows(out)]
    assert [step for step, _ in rows] == [2, 4, 6]
    assert _tensorboard_losses(out) == rows
    train(run_config(workdir, "tb", *settings, f"resume_from_checkpoint={out / 'checkpoints' / 'step-3'}"))
    assert [(r["step"], round(r["loss"], 6)) for r in train_rows(out)] == rows
    assert sorted(_tensorboard_losses(out)) == rows  # steps 4 and 6 once, not twice
    # resumed at its last step, whose row was logged: nothing to redo, and that row's event stays
    train(run_config(workdir, "tb", *settings, f"resume_from_checkpoint={out / 'checkpoints' / 'step-6'}"))
    assert sorted(_tensorboard_losses(out)) == rows
    # resumed into a new folder: its events start with the rows the first run logged up to the checkpoint
    other = train(run_config(workdir, "tb-branch", *settings, f"resume_from_checkpoint={out / 'checkpoints' / 'step-3'}"))
    assert sorted(_tensorboard_losses(other)) == rows
    train(run_config(workdir, "tb", "max_steps=1", "eval=null", "report_to=tensorboard"))  # overwrites
    assert [step for step, _ in _tensorboard_losses(out)] == [1]


def test_a_diverged_run_writes_strict_json_and_says_so(workdir, capsys):
    """A loss that turns NaN is written as null (jq and strict readers refuse a bare NaN), and the
    summary says from which step, rather than showing the last finite loss. Evals are timed."""
    out = train(run_config(workdir, "nan", "max_steps=4", "learning_rate=100", "max_grad_norm=0", "eval_steps=2"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl")) for line in lines]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    first_bad = min(step for step, loss in losses.items() if loss is None)
    assert all(losses[step] is None for step in losses if step >= first_bad)
    assert all(r["eval/seconds"] > 0 for r in rows if "eval/loss" in r)
    items = summary_items(capsys.readouterr().out)
    assert items["train loss"] == f"non-finite since step {first_bad}"
    assert items["train accuracy"] == f"non-finite since step {first_bad}"  # not a real-looking 0
    assert float(items["wall time"].rstrip("s")) >= float(items["step time"].rstrip("s"))
    assert json.loads((out / "final" / "dpokit_step.json").read_text()) == {"step": 4}


def test_ddp_timeout_reaches_the_process_group(workdir, monkeypatch):
    """``run.ddp_timeout`` is what a launched run's collectives wait (tests/test_tiny.py's launched
    processes check the group itself); 0 is refused."""
    from dpokit import train as train_module
    from dpokit.config import ConfigError

    asked = []
    real = train_module.new_accelerator
    monkeypatch.setattr(train_module, "new_accelerator", lambda *a, **k: asked.append(a[0]) or real(*a, **k))
    train(run_config(workdir, "timeout", "ddp_timeout=7200", "max_steps=1"))
    assert asked == [7200]
    assert real().init_handler.timeout.total_seconds() == 1800  # dpokit's default, also for `dpokit eval`
    with pytest.raises(ConfigError, match="run.ddp_timeout must be at least 1, got 0"):
        run_config(workdir, "timeout", "ddp_timeout=0")


def test_missing_tracker_package_is_an_error_not_a_silent_no_op(monkeypatch):
    import importlib.util

    from dpokit.config import ConfigError
    from dpokit.train import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="report_to=wandb needs the 'wandb' package: pip install wandb"):
        check_trackers(["wandb"])


def test_too_little_data_for_one_batch_is_a_clear_error(workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"model.name_or_path={workdir / 'model'}", f"data.train={workdir / 'eval.jsonl'}",
              "per_device_train_batch_size=64", f"output_dir={workdir / 'toolittle'}", "progress_bar=false"])
    assert exit_info.value.code == 2
    assert "cannot fill one global batch" in capsys.readouterr().err


def test_cli_reports_config_errors_without_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "data.train=x.jsonl", "learning_rat=1e-5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dpokit: error: unknown config key 'learning_rat'") and "Traceback" not in err


def test_cli_reports_a_missing_model_clearly(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(SystemExit):
        main(["train", f"data.train={data}", f"model.name_or_path={tmp_path / 'no-such-model'}", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert f"no such folder: {tmp_path / 'no-such-model'} (model.name_or_path / MODEL argument" in err  # not a hub lookup


def test_overrides_reach_the_saved_config(workdir):
    out = train(run_config(workdir, "saved", "max_steps=1", "eval=null", "beta=0.25"))
    saved = load_config(out / "config.yaml")
    assert saved.loss.beta == 0.25 and saved.training.max_steps == 1


def test_activation_checkpointing_recomputes_layers_in_backward():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpokit.modeling import enable_activation_checkpointing

    def mlp_calls(checkpointing: bool) -> int:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        calls, mlp = [], model.model.layers[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
        model(torch.randint(0, 50, (2, 8))).logits.sum().backward()
        return len(calls)

    assert mlp_calls(False) == 1
    assert mlp_calls(True) == 2  # forward, then recomputed during backward


@pytest.mark.parametrize("padding_free,prefix_sharing,chunked_logps",
                         [(False, False, True), (True, False, True), (False, True, True), (True, True, False)])


def test_each_speed_switch_trains_identically(workdir, padding_free, prefix_sharing, chunked_logps):
    """Turning off packing, prefix sharing or chunked log-probs changes speed and memory, not numbers."""
    default = train_rows(train(run_config(workdir, "layout-default", "max_steps=3")))  # packed + prefix-shared
    switches = dict(padding_free=padding_free, prefix_sharing=prefix_sharing, chunked_logps=chunked_logps)
    other = train(run_config(workdir, "switches-" + "-".join(str(v) for v in switches.values()), "max_steps=3",
                             *(f"{k}={str(v).lower()}" for k, v in switches.items())))
    for a, b in zip(default, train_rows(other), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
    # padding-free layouts process fewer tokens for the same pairs
    assert (train_rows(other)[0]["tokens"] > default[0]["tokens"]) == (not prefix_sharing)


def test_logps_chunk_size_sizes_the_output_layer_chunks(workdir, monkeypatch):
    """Every reply-token log-prob of the run (reference, training, eval) goes through the output layer
    in chunks of the configured size, and the numbers are those of the default size."""
    import dpokit.logps

    sizes = []
    real = dpokit.logps.token_logps_and_statistics
    monkeypatch.setattr(dpokit.logps, "token_logps_and_statistics",
                        lambda hidden, head, targets, chunk_size, *a: sizes.append(chunk_size) or real(hidden, head, targets, chunk_size, *a))
    small = train_rows(train(run_config(workdir, "chunk-16", "max_steps=2", "logps_chunk_size=16")))
    assert sizes and set(sizes) == {16}
    sizes.clear()
    default = train_rows(train(run_config(workdir, "chunk-default", "max_steps=2")))
    assert set(sizes) == {1024}
    for a, b in zip(small, default):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_precomputed_reference_equals_live_reference(workdir):
    live = read_rows(train(run_config(workdir, "ref-live", "max_steps=3", "precompute_ref_log_probs=false", "eval_steps=3")))
    cached = read_rows(train(run_config(workdir, "ref-table", "max_steps=3", "eval_steps=3")))
    for a, b in zip(live, cached, strict=True):
        for key in a:
            if key.split("/")[-1] in ("loss", "margins", "chosen", "rejected", "accuracies"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_reference_tables_are_cached_and_keyed_by_data(workdir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    train(run_config(workdir, "refcache-1", "max_steps=1"))
    assert "reference: train log-probs of 48 pairs computed" in capsys.readouterr().out
    train(run_config(workdir, "refcache-2", "max_steps=1"))
    assert "reference: train log-probs of 48 pairs loaded from" in capsys.readouterr().out
    train(run_config(workdir, "refcache-3", "max_steps=1", "max_length=40"))  # other tokens: a miss
    assert "reference: train log-probs of 48 pairs computed" in capsys.readouterr().out
    # float32 scores alike in any batches; 16-bit compute does not: there the batching is in the key
    train(run_config(workdir, "refcache-4", "max_steps=1", "per_device_train_batch_size=2"))
    assert "reference: train log-probs of 48 pairs loaded from" in capsys.readouterr().out
    for changed, seen in ((["per_device_train_batch_size=4"], "computed"), (["per_device_train_batch_size=2"], "computed"),
                          (["per_device_train_batch_size=2"], "loaded from"), (["seed=4"], "computed"),
                          (["prefix_sharing=false"], "computed"), (["max_length=120"], "computed")):
        train(run_config(workdir, "refcache-bf16", "max_steps=1", "bf16=true", "per_device_train_batch_size=2", *changed))
        assert f"reference: train log-probs of 48 pairs {seen}" in capsys.readouterr().out, (changed, seen)
    # bfloat16 weights compute in 16 bits without autocast: their batching is in the key too
    for batch in ("2", "4"):
        train(run_config(workdir, "refcache-bf16-weights", "max_steps=1", "data.eval=null", "max_length=40", "dtype=bfloat16",
                         f"per_device_train_batch_size={batch}"))
        assert "reference: train log-probs of 48 pairs computed" in capsys.readouterr().out, batch


class OneProcess:
    """What :func:`dpokit.reference.cached_table` asks of an Accelerator, for one process."""

    num_processes, is_local_main_process, device = 1, True, torch.device("cpu")

    def wait_for_everyone(self):
        pass


def test_reference_table_cache_survives_damage_read_only_disks_and_new_code(monkeypatch, tmp_path):
    """A damaged table is scored again (it was a traceback); a cache that cannot be written leaves the
    run its table (it was an error after the whole pass); a table scored by other code, by another
    reference, or of another shape is not read."""
    from dpokit import reference
    from dpokit.data.tokenize import TokenizedPair

    pairs = [TokenizedPair([1, 2], [3], [4, 5])]
    scored, said = [], []

    def compute():
        scored.append(1)
        return torch.tensor([[-1.5, -2.5]])

    def table():
        return reference.cached_table("model", pairs, compute, OneProcess(), "train", log=said.append)

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    assert table().tolist() == [[-1.5, -2.5]] and len(scored) == 1
    assert table().tolist() == [[-1.5, -2.5]] and len(scored) == 1 and "loaded from" in said[-1]
    (stored,) = (tmp_path / "cache" / "reference").iterdir()
    stored.write_bytes(stored.read_bytes()[:40])  # a damaged file
    assert table().tolist() == [[-1.5, -2.5]] and len(scored) == 2 and "computed" in said[-1]
    assert table().tolist() == [[-1.5, -2.5]] and len(scored) == 2  # and replaced
    torch.save(torch.zeros(3, 2), stored)  # a table, but not of these pairs' shape
    assert table().tolist() == [[-1.5, -2.5]] and len(scored) == 3 and "computed" in said[-1]
    reference.cached_table("another model", pairs, compute, OneProcess(), "train", log=said.append)
    assert len(scored) == 4 and "computed" in said[-1]  # another reference's table is not read back
    for second in (TokenizedPair([1, 2], [3], [4, 6]), TokenizedPair([1, 2], [3], [4, 7])):  # the same first pair
        reference.cached_table("model", pairs + [second], lambda: torch.zeros(2, 2), OneProcess(), "train", log=said.append)
        assert "computed" in said[-1]  # other pairs, another table
    monkeypatch.setattr(reference, "scoring_code", lambda: "another release")
    table()
    assert len(scored) == 5 and "computed" in said[-1]
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made
    assert table().tolist() == [[-1.5, -2.5]] and len(scored) == 6
    assert "not cached (" in said[-1] and "set DPOKIT_CACHE to a writable folder" in said[-1]


def test_scoring_code_hash_sees_every_module_and_the_releases(monkeypatch, tmp_path):
    """A fix anywhere in dpokit (a subpackage's module too), or another torch, transformers or peft
    release, may score otherwise: the tables it scored are not read back."""
    import importlib.metadata
    import shutil
    from pathlib import Path

    from dpokit import reference

    package = tmp_path / "dpokit"
    shutil.copytree(Path(reference.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        monkeypatch.setattr(reference, "__file__", str(package / "reference.py"))
        reference.scoring_code.cache_clear()
        seen = {reference.scoring_code()}
        for module in (package / "data" / "batching.py", package / "logps.py"):
            module.write_text(module.read_text().replace("return", "return  ", 1))  # a changed line
            reference.scoring_code.cache_clear()
            seen.add(reference.scoring_code())
        version = importlib.metadata.version
        for name in ("torch", "transformers", "peft"):
            monkeypatch.setattr(importlib.metadata, "version", lambda of, name=name: "0.0.1" if of == name else version(of))
            reference.scoring_code.cache_clear()
            seen.add(reference.scoring_code())
        assert len(seen) == 6
    finally:
        monkeypatch.undo()
        reference.scoring_code.cache_clear()


def test_reference_table_drops_the_forwards_that_only_keep_processes_in_step(monkeypatch):
    """Sharded, a process with fewer batches than another runs forwards of pair 0 only to keep in step,
    and drops their results: pair 0 keeps the score of its own batch (in 16 bits, another batch's
    last bits differ; the scorer here makes that plain: each sequence scores minus the batch's size)."""
    from dpokit import reference
    from dpokit.data.batching import make_batch
    from dpokit.data.tokenize import TokenizedPair

    pairs = [TokenizedPair([1, 2], [3], [4, 5]), TokenizedPair([1], [6, 7], [8])]
    monkeypatch.setattr(reference, "in_lockstep", lambda batches, accelerator, model: iter([([0, 1], True), ([0], False)]))

    def scorer(num_seqs, **inputs):
        return torch.full((num_seqs,), -float(num_seqs))

    table = reference.compute_table(scorer, pairs, lambda chosen: make_batch(chosen, "padded"), [[0, 1]], OneProcess())
    assert table.tolist() == [[-4.0, -4.0], [-4.0, -4.0]]


def test_a_bare_scorer_is_a_live_reference_scored_without_gradients():
    """A bare :class:`ReplyLogProbs` given as the reference scores live, as itself, and keeps no graph
    even where its weights would train."""
    from dpokit.data.batching import make_batch
    from dpokit.logps import ReplyLogProbs
    from dpokit.reference import as_reference
    from test_logps import naive_logps, ragged_pairs, tiny_lm

    model, pairs = tiny_lm(), ragged_pairs(n=2)
    assert all(p.requires_grad for p in model.parameters())
    logps = as_reference(ReplyLogProbs(model)).logps(make_batch(pairs, "packed"), [0, 1])
    assert not logps.requires_grad  # no graph kept for numbers that are never differentiated
    with torch.no_grad():
        torch.testing.assert_close(logps, naive_logps(model, pairs), atol=1e-4, rtol=0)


def test_a_table_that_cannot_be_stored_leaves_no_temporary_file(tmp_path):
    """The table goes through a temporary file beside its place; where it cannot take that place
    (here a folder holds it), the error reaches the caller and the temporary file is gone."""
    from dpokit.reference import _write_table

    (tmp_path / "key.pt" / "in-the-way").mkdir(parents=True)
    with pytest.raises(OSError):
        _write_table(torch.zeros(2, 2), tmp_path / "key.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pt"]


def test_pairs_fingerprint_sees_where_each_part_ends():
    """The same ids split otherwise between prompt and replies score otherwise: another table."""
    from dpokit.data.tokenize import TokenizedPair
    from dpokit.reference import fingerprint_pairs

    base = fingerprint_pairs([TokenizedPair([1, 2], [3, 4], [5])])
    assert base == fingerprint_pairs([TokenizedPair([1, 2], [3, 4], [5])])
    for moved in (TokenizedPair([1], [2, 3, 4], [5]), TokenizedPair([1, 2, 3], [4], [5]), TokenizedPair([1, 2], [3], [4, 5]),
                  TokenizedPair([1, 2], [3, 4], [6])):  # the last: another rejected reply
        assert fingerprint_pairs([moved]) != base, moved
    assert fingerprint_pairs([TokenizedPair([1, 2], [3, 4], [5])] * 2) != base


def test_reference_fingerprint_sees_the_config_and_every_buffer(tmp_path):
    """rope_theta, rms_norm_eps, logit soft-capping live in the config (and non-persistent buffers),
    not in the saved weights: a changed one used to read the old table back."""
    from transformers import AutoModelForCausalLM

    from dpokit.reference import fingerprint_model
    from test_logps import tiny_of

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1,
                                                                  num_attention_heads=2, num_key_value_heads=1))
    base = fingerprint_model(model)
    model.config._name_or_path = "somewhere/else"
    assert fingerprint_model(model) == base  # where it was read from does not score
    eps, model.config.rms_norm_eps = model.config.rms_norm_eps, 0.1
    assert fingerprint_model(model) != base
    model.config.rms_norm_eps = eps
    assert fingerprint_model(model) == base
    model.config._attn_implementation, attn = "eager", model.config._attn_implementation
    assert attn != "eager" and fingerprint_model(model) != base  # other kernels: other last bits in 16 bits
    model.config._attn_implementation = attn
    assert fingerprint_model(model) == base
    norm = model.model.norm.weight.data
    assert torch.equal(norm, torch.ones_like(norm))
    norm[:2] = torch.tensor([2.0, 0.0])  # another model, with the same sum (and mean) of weights
    assert fingerprint_model(model) != base
    norm.fill_(1.0)
    assert fingerprint_model(model) == base
    (name, buffer), *_ = [(n, b) for n, b in model.named_buffers() if n not in model.state_dict()]
    buffer.mul_(2)  # a non-persistent buffer (rotary inv_freq)
    assert fingerprint_model(model) != base, name
    gemma2 = tiny_of("gemma2", "eager", head_dim=8, final_logit_softcapping=30.0)
    capped = fingerprint_model(gemma2)
    gemma2.config.final_logit_softcapping = 20.0
    assert fingerprint_model(gemma2) != capped


def test_adapters_off_fingerprint_is_the_bases_and_switching_them_off_keeps_them_training(tmp_path):
    """A peft model with its adapters off scores as its base: its fingerprint is the base's (LoRA
    tensors, the trained copies of modules to save and peft's renaming left out), whatever the
    adapters and the trained copies hold. Switched off for a reference pass, the adapters stay
    marked as training and nothing else is (FSDP2 picks its gradient dtypes from what trains at its first
    forward; peft 0.13 marks the tied embedding, the original of the saved lm_head, trainable while off)."""
    import peft
    from transformers import AutoModelForCausalLM

    from dpokit.logps import ReplyLogProbs
    from dpokit.reference import adapters_switched_off, fingerprint_model

    folder = build_tiny_model(tmp_path / "m", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    base = fingerprint_model(plain)
    model = peft.get_peft_model(copy.deepcopy(plain), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    assert fingerprint_model(model, adapters_off=True) == base
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any(".modules_to_save." in n for n in trained)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.add_(0.5)  # as training leaves them
    assert fingerprint_model(model, adapters_off=True) == base
    with adapters_switched_off(ReplyLogProbs(model)):
        assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained


def test_sixteen_bit_tables_of_compiled_and_eager_layers_are_kept_apart(workdir, capsys, monkeypatch, tmp_path):
    """In 16 bits compiled layers round differently: a compiled run's reference table is its own (with
    an eager run's, its first rewards were not 0). float32 tables are shared."""
    import dpokit.train

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dpokit.train, "compile_layers", lambda model: None)  # the key is the point, not the compile
    for precision, second in ((["bf16=true"], "computed"), ([], "loaded from")):
        for compiled in ("false", "true"):
            capsys.readouterr()
            train(run_config(workdir, "compiled-table", *precision, "max_steps=1", "eval=null", f"torch_compile={compiled}"))
        assert f"reference: train log-probs of 48 pairs {second}" in capsys.readouterr().out  # the compiled run's


def test_lora_reference_is_the_base_for_any_seed_and_after_resuming(workdir, capsys, monkeypatch, tmp_path):
    """Fresh adapters leave the base as it was: the table is keyed by the base (not the adapters'
    random init, so another seed reads it back), and a resumed run scores it with the policy's
    adapters off instead of loading the base a second time."""
    import dpokit.train
    from runs import LORA

    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))
    run_dir = train(run_config(workdir, "lora-ref", *LORA, "save_steps=2"))
    assert "reference: train log-probs of 48 pairs computed" in capsys.readouterr().out
    train(run_config(workdir, "lora-ref-seed", *LORA, "max_steps=1", "seed=4"))
    assert "reference: train log-probs of 48 pairs loaded from" in capsys.readouterr().out

    def no_second_model(*args, **kwargs):
        raise AssertionError("a reference model was loaded")

    monkeypatch.setattr(dpokit.train, "load_reference", no_second_model)
    uninterrupted = train_rows(run_dir)
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "other-cache"))  # scored again, adapters off
    train(run_config(workdir, "lora-ref", *LORA, "save_steps=2", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    assert "reference: train log-probs of 48 pairs computed" in capsys.readouterr().out
    for a, b in zip(uninterrupted, train_rows(run_dir), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_precomputed_reference_never_copies_the_policy(workdir, monkeypatch):
    import dpokit.train

    def no_second_model(*args, **kwargs):
        raise AssertionError("a reference model was loaded or copied")

    monkeypatch.setattr(dpokit.train, "load_reference", no_second_model)
    rows = train_rows(train(run_config(workdir, "ref-nocopy", "max_steps=2")))
    assert rows[0]["rewards/margins"] == 0.0  # step 1: the policy is still the reference


@pytest.mark.parametrize("checkpointing", [False, True])
def test_torch_compile_trains_the_same(workdir, checkpointing):
    """Compiled layers train as eager ones do, also under activation checkpointing (which recomputes
    each compiled layer in the backward)."""
    from torch._dynamo.utils import counters

    options = ("max_steps=2", "eval=null", f"gradient_checkpointing={str(checkpointing).lower()}")
    eager = train_rows(train(run_config(workdir, f"compile-off-{checkpointing}", *options)))
    torch._dynamo.reset()  # compile anew: another case's graphs may fit this one's guards
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = train_rows(train(run_config(workdir, f"compile-on-{checkpointing}", *options, "torch_compile=true")))
    assert counters["stats"]["unique_graphs"] > graphs_before, "nothing was compiled"
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-3)


def test_a_compiled_16_bit_run_resumes_exactly(workdir, capsys):
    """In 16 bits compiled layers score a little differently from eager ones: a resumed run's reference
    (the starting model, loaded apart) is compiled too, so its table is the one the run started with
    (read from the cache) and the resumed steps repeat the uninterrupted ones exactly."""
    options = ("max_steps=4", "save_steps=2", "bf16=true", "torch_compile=true", "data.eval=null")
    torch._dynamo.reset()
    run_dir = train(run_config(workdir, "compiled-resume", *options))
    uninterrupted = train_rows(run_dir)
    capsys.readouterr()
    train(run_config(workdir, "compiled-resume", *options, f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    assert "reference: train log-probs of 48 pairs loaded from" in capsys.readouterr().out
    for a, b in zip(uninterrupted, train_rows(run_dir), strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)


def test_torch_compile_compiles_each_decoder_layer():
    """Layer by layer (the classes ``_no_split_modules`` names), under a peft wrapper too; a model
    naming no layer classes has its decoder compiled whole."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpokit.modeling import compile_layers

    peft = pytest.importorskip("peft")
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1)

    def compiled(model):
        return {name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None}

    model = Qwen2ForCausalLM(config)
    assert compile_layers(model) == 3
    assert compiled(model) == {"model.layers.0", "model.layers.1", "model.layers.2"}
    adapted = peft.get_peft_model(Qwen2ForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert compile_layers(adapted) == 3
    assert compiled(adapted) == {f"base_model.model.model.layers.{i}" for i in range(3)}
    unnamed = Qwen2ForCausalLM(config)
    unnamed._no_split_modules = None
    assert compile_layers(unnamed) == 1 and compiled(unnamed) == {"model"}


def test_training_keeps_sdpa_off_cudnn_and_restores_it(workdir, monkeypatch):
    """Every forward (precompute, steps, eval) runs with sdpa's cuDNN backend off (a plan per new
    row length, host-bound on GPUs); the process's setting comes back afterwards."""
    import dpokit.train

    seen = []

    def recording(function):
        def call(*args, **kwargs):
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())
            return function(*args, **kwargs)
        return call

    for name in ("score_batch", "compute_table"):
        monkeypatch.setattr(dpokit.train, name, recording(getattr(dpokit.train, name)))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    train(run_config(workdir, "no-cudnn", "max_steps=2", "eval_steps=1"))
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_training_steps_run_in_training_mode_and_evaluation_in_eval_mode(workdir, monkeypatch):
    """The reference pass and each eval put the policy in eval mode and give it back in training mode:
    left in eval mode, every step after trained with its dropout (LoRA's) silently off."""
    import dpokit.train

    modes = []
    real = dpokit.train.score_batch

    def recording(policy, *args):
        modes.append((torch.is_grad_enabled(), policy.training))
        return real(policy, *args)

    monkeypatch.setattr(dpokit.train, "score_batch", recording)
    train(run_config(workdir, "train-mode", "max_steps=2", "eval_steps=1", "eval_on_start=true"))
    assert {training for grad, training in modes if grad} == {True}  # the 2 steps' forwards
    assert {training for grad, training in modes if not grad} == {False}  # the 3 evals' forwards


@pytest.mark.parametrize("loss, loss_of_rewards", [
    ("apo_zero", lambda c, r: 1 - 1 / (1 + math.exp(-c)) + 1 / (1 + math.exp(-r))),
    ("bco_pair", lambda c, r: math.log1p(math.exp(-c)) + math.log1p(math.exp(r))),
    ("sppo_hard", lambda c, r: (c / 0.5 - 1.0) ** 2 + (r / 0.5 + 1.0) ** 2),  # (c/β - 1/(2β))², β = 0.5
    # f-DPO, forward KL: -log σ(β[(1 - e^(-c/β)) - (1 - e^(-r/β))])
    ("sigmoid f_divergence_type=forward_kl", lambda c, r: math.log1p(math.exp(-0.5 * (math.exp(-r / 0.5) - math.exp(-c / 0.5))))),
])
def test_a_run_trains_with_the_loss_of_its_rewards(workdir, loss, loss_of_rewards):
    """One pair per step: each logged row's loss is the loss of that row's logged rewards β·c and β·r,
    so the real loop hands the configured loss each reply's own log-ratio (reward chosen, rejected)."""
    loss_type, *settings = loss.split()
    rows = train_rows(train(run_config(workdir, f"loss-{loss_type}", f"loss_type=[{loss_type}]", *settings, "beta=0.5",
                                       "per_device_train_batch_size=1", "max_steps=3", "eval=null")))
    assert len(rows) == 3
    for row in rows:
        assert row["loss"] == pytest.approx(loss_of_rewards(row["rewards/chosen"], row["rewards/rejected"]), rel=1e-4, abs=1e-5)
    assert rows[-1]["rewards/chosen"] != 0.0  # trained: the policy moved from the reference


def test_a_wpo_run_weighs_each_logged_loss_by_its_logged_weight(workdir):
    """One pair per step, WPO on: each row's loss is its logged weight times DPO's loss of its logged
    rewards, and the weights differ from 1 (a random-weight model writes neither reply itself)."""
    rows = train_rows(train(run_config(workdir, "loss-wpo", "use_weighting=true", "beta=0.5",
                                       "per_device_train_batch_size=1", "max_steps=3", "eval=null")))
    assert len(rows) == 3
    for row in rows:
        dpo = math.log1p(math.exp(-(row["rewards/chosen"] - row["rewards/rejected"])))
        assert row["loss"] == pytest.approx(row["wpo/weight"] * dpo, rel=1e-4, abs=1e-7)
        assert 0 < row["wpo/weight"] and row["wpo/weight"] != pytest.approx(1.0, abs=1e-3)
