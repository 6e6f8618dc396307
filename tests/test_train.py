"""End-to-end training runs with a tiny model built in the test."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpokit.cli import main
from dpokit.train import train
from runs import LORA, METRIC_KEYS, accelerate_launch, read_rows, run_args, run_config, summary_items, train_rows


def test_run_directory_is_complete(workdir, capsys):
    out = train(run_config(workdir, "full", "save_steps=2", "save_total_limit=1", "eval_steps=2", "plots=true"))
    rows = read_rows(out)
    trained = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    assert METRIC_KEYS <= set(trained[0])
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/logps/chosen"} <= set(eval_rows[0])
    assert [r["epoch"] for r in eval_rows] == [round(2 / 12, 4), round(4 / 12, 4)]  # 48 pairs / 4 a step: 12 steps an epoch
    assert all(r["tokens"] > 0 and r["tokens_per_second"] > 0 for r in trained)
    # the host's peak resident memory so far (the process's, this test session's included); no device peak on a CPU
    peaks = [r["memory/host_peak_gib"] for r in trained]
    assert peaks == sorted(peaks) and peaks[0] > 0.1 and not any("memory/device_peak_gib" in r for r in rows)
    # checkpoints: newest only (limit 1; the last step is saved too), complete, loadable
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-4"]
    for name in ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pt"):
        assert (out / "checkpoints" / "step-4" / name).is_file(), name
    assert (out / "config.yaml").is_file()
    sources = json.loads((out / "data.json").read_text())  # what became of each dataset
    assert set(sources) == {"train", "eval"} and sources["train"]["tokenize"]["kept"] > 0 and sources["train"]["format"]
    for name in ("loss.png", "rewards_accuracies.png", "rewards_margins.png", "rewards_chosen_rejected.png", "logps_chosen_rejected.png"):
        assert (out / "plots" / name).is_file(), name
    run = json.loads((out / "run.json").read_text())  # what the config came to here, and where the time went
    shape = ("processes", "device", "global_batch", "train_pairs", "left_out_per_epoch", "eval_pairs", "eval_held_out",
             "steps_per_epoch", "total_steps")
    assert [run[k] for k in shape] == [1, "cpu", 4, 48, 0, 12, 0, 12, 4]
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["dpokit"]
    (session,) = run["sessions"]
    assert session["finished"] and (session["from_step"], session["to_step"]) == (0, 4)
    assert session["wall_seconds"] > session["reference_seconds"] > 0
    summary = summary_items(capsys.readouterr().out)
    assert summary["global batch"] == "4 pairs = 4 x 1 processes x 1 accumulation" and summary["pairs"] == "48 train, 12 eval"
    assert summary["final model"] == str(out / "final") and summary["plots"] == str(out / "plots")
    # `dpokit report` draws them again from metrics.jsonl and prints the same summary
    shutil.rmtree(out / "plots")
    main(["report", str(out)])
    assert summary_items(capsys.readouterr().out) == summary  # its wall time too, from run.json
    assert (out / "plots" / "overview.png").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    assert (out / "final" / "generation_config.json").is_file()
    assert model(torch.tensor([tokenizer("hello")["input_ids"]])).logits.isfinite().all()
    start = load_file(workdir / "model" / "model.safetensors")
    end = load_file(out / "final" / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start), "training changed no weight"


def test_gradient_accumulation_equals_larger_batch(workdir):
    big = train(run_config(workdir, "accum1", "per_device_train_batch_size=4", "gradient_accumulation_steps=1"))
    small = train(run_config(workdir, "accum2", "per_device_train_batch_size=2", "gradient_accumulation_steps=2"))
    assert not (big / "plots").exists()  # plots=false (tests.runs' default)
    a, b = train_rows(big), train_rows(small)
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra["step"], key)
        assert ra["tokens"] == rb["tokens"], ra["step"]  # every micro-batch's tokens counted
    # Adam divides by sqrt(v): entries with near-zero gradients turn round-off into visible
    # differences, so weights agree to a tenth of one step (lr 1e-3); grad_norm above is the sharp check
    wa, wb = load_file(big / "final" / "model.safetensors"), load_file(small / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=0)


@pytest.mark.parametrize("loss_type", ["[sigmoid,sft]", "[simpo]", "[ipo]", "[hinge]", "[robust]"])
def test_every_loss_trains(workdir, loss_type):
    out = train(run_config(workdir, f"loss-{loss_type.strip('[]').replace(',', '-')}", f"loss_type={loss_type}",
                           "max_steps=2", "label_smoothing=0.1" if "robust" in loss_type else "beta=0.1"))
    rows = train_rows(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if loss_type == "[sigmoid,sft]":  # a combined loss logs each part, in training and eval
        assert all(r["loss"] == pytest.approx(r["loss/sigmoid"] + r["loss/sft"], rel=1e-5) for r in rows)
        evals = [r for r in read_rows(out) if "eval/loss" in r]
        assert evals[-1]["eval/loss"] == pytest.approx(evals[-1]["eval/loss/sigmoid"] + evals[-1]["eval/loss/sft"], rel=1e-5)
    else:
        assert not any(k.startswith("loss/") for k in rows[0])


def test_resume_continues_exactly(workdir):
    run_dir = train(run_config(workdir, "resume", "save_steps=2", "eval_on_start=true"))
    uninterrupted = train_rows(run_dir)
    optimizer_file = run_dir / "checkpoints" / "step-2" / "optimizer.pt"
    saved = optimizer_file.read_bytes()
    # resume from the step-2 checkpoint, as a run killed after step 2 would; steps 3-4 are redone
    train(run_config(workdir, "resume", "save_steps=2", "eval_on_start=true", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    assert optimizer_file.read_bytes() == saved  # the state was mapped from it, and stepped in a copy
    resumed = train_rows(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["step"] for r in read_rows(run_dir) if "eval/loss" in r] == [0, 4]  # the start's eval once: a resume is no start
    sessions = json.loads((run_dir / "run.json").read_text())["sessions"]  # the first run's time is kept
    assert [(s["from_step"], s["to_step"], s["finished"]) for s in sessions] == [(0, 4, True), (2, 4, True)]
    for ra, rb in zip(uninterrupted, resumed, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "learning_rate"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)


def test_a_run_resumed_into_a_new_folder_starts_with_the_rows_before_its_checkpoint(workdir, capsys):
    """Resumed from another run's checkpoint, a new output_dir's metrics.jsonl (and so its summary and
    plots) holds the whole run: the first run's rows up to the checkpoint, then its own, as an
    uninterrupted run's. A checkpoint taken out of its run's folder has no rows to bring: the log says so."""
    first = train(run_config(workdir, "branch-from", "save_steps=2", "eval_on_start=true", "eval_steps=2"))
    step2 = first / "checkpoints" / "step-2"
    capsys.readouterr()
    branch = train(run_config(workdir, "branch-to", "save_steps=2", "eval_on_start=true", "eval_steps=2",
                              f"resume_from_checkpoint={step2}"))
    printed = capsys.readouterr().out
    assert f"metrics.jsonl starts with the 4 rows {first.resolve() / 'metrics.jsonl'} logged up to step 2\n" in printed
    assert summary_items(printed)["wall time"].endswith("(from step 2: the steps before ran in another folder)")
    main(["report", str(first)])
    assert "another folder" not in summary_items(capsys.readouterr().out)["wall time"]
    uninterrupted, resumed = read_rows(first), read_rows(branch)
    assert [(r["step"], "eval/loss" in r) for r in resumed] == [(r["step"], "eval/loss" in r) for r in uninterrupted]
    for ra, rb in zip(uninterrupted, resumed, strict=True):
        key = "eval/loss" if "eval/loss" in ra else "loss"
        assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)
    assert [s["from_step"] for s in json.loads((branch / "run.json").read_text())["sessions"]] == [2]
    loose = workdir / "loose" / "step-2"
    shutil.copytree(step2, loose)
    train(run_config(workdir, "branch-loose", "save_steps=2", f"resume_from_checkpoint={loose}"))
    assert f"note: metrics.jsonl starts after step 2: {loose} is not in a run's checkpoints/ folder" in capsys.readouterr().out
    assert [r["step"] for r in train_rows(workdir / "branch-loose")] == [3, 4]


def test_resume_continues_dropout_exactly(workdir):
    """Dropout draws from the random state: the checkpoint's is restored, so the resumed steps draw
    the masks the uninterrupted run drew (from the seed alone they draw others)."""
    dropout = (*LORA[:3], "lora_dropout=0.3", *LORA[4:])
    run_dir = train(run_config(workdir, "resume-dropout", *dropout, "save_steps=2"))
    uninterrupted = train_rows(run_dir)
    train(run_config(workdir, "resume-dropout", *dropout, "save_steps=2", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    for ra, rb in zip(uninterrupted, train_rows(run_dir), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6) and ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5), ra["step"]


def test_the_log_says_how_many_pairs_each_epoch_leaves_out(workdir, capsys):
    out = train(run_config(workdir, "tail", "per_device_train_batch_size=7", "max_steps=1"))
    # 48 pairs in global batches of 7: 6 steps (42 pairs), 6 left out
    assert ("training: 48 pairs, 6 steps/epoch, 1 steps, global batch 7 = 7 x 1 processes x 1 accumulation; "
            "each epoch leaves out 6 pairs (its shuffled tail, short of a global batch)\n") in capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert (run["left_out_per_epoch"], run["steps_per_epoch"], run["global_batch"]) == (6, 6, 7)


def test_resume_refuses_a_position_that_means_other_pairs(workdir, capsys):
    """A checkpoint's place in the data counts global batches of the run that wrote it: resumed with
    another global batch (e.g. on another number of processes), other training pairs (as many, other
    ones) or another seed (each epoch's shuffle), it trained some pairs twice and others never, silently."""
    run_dir = train(run_config(workdir, "resume-other-batch", "save_steps=2"))
    step = run_dir / "checkpoints" / "step-2"
    other = workdir / "other-48.jsonl"  # as many pairs, other ones
    other.write_text("".join([(workdir / "eval.jsonl").read_text()] * 4))
    for changes, said in ((["per_device_train_batch_size=2"], "was trained with a global batch of 4 pairs; this run's "
                                                               "is 2 (2 x 1 processes x 1 accumulation)"),
                          (["data.eval=null", "eval_fraction=0.25"], "was trained on 48 training pairs; this run has 36"),
                          ([f"data.train={other}"], "was trained on other training pairs than this run's 48"),
                          (["seed=4"], "was trained with seed 3, which each epoch's shuffle is drawn from; this run's is 4")):
        with pytest.raises(SystemExit) as e:
            main(["train", *run_args(workdir, "resume-other-batch", "save_steps=2", *changes, f"resume_from_checkpoint={step}")])
        assert e.value.code == 2 and f"{step} {said}" in capsys.readouterr().err
    # the same global batch made another way resumes
    train(run_config(workdir, "resume-other-batch", "save_steps=2", "per_device_train_batch_size=2",
                     "gradient_accumulation_steps=2", f"resume_from_checkpoint={step}"))
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4]
    # a checkpoint of an older dpokit, which kept none of these, resumes; its next checkpoint keeps this run's
    saved = json.loads((step / "trainer_state.json").read_text())
    kept = {key: saved.pop(key) for key in ("global_batch", "train_pairs", "seed", "pairs_digest")}
    assert kept["global_batch"] == 4 and kept["train_pairs"] == 48 and kept["seed"] == 3 and kept["pairs_digest"]
    (step / "trainer_state.json").write_text(json.dumps(saved))
    train(run_config(workdir, "resume-other-batch", "save_steps=2", f"resume_from_checkpoint={step}"))
    newer = json.loads((run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert {key: newer[key] for key in kept} == kept


def test_a_run_refused_at_start_leaves_the_folder_as_it_was(workdir):
    """A resume refused for its global batch, or a new run over an old one whose data path has a typo:
    the earlier run's checkpoints, final/, metrics and config.yaml stay (they were removed or
    rewritten before the checks that refused the run)."""
    run_dir = train(run_config(workdir, "refused", "save_steps=1"))

    def files():
        return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")}

    before = files()
    assert "checkpoints/step-3" in before and "final" in before
    for changes in (["per_device_train_batch_size=2", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-1'}"],
                    ["overwrite_output_dir=true", f"data.train={workdir / 'missing.jsonl'}"]):
        with pytest.raises(SystemExit) as e:
            main(["train", *run_args(workdir, "refused", "save_steps=1", *changes)])
        assert e.value.code == 2 and files() == before


def test_a_resumed_run_follows_its_own_learning_rate_and_schedule(workdir):
    """Resumed with a longer max_steps, the rates are those of a run planned that long from the start
    (the first resumed step kept the old schedule's); with another learning_rate and schedule, those
    (the old peak rate stayed for good)."""
    schedule = ("lr_scheduler_type=cosine", "warmup_ratio=0.1", "save_steps=2", "save_total_limit=3")
    run_dir = train(run_config(workdir, "lr-resume", "max_steps=4", *schedule))
    planned = train_rows(train(run_config(workdir, "lr-planned", "max_steps=6", *schedule)))
    step2 = f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"
    train(run_config(workdir, "lr-resume", "max_steps=6", *schedule, step2))
    rates = [r["learning_rate"] for r in train_rows(run_dir)]
    assert rates[2:] == pytest.approx([r["learning_rate"] for r in planned[2:]], rel=1e-12)
    assert rates[2] != pytest.approx(planned[0]["learning_rate"])  # the schedule moved on
    train(run_config(workdir, "lr-resume", "max_steps=6", *schedule, "learning_rate=1e-2", "lr_scheduler_type=constant", step2))
    assert [r["learning_rate"] for r in train_rows(run_dir)][2:] == [1e-2] * 4


def test_a_resumed_run_follows_its_own_optimizer_settings(workdir):
    """The checkpoint's optimizer state brings its weight decay, betas and epsilon: a run resumed with
    others trains with them (they were silently the checkpoint's), the decay on the decayed group only."""
    from dpokit.train import _optimizer, follow_optimizer_settings

    run_dir = train(run_config(workdir, "opt-resume", "save_steps=2"))
    uninterrupted = train_rows(run_dir)
    train(run_config(workdir, "opt-resume", "save_steps=2", "adam_epsilon=1.0", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}"))
    resumed = train_rows(run_dir)
    assert resumed[1]["loss"] == uninterrupted[1]["loss"] and resumed[3]["loss"] != pytest.approx(uninterrupted[3]["loss"], abs=1e-6)
    optimizer = _optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), run_config(workdir, "unused"), torch.device("cpu"))
    follow_optimizer_settings(optimizer, run_config(workdir, "unused", "weight_decay=0.3", "adam_beta1=0.5", "adam_epsilon=1e-3").training)
    decay, no_decay = optimizer.param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.3, 0.0)
    assert decay["betas"] == no_decay["betas"] == (0.5, 0.999) and decay["eps"] == no_decay["eps"] == 1e-3


def test_resuming_at_max_steps_ends_the_run_there(workdir, capsys):
    """A checkpoint at step 4 of an 8-step run resumed with max_steps=4: nothing is trained, the steps
    since the last row are logged, the step's eval row (saved before the checkpoint) is not repeated,
    and final/ is step 4; max_steps=2 (below the checkpoint) is refused."""
    from dpokit.checkpoint import list_checkpoints

    options = ("max_steps=8", "save_steps=4", "logging_steps=3", "eval_steps=2")
    run_dir = train(run_config(workdir, "resume-at-end", *options))
    step4 = run_dir / "checkpoints" / "step-4"
    train(run_config(workdir, "resume-at-end", *options, "max_steps=4", f"resume_from_checkpoint={step4}"))
    rows = read_rows(run_dir)
    assert [(r["step"], "eval/loss" in r) for r in rows] == [(2, True), (3, False), (4, True), (4, False)]
    assert json.loads((run_dir / "final" / "dpokit_step.json").read_text())["step"] == 4
    with pytest.raises(SystemExit):
        main(["train", *run_args(workdir, "resume-at-end", *options, "max_steps=2", f"resume_from_checkpoint={step4}")])
    assert f"{step4} is at step 4, past this run's 2 steps" in capsys.readouterr().err
    # a checkpoint whose step has a training row but no eval row: the run ends with that step's eval;
    # the next step's checkpoint, of the steps dropped, is removed
    options = ("max_steps=4", "save_steps=1", "logging_steps=3", "eval_steps=2")
    run_dir = train(run_config(workdir, "resume-at-end-2", *options))
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-3", "step-4"]
    train(run_config(workdir, "resume-at-end-2", *options, "max_steps=3", f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-3'}"))
    assert [(r["step"], "eval/loss" in r) for r in read_rows(run_dir)] == [(2, True), (3, False), (3, True)]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-3"]


def test_a_damaged_checkpoint_is_refused_with_the_one_before(workdir, capsys):
    """Saves are atomic, so a checkpoint lacking a file was damaged after it: resuming from it names
    the file and the checkpoint before; one without this process's random state resumes with a note."""
    settings = ("save_steps=1", "max_steps=3", "data.eval=null", "save_total_limit=3")
    run_dir = train(run_config(workdir, "damaged", *settings))
    (run_dir / "checkpoints" / "step-3" / "optimizer.pt").unlink()
    with pytest.raises(SystemExit):
        main(["train", *run_args(workdir, "damaged", *settings, "resume_from_checkpoint=latest")])
    assert "checkpoint" in (err := capsys.readouterr().err) and "step-3 is incomplete, missing optimizer.pt" in err
    assert f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-2'}" in err
    step2 = run_dir / "checkpoints" / "step-2"
    (step2 / "scheduler.pt").unlink()
    (step2 / "rng_state_0.pt").unlink()
    with pytest.raises(SystemExit):  # named by its path: the same, naming the checkpoint before it
        main(["train", *run_args(workdir, "damaged", *settings, f"resume_from_checkpoint={step2}")])
    err = capsys.readouterr().err
    assert f"{step2} is incomplete, missing scheduler.pt, rng_state_<process>.pt" in err
    assert f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-1'}" in err
    step1 = run_dir / "checkpoints" / "step-1"
    (step1 / "rng_state_0.pt").rename(step1 / "rng_state_1.pt")  # as if saved by a process this run does not have
    (run_dir / "checkpoints" / "step-3.tmp").mkdir()  # a save cut short when the run was killed
    train(run_config(workdir, "damaged", *settings, f"resume_from_checkpoint={step1}"))
    assert "holds no random state for process 0" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]  # saved over it


def test_a_run_stopped_before_its_end_says_in_run_json_how_far_it_got(workdir, monkeypatch):
    """run.json's session entry is rewritten at every checkpoint: a run killed before its end (here while
    saving its final model) still says the steps it trained, and that it did not finish; resumed from its
    last checkpoint (it has no final/ yet), it finishes."""
    import dpokit.train

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(dpokit.train, "save_final", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(run_config(workdir, "stopped", "max_steps=3", "save_steps=2", "data.eval=null"))
    (session,) = json.loads((workdir / "stopped" / "run.json").read_text())["sessions"]
    assert (session["from_step"], session["to_step"], session["finished"]) == (0, 3, False)  # saved at steps 2 and 3
    assert session["wall_seconds"] > 0
    monkeypatch.undo()
    train(run_config(workdir, "stopped", "max_steps=3", "save_steps=2", "data.eval=null", "resume_from_checkpoint=latest"))
    sessions = json.loads((workdir / "stopped" / "run.json").read_text())["sessions"]
    assert [(s["from_step"], s["to_step"], s["finished"]) for s in sessions] == [(0, 3, False), (3, 3, True)]
    assert json.loads((workdir / "stopped" / "final" / "dpokit_step.json").read_text()) == {"step": 3}


def test_a_path_that_is_no_checkpoint_is_refused_with_the_checkpoints_near_it(tmp_path):
    """resume_from_checkpoint given a checkpoint pruned since, the run's folder, its final/ or another
    folder: the error says which, and names the checkpoints there are."""
    from dpokit.checkpoint import STATE_FILE, find_checkpoint

    run = tmp_path / "run"
    for name in ("step-4", "step-6"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / STATE_FILE).write_text("{}")
    (run / "final").mkdir()
    (run / "final" / "config.json").write_text("{}")
    (run / "plots").mkdir()
    cases = {
        run / "checkpoints" / "step-2": f"resume_from_checkpoint: no folder {run}/checkpoints/step-2; give a "
                                        f"checkpoints/step-N folder ({run}/checkpoints holds step-4, step-6)",
        run: f"{run} is a run's folder, not a checkpoint: give one of its checkpoints/step-N folders "
             f"(its newest is {run}/checkpoints/step-6)",
        run / "final": f"{run}/final holds a model but no training state to resume (no {STATE_FILE}): give a "
                       f"checkpoints/step-N folder ({run}/checkpoints holds step-4, step-6), or start a new run "
                       f"from this model with model.name_or_path={run}/final",
        run / "plots": f"{run}/plots is not a dpokit checkpoint (no {STATE_FILE}); give a checkpoints/step-N folder "
                       f"({run}/checkpoints holds step-4, step-6)",
        tmp_path / "elsewhere": f"resume_from_checkpoint: no folder {tmp_path}/elsewhere; give a checkpoints/step-N folder",
    }
    for given, said in cases.items():
        with pytest.raises(FileNotFoundError) as e:
            find_checkpoint(str(given), tmp_path / "new")
        assert str(e.value) == said
    (run / "checkpoints" / "step-4").rename(run / "checkpoints" / "old")
    (run / "checkpoints" / "step-6").rename(run / "checkpoints" / "older")
    with pytest.raises(FileNotFoundError, match=r"a run's folder, not a checkpoint: .* \(it holds none\)$"):
        find_checkpoint(str(run), tmp_path / "new")


def test_a_checkpoints_random_state_brings_back_every_generator():
    """What a checkpoint keeps of the random state (Python's, NumPy's, torch's) draws, once restored,
    what it drew after being taken."""
    import random

    import numpy as np

    from dpokit.checkpoint import rng_state, set_rng_state

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    saved = rng_state()
    first = draws()
    assert draws() != first
    set_rng_state(saved)
    assert draws() == first


def test_a_checkpoint_saved_with_more_gpus_restores_the_ones_this_machine_has(monkeypatch):
    """A checkpoint keeps one CUDA random state per GPU its process saw; resumed where fewer are
    visible (8 GPUs, then 4; or CUDA_VISIBLE_DEVICES=0), the first ones are restored (torch's
    set_rng_state_all raised IndexError past the device count)."""
    from dpokit.checkpoint import rng_state, set_rng_state

    saved = {**rng_state(), "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(int(s[0]) for s in states))
    set_rng_state(saved)
    assert restored == [0, 1]


def test_resume_between_logged_rows_logs_what_an_uninterrupted_run_logs(workdir):
    """Logging every 3 steps, saving every 4: the checkpoint at step 4 keeps step 4's statistics and
    tokens, not logged yet, so the resumed run's row at step 6 (steps 4-6) is the uninterrupted one's."""
    run_dir = train(run_config(workdir, "resume-window", "max_steps=8", "save_steps=4", "logging_steps=3"))
    uninterrupted = train_rows(run_dir)
    train(run_config(workdir, "resume-window", "max_steps=8", "save_steps=4", "logging_steps=3",
                     f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-4'}"))
    resumed = train_rows(run_dir)
    assert [r["step"] for r in resumed] == [3, 6, 8]
    for ra, rb in zip(uninterrupted, resumed, strict=True):
        assert ra["tokens"] == rb["tokens"], ra["step"]
        for key in ("loss", "grad_norm", "rewards/margins", "learning_rate"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)


def test_progress_into_a_log_file_is_a_line_per_logged_step(workdir, capsys):
    """Off a terminal (output redirected to a file) a bar's redraws piled up into one long line: each
    logged step is a plain line instead, and the reference and eval passes draw nothing."""
    run_dir = train(run_config(workdir, "progress-lines", "max_steps=3", "progress_bar=true", "eval_steps=2"))
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith(("step ", "eval "))]
    assert [line.split(":")[0] for line in lines] == ["step 1/3", "step 2/3", "eval at step 2", "step 3/3", "eval at step 3"]
    assert all("loss=" in line and "tok_s=" in line for line in lines if line.startswith("step"))
    evals = [row for row in read_rows(run_dir) if "eval/loss" in row]
    assert lines[2] == (f"eval at step 2: loss={evals[0]['eval/loss']:.4f}, acc={evals[0]['eval/rewards/accuracies']:.2f}, "
                        f"margin={evals[0]['eval/rewards/margins']:.3f}")
    assert "\r" not in captured.err and "it/s" not in captured.err


def test_an_output_dir_holds_one_run(workdir, capsys):
    """A new run in a folder holding another is refused (it would mix with it: pruning kept the old
    run's higher-numbered checkpoints over the new ones, and `latest` picked them); resuming from an
    earlier checkpoint of the folder removes the later ones; overwrite_output_dir starts over."""
    from dpokit.checkpoint import list_checkpoints

    run_dir = train(run_config(workdir, "one-run", "max_steps=6", "save_steps=2", "save_total_limit=2"))
    # the last step is saved too: a finished run can be continued
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-4", "step-6"]
    with pytest.raises(SystemExit) as e:
        main(["train", *run_args(workdir, "one-run", "overwrite_output_dir=false", "save_steps=1")])
    assert e.value.code == 2
    assert (f"{run_dir} already holds a run (checkpoints step-4, step-6; final/; metrics.jsonl), which a new run would "
            "mix with: continue it with resume_from_checkpoint=latest (its newest checkpoint is step 6)") in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-4", "step-6"]  # untouched

    step4 = f"resume_from_checkpoint={run_dir / 'checkpoints' / 'step-4'}"
    train(run_config(workdir, "one-run", "max_steps=6", "save_steps=1", "save_total_limit=2", step4))
    out = capsys.readouterr().out
    assert "removed from" in out and f"note: {run_dir / 'final'} holds the model trained to step 6: steps 5-6 are trained again" in out
    # step-6 of the steps redone is gone; the resumed run's saves are the newest, and kept
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-5", "step-6"]
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4, 5, 6]
    train(run_config(workdir, "one-run", "max_steps=8", "save_steps=1", "save_total_limit=2", "resume_from_checkpoint=latest"))
    assert f"resumed from {run_dir / 'checkpoints' / 'step-6'} at step 6" in capsys.readouterr().out  # the newest
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2, 3, 4, 5, 6, 7, 8]  # continued past its end

    for name in ("eval.json", "eval-step-4.json", "compare.md", "compare.jsonl", "notes.md", "evaluation.json"):  # eval/compare's, and a user's
        (run_dir / name).write_text("{}")
    train(run_config(workdir, "one-run", "max_steps=2", "overwrite_output_dir=true"))
    assert not (run_dir / "checkpoints").exists() and (run_dir / "final").is_dir()
    assert sorted(p.name for p in run_dir.glob("*.*")) == ["config.yaml", "data.json", "evaluation.json", "metrics.jsonl", "notes.md",
                                                          "run.json"]  # the old run's gone
    assert [(s["from_step"], s["to_step"]) for s in json.loads((run_dir / "run.json").read_text())["sessions"]] == [(0, 2)]
    assert [r["step"] for r in train_rows(run_dir)] == [1, 2]
    with pytest.raises(SystemExit):  # nothing to continue from: not advised
        main(["train", *run_args(workdir, "one-run", "overwrite_output_dir=false")])
    assert "which a new run would mix with: it saved no checkpoint to continue from (save_steps); choose another" in capsys.readouterr().err


def test_a_checkpoint_of_another_folder_does_not_make_a_folder_holding_a_run_its_own(tmp_path):
    """Resuming into a folder from one of its own checkpoints removes its later ones; from another folder's
    checkpoint, a folder holding a run is refused (the two runs would mix)."""
    from dpokit.checkpoint import outputs_to_replace

    out, other = tmp_path / "out", tmp_path / "other"
    for run in (out, other):
        (run / "checkpoints" / "step-2").mkdir(parents=True)
        (run / "checkpoints" / "step-2" / "trainer_state.json").write_text('{"step": 2}')
    (out / "checkpoints" / "step-4").mkdir()
    with pytest.raises(FileExistsError, match="which a run resumed from another folder's checkpoint would mix with"):
        outputs_to_replace(out, other / "checkpoints" / "step-2", overwrite=False)
    assert outputs_to_replace(out, out / "checkpoints" / "step-2", overwrite=False) == [out / "checkpoints" / "step-4"]


def test_a_run_stopped_before_logging_a_row_holds_no_run(tmp_path):
    """An output_dir with only an empty metrics.jsonl (a run stopped before its first row) has nothing to
    mix with or continue: a new run may take it; one logged row makes it a run's."""
    from dpokit.checkpoint import holds_a_run, outputs_to_replace

    (tmp_path / "metrics.jsonl").write_text("")
    assert holds_a_run(tmp_path) == [] and outputs_to_replace(tmp_path, None, overwrite=False) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    assert holds_a_run(tmp_path) == ["metrics.jsonl"]
    with pytest.raises(FileExistsError, match="already holds a run"):
        outputs_to_replace(tmp_path, None, overwrite=False)


def test_reference_tables_score_each_pair_in_the_batch_its_forward_uses(workdir, monkeypatch, tmp_path):
    """The precomputed reference scores each training pair in the micro-batch its first-epoch
    forward uses, and each eval pair in its eval batch; so where scores depend on the batch (16-bit
    kernels round differently by batch shape) the policy before its first update still scores every
    pair exactly as its reference did. Made visible on any machine by a batch-dependent offset on
    every score, with gradient accumulation and train micro-batches unlike the eval batches."""
    import dpokit.logps

    forward = dpokit.logps.ReplyLogProbs.forward

    def batch_dependent(self, input_ids, *args, **kwargs):
        offset = 1e-3 * (input_ids.sum() % 101) / 101
        out = forward(self, input_ids, *args, **kwargs)  # log-probs, or with token_stats (log-probs, stats)
        return (out[0] + offset, out[1]) if isinstance(out, tuple) else out + offset

    monkeypatch.setattr(dpokit.logps.ReplyLogProbs, "forward", batch_dependent)
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache"))  # tables scored with the offset, not other tests' tables
    run = train(run_config(workdir, "ref-batches", "max_steps=2", "per_device_train_batch_size=3",
                           "gradient_accumulation_steps=2", "per_device_eval_batch_size=5", "eval_on_start=true"))
    first_eval, first_step = read_rows(run)[:2]
    assert first_eval["step"] == 0 and first_eval["eval/rewards/chosen"] == first_eval["eval/rewards/rejected"] == 0
    assert first_step["step"] == 1 and first_step["rewards/chosen"] == first_step["rewards/rejected"] == 0


def test_first_epoch_micro_batches_are_trainings_then_the_rest():
    from dpokit.data.batching import first_epoch_micro_batches, global_batches, local_micro_batches

    for world in (1, 2):
        mine = [first_epoch_micro_batches(23, 2 * world * 3, seed=5, rank=r, world_size=world, micro_batch_size=3, rest_batch_size=4)
                for r in range(world)]
        for rank in range(world):
            trained = [m for batch in global_batches(23, 2 * world * 3, 5, 0) for m in local_micro_batches(batch, rank, world, 3)]
            assert mine[rank][: len(trained)] == trained  # the first epoch, in training's order
            assert all(len(b) <= 4 for b in mine[rank][len(trained):])
        assert sorted(i for batches in mine for b in batches for i in b) == list(range(23))  # every pair once


PER_MACHINE_CACHE = """
import os
import sys

os.environ["DPOKIT_CACHE"] = sys.argv[1] + os.environ["RANK"]  # as on machines with a cache each
from dpokit.cli import main

main(sys.argv[2:])
"""


def test_processes_compute_the_reference_together_when_one_lacks_the_cache(workdir, tmp_path, monkeypatch):
    """The reference table in one process's cache and not another's (each machine's own disk): the
    processes agree to compute it; one that read it went on to train while another computed, a hang."""
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "cache0"))
    one = train(run_config(workdir, "own-cache", "per_device_train_batch_size=4", "max_steps=1"))
    assert (tmp_path / "cache0" / "reference").is_dir()
    script = tmp_path / "per_machine_cache.py"
    script.write_text(PER_MACHINE_CACHE)
    result = accelerate_launch(str(script), str(tmp_path / "cache"), "train",
                               *run_args(workdir, "two-caches", "per_device_train_batch_size=2", "max_steps=1"), timeout=300)
    assert "reference: train log-probs of" in result.stdout and "computed in" in result.stdout
    assert read_rows(workdir / "two-caches")[0]["loss"] == pytest.approx(read_rows(one)[0]["loss"], abs=1e-5)


def test_an_error_every_process_has_is_said_once(workdir, capsys, monkeypatch):
    """A bad config stops every launched process: the first says so, the launcher ends the others
    before they repeat it; an error of another process alone is said, naming it."""
    result = accelerate_launch("-m", "dpokit", "train", *run_args(workdir, "said-once", "learnin_rate=1"), timeout=120, check=False)
    assert result.returncode != 0
    assert result.stderr.count("unknown config key 'learnin_rate'") == 1, result.stderr[-3000:]
    import dpokit.cli

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(dpokit.cli, "OTHER_PROCESS_ERROR_DELAY", 0.0)
    dpokit.cli.say_error("its own data is missing")
    assert capsys.readouterr().err == "dpokit: error (process 3): its own data is missing\n"


def test_ctrl_c_ends_training_with_status_130_and_says_how_to_resume(workdir, capsys, monkeypatch):
    import dpokit.train

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(dpokit.train, "train", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["train", *run_args(workdir, "interrupted")])
    assert e.value.code == 130  # 128 + SIGINT, as a shell reports a Ctrl-C
    assert capsys.readouterr().err == "dpokit: interrupted; resume with resume_from_checkpoint=latest\n"


def test_two_processes_match_one(workdir):
    """2 CPU processes (gloo) with a quarter of the per-device batch and 2 accumulation steps give the
    same curve as 1 process: the gradients are averaged over the processes once, after the last
    micro-batch of each step (the ones before accumulate unsynchronized).

    `accelerate launch` starts several processes only through its multi-process launcher
    (--multi_gpu, which is torchrun); on a machine without GPUs dpokit makes them gloo CPU processes.
    """
    one = train(run_config(workdir, "dp1", "per_device_train_batch_size=4"))
    accelerate_launch("-m", "dpokit", "train", *run_args(workdir, "dp2", "per_device_train_batch_size=1",
                                                         "gradient_accumulation_steps=2"), timeout=300)
    a, b = read_rows(one), read_rows(workdir / "dp2")
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in ra:
            if key.endswith(("loss", "margins", "accuracies", "logps/chosen", "grad_norm")):
                assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra["step"], key)
