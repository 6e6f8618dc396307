import json
import math
import warnings

import pytest

from dpokit.cli import main
from dpokit.report import make_report, read_metrics, summarize, write_plots
from runs import summary_items

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_CHARTS = {"loss.png", "rewards_accuracies.png", "rewards_margins.png",
              "rewards_chosen_rejected.png", "logps_chosen_rejected.png", "entropy.png", "learning_rate.png",
              "grad_norm.png", "overview.png"}


def synthetic_rows(n_steps=60, eval_every=10):
    rows = []
    for step in range(1, n_steps + 1):
        t = step / n_steps
        noise = 0.05 * math.sin(step * 1.7)
        row = {
            "step": step, "epoch": round(2 * t, 3),
            "loss": 0.69 - 0.4 * t + noise,
            "learning_rate": 1e-6 * min(1.0, step / 10),
            "grad_norm": 1.5 - t + abs(noise),
            "rewards/chosen": 0.5 * t + noise, "rewards/rejected": -0.8 * t - noise,
            "rewards/accuracies": 0.5 + 0.4 * t + noise,
            "rewards/margins": 1.3 * t + 2 * noise,
            "logps/chosen": -50.0, "logps/rejected": -55.0, "entropy": 2.0 - t,
            "tokens": 4000, "tokens_per_second": 12000.0, "seconds": 4000 / 12000.0,
        }
        if step % 7 == 0:  # robust to missing keys
            del row["grad_norm"], row["rewards/chosen"]
        rows.append(row)
        if step % eval_every == 0:
            rows.append({"step": step, "epoch": round(2 * t, 3),
                         "eval/loss": 0.7 - 0.3 * t, "eval/rewards/accuracies": 0.5 + 0.3 * t,
                         "eval/rewards/margins": t, "eval/rewards/chosen": 0.3 * t,
                         "eval/rewards/rejected": -0.7 * t, "eval/entropy": 2.1 - t})
    rows[-1]["eval/rewards/accuracies"] = 0.8125
    return rows


def assert_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert min_bytes < len(data) < 2_000_000, (path, len(data))


def test_write_plots_all_charts(tmp_path):
    out = tmp_path / "plots"
    paths = write_plots(synthetic_rows(), out)
    assert {p.name for p in paths} == ALL_CHARTS
    assert {p.name for p in out.iterdir()} == ALL_CHARTS  # no temp files left behind
    for p in paths:
        assert_png(p)
    assert_png(out / "overview.png", min_bytes=30_000)


def test_write_plots_skips_charts_without_data(tmp_path):
    # train only, no grad_norm, no learning rate, no chosen/rejected rewards
    rows = [{"step": s, "loss": 1.0 / s, "rewards/accuracies": 0.5} for s in range(1, 6)]
    rows.append({"step": 6})  # a row with nothing plottable
    paths = write_plots(rows, tmp_path)
    assert {p.name for p in paths} == {"loss.png", "rewards_accuracies.png", "overview.png"}
    for p in paths:
        assert_png(p, min_bytes=2_000)


def test_write_plots_eval_only_and_empty(tmp_path):
    rows = [{"step": 10, "epoch": 1, "eval/loss": 0.6}, {"step": 20, "epoch": 2, "eval/loss": 0.5}]
    assert {p.name for p in write_plots(rows, tmp_path / "a")} == {"loss.png", "overview.png"}
    assert write_plots([], tmp_path / "b") == []


def test_write_plots_tolerates_bad_values(tmp_path):
    rows = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": None},
            {"step": 3, "loss": "oops"}, {"loss": 0.5}, {"step": 4, "loss": 0.4},
            {"step": 5, "loss": float("inf"), "grad_norm": float("nan")}]
    names = {p.name for p in write_plots(rows, tmp_path)}
    assert names == {"loss.png", "grad_norm.png", "overview.png"}  # grad_norm: only its non-finite mark


def test_read_metrics_truncated_last_line(tmp_path):
    rows = synthetic_rows(5, eval_every=5)
    path = tmp_path / "metrics.jsonl"
    text = "\n".join(json.dumps(r) for r in rows)
    path.write_text(text + "\n\n   \n" + '{"step": 6, "loss": 0.4')  # killed mid-write
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_metrics(path) == rows


def test_read_metrics_torn_middle_line_warns(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo{"step": 2, "loss": 0.6}\n'
                    '{"step": 3, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 3]


def test_summarize(tmp_path):
    rows = synthetic_rows()
    (tmp_path / "run" / "final").mkdir(parents=True)
    text = summarize(rows, tmp_path / "run")
    assert "\x1b" not in text
    assert "0.8125" in text  # final eval accuracy
    for needle in ["steps", "train loss", "train accuracy", "train margin", "eval loss",
                   "eval accuracy", "eval margin", "mean tokens/s", "12,000", "step time",
                   "20.0s", str(tmp_path / "run"), str(tmp_path / "run" / "final"),
                   str(tmp_path / "run" / "metrics.jsonl"), str(tmp_path / "run" / "plots")]:
        assert needle in text, needle
    # values start in the same column
    body = text.splitlines()[1:]
    cols = {len(line) - len(line[2:].split("  ", 1)[1].lstrip()) for line in body}
    assert len(cols) == 1, text
    # last train loss at 4 significant digits
    last_loss = rows[-2]["loss"]
    assert f"{last_loss:.4g}" in text


def test_summarize_train_only_and_empty(tmp_path):
    text = summarize([{"step": 3, "loss": 0.123456789}], tmp_path)
    assert "0.1235" in text and "eval" not in text and "tokens/s" not in text
    record = {"sessions": [{"from_step": 0, "to_step": 3, "wall_seconds": 3661, "finished": True}]}
    assert summary_items(summarize([], tmp_path, record=record))["wall time"] == "1h 01m 01s"


def test_summary_times_steps_evals_and_the_whole_run(tmp_path):
    rows = [{"step": 1, "loss": 0.7, "seconds": 2.0, "pairs": 8, "tokens": 900},
            {"step": 2, "loss": 0.6, "seconds": 3.0, "pairs": 8, "tokens": 1100},
            {"step": 2, "eval/loss": 0.65, "eval/seconds": 1.5}]
    first = {"from_step": 0, "to_step": 2, "wall_seconds": 75.0, "reference_seconds": 12.5, "finished": True}
    shape = {"processes": 2, "global_batch": 8, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
             "train_pairs": 1000, "left_out_per_epoch": 0, "eval_pairs": 50, "eval_held_out": 0}
    items = summary_items(summarize(rows, tmp_path, record={**shape, "sessions": [first]}))
    assert (items["step time"], items["eval time"], items["wall time"]) == ("5.0s", "1.5s", "1m 15s")
    assert items["reference pass"] == "12.5s" and items["pairs trained"] == "16  (3.2 pairs/s, 2,000 tokens)"
    assert items["global batch"] == "8 pairs = 2 x 2 processes x 2 accumulation" and items["pairs"] == "1,000 train, 50 eval"
    # a run killed at step 1, then resumed there: the wall time is both sessions' (loading included), the
    # reference pass each session's that had one (a resume with the table on disk reads it again)
    killed = {**first, "to_step": 1, "wall_seconds": 30.0, "finished": False}
    resumed = {"from_step": 1, "to_step": 2, "wall_seconds": 4.0, "reference_seconds": 0.5, "finished": True}
    items = summary_items(summarize(rows, tmp_path, record={**shape, "left_out_per_epoch": 3, "eval_held_out": 50,
                                                            "sessions": [killed, resumed]}))
    assert items["wall time"] == "34.0s  (2 sessions; the last, from step 1: 4.0s)" and items["reference pass"] == "13.0s"
    assert items["pairs"] == "1,000 train (each epoch leaves out 3), 50 eval (held out of the train data)"
    items = summary_items(summarize(rows, tmp_path, record={**shape, "sessions": [killed]}))  # still running, or killed
    assert items["wall time"] == "30.0s  (to step 1: not finished)"
    assert "wall time" not in summary_items(summarize(rows, tmp_path, record={}))  # an older run's folder: none


def test_summary_gives_the_highest_memory_peaks_logged():
    rows = [{"step": 1, "loss": 0.7, "memory/device_peak_gib": 9.5, "memory/host_peak_gib": 6.25},
            {"step": 2, "loss": 0.6, "memory/device_peak_gib": 10.125, "memory/host_peak_gib": 6.0}]
    items = summary_items(summarize(rows, "run", record={"processes": 8}))
    assert items["peak memory"] == "10.12 GiB allocated on the GPU, 6.25 GiB host RSS, the most of any of 8 processes"
    cpu = [{k: v for k, v in row.items() if "device" not in k} for row in rows]
    assert summary_items(summarize(cpu, "run", record={"processes": 1}))["peak memory"] == "6.25 GiB host RSS"
    assert "peak memory" not in summary_items(summarize([{"step": 1, "loss": 0.7}], "run"))  # an older run's rows


def test_a_diverged_run_is_said_in_the_summary_and_marked_in_the_plots(tmp_path, monkeypatch):
    """NaN losses (null in metrics.jsonl) are not hidden behind the last finite value."""
    import dpokit.report as report

    rows = [{"step": 2, "loss": 0.69, "rewards/margins": 0.0}, {"step": 4, "loss": None, "rewards/margins": None},
            {"step": 6, "loss": float("nan"), "rewards/margins": None}, {"step": 6, "eval/loss": None}]
    items = summary_items(summarize(rows, tmp_path))
    assert items["train loss"] == "non-finite since step 4" and items["train margin"] == "non-finite since step 4"
    assert items["eval loss"] == "non-finite since step 6"
    assert report.non_finite_since("loss", rows[:1]) is None
    marks = []
    monkeypatch.setattr(report, "_save", lambda fig, path: marks.extend(
        line.get_xdata()[0] for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == ":"))
    write_plots(rows, tmp_path)
    assert 4 in marks and 6 in marks  # train loss from step 4, eval loss at step 6


def test_a_single_logged_row_is_drawn(tmp_path, monkeypatch):
    import dpokit.report as report

    markers = []
    monkeypatch.setattr(report, "_save", lambda fig, path: markers.extend(
        line.get_marker() for ax in fig.axes for line in ax.get_lines()))
    write_plots([{"step": 2, "loss": 0.68, "learning_rate": 5e-5}], tmp_path)
    assert markers and all(marker == "o" for marker in markers)  # a one-point line alone draws nothing
    assert report.write_plots([], tmp_path / "none") == [] and not (tmp_path / "none").exists()


def test_summary_names_the_final_model_else_the_newest_checkpoint(tmp_path):
    rows = [{"step": 3, "loss": 0.5}]
    text = summarize(rows, tmp_path, plots=False)  # nothing saved yet, no plots drawn
    assert "final model" not in text and "checkpoint" not in text and "plots" not in text
    for step in (20, 100, 3):  # a killed run: checkpoints, no final/
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-200.tmp").mkdir()  # a save cut short
    assert summary_items(summarize(rows, tmp_path))["newest checkpoint"] == str(tmp_path / "checkpoints" / "step-100")
    (tmp_path / "final").mkdir()
    items = summary_items(summarize(rows, tmp_path))
    assert items["final model"] == str(tmp_path / "final") and "newest checkpoint" not in items
    assert items["plots"] == str(tmp_path / "plots")
    # a run resumed from an earlier checkpoint, killed after saving past its old final/
    (tmp_path / "final" / "dpokit_step.json").write_text('{"step": 60}')
    assert summary_items(summarize(rows, tmp_path))["newest checkpoint"] == str(tmp_path / "checkpoints" / "step-100")
    (tmp_path / "final" / "dpokit_step.json").write_text('{"step": 100}')
    assert summary_items(summarize(rows, tmp_path))["final model"] == str(tmp_path / "final")


def test_report_command(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_rows(30)) + "\n")
    main(["report", str(tmp_path), "--no-plots"])
    items = summary_items(capsys.readouterr().out)
    assert items["eval accuracy"] and "plots" not in items and not (tmp_path / "plots").exists()
    main(["report", str(tmp_path)])
    assert summary_items(capsys.readouterr().out)["plots"] == str(tmp_path / "plots")
    assert (tmp_path / "plots" / "overview.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'nowhere' / 'metrics.jsonl'} not found" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_stops_is_no_traceback(tmp_path):
    """`dpokit report RUN | head -3`: the reader gone before the report is written ended in a
    BrokenPipeError traceback."""
    import subprocess
    import sys

    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in synthetic_rows(30)) + "\n")
    process = subprocess.Popen([sys.executable, "-m", "dpokit", "report", str(tmp_path), "--no-plots"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader stops before the first line
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1 and b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_summarize_resumed_run_counts_steps_once(tmp_path):
    # killed at step 3, resumed from a checkpoint at step 1: steps 2 and 3 logged twice
    rows = [{"step": s, "loss": 1.0, "tokens": 100, "seconds": 1.0} for s in (1, 2, 3, 2, 3, 4)]
    rows[-1]["loss"] = 0.25
    text = summarize(rows, tmp_path)
    assert "4.0s" in text
    assert "0.25" in text


def test_make_report(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in synthetic_rows(30)) + "\n")
    text = make_report(tmp_path)
    assert (tmp_path / "plots" / "overview.png").exists()
    assert "eval accuracy" in text


def test_train_curves_smoothed_but_not_learning_rate(tmp_path, monkeypatch):
    import dpokit.report as report

    calls = []
    real = report._centered_mean
    monkeypatch.setattr(report, "_centered_mean", lambda v, half: calls.append(len(v)) or real(v, half))
    rows = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-5 * s} for s in range(1, 31)]
    write_plots(rows, tmp_path)
    assert calls == [30, 30]  # loss.png and the overview's loss panel, never learning_rate
    calls.clear()
    write_plots(rows[:20], tmp_path)  # 20 points or fewer: raw only
    assert calls == []


def test_smoothing_is_centered_and_said_in_the_legend(tmp_path, monkeypatch):
    """A trailing average drew a falling loss well above its logged values (0.34 against 0.24 at
    step 50 of the quickstart), as if train and eval parted: the mean is centered, so a straight
    line stays where it is, and the legend names both the logged and the smoothed line."""
    import dpokit.report as report

    assert report._centered_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2) == [2.0, 2.5, 3.0, 4.0, 4.5, 5.0]
    labels = []
    real = report._draw
    monkeypatch.setattr(report, "_draw", lambda ax, *a, **k: (real(ax, *a, **k), labels.append(ax.get_legend_handles_labels()[1])))
    write_plots([{"step": s, "loss": 1.0 - 0.01 * s} for s in range(1, 81)], tmp_path)
    assert labels[0] == ["train (logged)", "train (mean of 5 rows)"]


def test_a_step_logged_twice_keeps_its_later_row(tmp_path, monkeypatch):
    """A run killed after step 2 and resumed from step 1 logs step 2 again: the resumed row is the
    one the summary and the plots show (its loss, its seconds; a NaN the killed run logged there is
    gone), not the killed run's."""
    import dpokit.report as report

    rows = [{"step": 1, "loss": 0.9, "seconds": 1.0, "grad_norm": 1.0},
            {"step": 2, "loss": None, "seconds": 10.0, "grad_norm": 7.0},  # the killed run's step 2
            {"step": 2, "loss": 0.5, "seconds": 2.0, "grad_norm": 3.0}]  # the resumed run's
    items = summary_items(summarize(rows, tmp_path))
    assert items["train loss"] == "0.5" and items["step time"] == "3.0s"
    drawn = {}
    monkeypatch.setattr(report, "_draw", lambda ax, title, ylabel, data, marks=(): drawn.setdefault(
        title, {key: (steps, values) for key, _, _, steps, values in data}))
    monkeypatch.setattr(report, "_save", lambda fig, path: None)
    write_plots(rows, tmp_path)
    assert drawn["Gradient norm (before clipping)"]["grad_norm"] == ([1.0, 2.0], [1.0, 3.0])
    assert drawn["Loss"]["loss"] == ([1.0, 2.0], [0.9, 0.5])


def test_a_loss_that_recovers_after_a_nan_is_not_called_non_finite(tmp_path):
    """Only NaNs up to the last logged row make "non-finite since step N": a NaN followed by finite
    values is history, and a run that diverges again is dated from its latest NaN, not its first."""
    from dpokit.report import non_finite_since

    recovered = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": None}, {"step": 3, "loss": 0.6}]
    assert non_finite_since("loss", recovered) is None
    assert summary_items(summarize(recovered, tmp_path))["train loss"] == "0.6"
    again = [*recovered, {"step": 4, "loss": None}, {"step": 5, "loss": float("nan")}]
    assert non_finite_since("loss", again) == 4
    assert summary_items(summarize(again, tmp_path))["train loss"] == "non-finite since step 4"


def test_tokens_per_second_divides_totals_only_when_every_row_has_both(tmp_path):
    """Mean tokens/s is the tokens over the seconds of the same rows: when every step logged both
    (and the seconds add up to more than 0); else the mean of the logged rates (older rows without a
    token count)."""
    both = [{"step": 1, "tokens": 100, "seconds": 1.0, "tokens_per_second": 100.0},
            {"step": 2, "tokens": 400, "seconds": 3.0, "tokens_per_second": 400 / 3}]
    assert summary_items(summarize(both, tmp_path))["mean tokens/s"] == "125"  # 500 / 4, not (100 + 133.3) / 2
    some = [{"step": 1, "seconds": 1.0, "tokens_per_second": 100.0},  # no token count
            {"step": 2, "tokens": 400, "seconds": 1.0, "tokens_per_second": 400.0}]
    assert summary_items(summarize(some, tmp_path))["mean tokens/s"] == "250"  # the rates' mean, not 400 / 2
    no_time = [{"step": 1, "tokens": 100, "seconds": 0.0, "tokens_per_second": 50.0}]
    assert summary_items(summarize(no_time, tmp_path))["mean tokens/s"] == "50"
    assert "mean tokens/s" not in summary_items(summarize([{"step": 1, "tokens": 100}], tmp_path))


def test_run_record_sessions_and_what_a_reader_makes_of_a_damaged_file(tmp_path):
    """run.json: a session starts unfinished at its checkpoint's step, a resumed one comes after the
    earlier sessions, updates go to the newest; a file that is not JSON reads as no record."""
    from dpokit.run_record import RUN_FILE, RunRecord, read_run_record

    assert read_run_record(tmp_path) is None
    first = RunRecord.start(tmp_path, {"processes": 1}, resumed_at=None)
    first.update(to_step=2, wall_seconds=5.0)
    written = read_run_record(tmp_path)
    assert written["processes"] == 1 and set(written["versions"]) >= {"dpokit", "torch"}
    assert [(s["from_step"], s["to_step"], s["finished"]) for s in written["sessions"]] == [(0, 2, False)]  # killed at step 2
    second = RunRecord.start(tmp_path, {"processes": 1}, resumed_at=2)
    second.update(reference_seconds=0.5)  # killed before its first step: it got from step 2 to step 2
    assert [(s["from_step"], s["to_step"]) for s in read_run_record(tmp_path)["sessions"]] == [(0, 2), (2, 2)]
    second.update(to_step=4, finished=True)
    sessions = read_run_record(tmp_path)["sessions"]
    assert [(s["from_step"], s["to_step"], s["finished"]) for s in sessions] == [(0, 2, False), (2, 4, True)]
    (tmp_path / RUN_FILE).write_text('{"sessions": [{"from_step": 0,')  # torn by a full disk, say
    assert read_run_record(tmp_path) is None


def test_run_record_names_torch_with_its_build_and_a_gpu_by_its_name(monkeypatch):
    """A wheel's metadata may leave out torch's build (+cu124): the version torch itself reports is
    recorded; a library that is not installed is None."""
    import torch

    import dpokit.run_record as run_record

    real = run_record.metadata.version

    def version(name):
        if name == "peft":
            raise run_record.metadata.PackageNotFoundError(name)
        return "0.0.0" if name == "torch" else real(name)

    monkeypatch.setattr(run_record.metadata, "version", version)
    versions = run_record.library_versions()
    assert versions["torch"] == torch.__version__ and versions["peft"] is None
    assert run_record.describe_device(torch.device("cpu")) == "cpu"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Test GPU")
    assert run_record.describe_device(torch.device("cuda", 0)) == "cuda (NVIDIA Test GPU)"


def test_summary_numbers_are_written_as_a_reader_reads_them(tmp_path):
    """Steps are the highest step logged (not how many rows), with the highest epoch; integers get
    thousands separators from 10,000 on only (a step count of 1500 stays "1500"); a large non-integer
    rate is rounded to a whole number with separators; durations round to the second and read
    "1m 00s" from 60 s on."""
    rows = [{"step": 1499, "epoch": 0.25, "seconds": 0.0, "tokens": 0},
            {"step": 1500, "epoch": 0.75, "seconds": 60.0, "tokens": 740_740},  # 12,345.67 tokens/s
            {"step": 1500, "epoch": 0.75, "eval/loss": 0.5}]
    items = summary_items(summarize(rows, tmp_path))
    assert items["steps"] == "1500  (epoch 0.75)"
    assert items["mean tokens/s"] == "12,346"
    assert items["step time"] == "1m 00s"
    items = summary_items(summarize([{"step": 12_000, "seconds": 89.6}], tmp_path))
    assert items["steps"] == "12,000" and items["step time"] == "1m 30s"  # 89.6 s rounds up, not cut to 1m 29s


def test_summary_epoch_is_the_highest_logged(tmp_path):
    """A run killed at step 3 and resumed from step 1: the summary's steps and epoch are the furthest
    the run got (step 3, epoch 1.5), read together, not the epoch of whichever row came last."""
    rows = [{"step": s, "epoch": s / 2, "loss": 0.5} for s in (1, 2, 3)] + [{"step": 2, "epoch": 1.0, "loss": 0.4}]
    assert summary_items(summarize(rows, tmp_path))["steps"] == "3  (epoch 1.5)"


def test_summary_text_is_two_aligned_columns(tmp_path):
    """The whole summary of a small run, to the character: a title line, then each label padded to
    the longest label, two spaces, the value."""
    text = summarize([{"step": 3, "loss": 0.5}], tmp_path, plots=False)
    assert text == ("dpokit run summary\n"
                    "  steps       3\n"
                    "  train loss  0.5\n"
                    f"  run dir     {tmp_path}\n"
                    f"  metrics     {tmp_path / 'metrics.jsonl'}")


def test_a_value_that_is_no_number_is_not_counted(tmp_path):
    """A logged true or a string is not a number of seconds (true is not 1): the step time adds up
    only the numbers."""
    rows = [{"step": 1, "seconds": True}, {"step": 2, "seconds": 2.0}, {"step": 3, "seconds": "3"}]
    assert summary_items(summarize(rows, tmp_path))["step time"] == "2.0s"


def test_report_of_a_run_without_metrics(tmp_path):
    """A run folder with no metrics.jsonl yet (killed while loading): the summary says no metrics
    were logged, and names no plots folder, since no chart was drawn."""
    text = make_report(tmp_path)
    assert text.splitlines()[0] == "dpokit run summary (no metrics logged)"
    assert "plots" not in summary_items(text) and not (tmp_path / "plots").exists()


def test_overview_of_a_run_whose_every_value_is_non_finite(tmp_path):
    """A run that diverged from its first logged row has no finite value to draw, but still gets its
    charts, each with the mark of where it stopped being finite: the loss chart and the overview."""
    rows = [{"step": 1, "loss": None}, {"step": 2, "loss": float("nan")}]
    assert {p.name for p in write_plots(rows, tmp_path)} == {"loss.png", "overview.png"}


def test_overview_title_names_the_last_step(tmp_path, monkeypatch):
    """The overview's title names the furthest step drawn, as an integer: "step 5", not 5.0, nor step 3
    where the last eval was."""
    import dpokit.report as report

    titles = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: titles.__setitem__(
        path.name, fig._suptitle.get_text() if fig._suptitle else None))
    write_plots([{"step": s, "loss": 0.5} for s in range(1, 6)] + [{"step": 3, "eval/loss": 0.6}], tmp_path)
    assert titles["overview.png"] == "dpokit training overview  (step 5)"


def test_smoothing_width_for_a_short_run(tmp_path, monkeypatch):
    """A train curve of 21 to 79 rows is averaged over 2 rows either side (5 rows), the legend says so."""
    import dpokit.report as report

    labels = []
    real = report._draw
    monkeypatch.setattr(report, "_draw", lambda ax, *a, **k: (real(ax, *a, **k), labels.append(ax.get_legend_handles_labels()[1])))
    monkeypatch.setattr(report, "_save", lambda fig, path: None)
    write_plots([{"step": s, "loss": 1.0 - 0.01 * s} for s in range(1, 31)], tmp_path)
    assert labels[0] == ["train (logged)", "train (mean of 5 rows)"]


def test_non_finite_notes_stay_inside_the_chart_and_apart(tmp_path, monkeypatch):
    """Train and eval loss both non-finite from the last step: the two notes are written left of the
    mark (a mark at the right edge would put the note outside the chart) and one under the other, not
    on top of each other."""
    import dpokit.report as report

    placed = {}

    def save(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        placed[path.name] = (ax.bbox, [t.get_window_extent(renderer) for t in ax.texts])

    monkeypatch.setattr(report, "_save", save)
    rows = [{"step": 2, "loss": 0.7}, {"step": 2, "eval/loss": 0.7}, {"step": 4, "loss": None}, {"step": 4, "eval/loss": None}]
    write_plots(rows, tmp_path)
    axes, notes = placed["loss.png"]
    assert len(notes) == 2
    for note in notes:
        assert axes.x0 <= note.x0 and note.x1 <= axes.x1 and axes.y0 <= note.y0 and note.y1 <= axes.y1, (axes, note)
    assert not notes[0].overlaps(notes[1])
