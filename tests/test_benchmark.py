"""The benchmark script runs: its data profile, dpokit's child process and its report (TRL is not
installed for the tests; ``pip install -e ".[bench]"`` adds it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dpo_vs_trl.py"


def test_benchmark_script_runs_dpokit_and_reports(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(SCRIPT), "--model-size", "tiny-test", "--steps", "3", "--warmup", "1", "--pairs-per-step", "3",
               "--skip-trl", "--skip-live", "--ablation", "dpokit-full-logits", "dpokit-checkpointing", "dpokit-autocast",
               "--also-attn", "dpokit_varlen", "no_such_attention", "--threads", "2", "--profile", "dpokit-full-logits", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    # a column that fails is reported and left out; the others still run and the exit status says so
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "dpokit-attn-no_such_attention failed" in result.stderr
    assert "failed (left out of the table, log tails above): dpokit-attn-no_such_attention" in result.stdout
    report = json.loads(out.read_text())
    profile = (tmp_path / "result-profile.txt").read_text()  # a further run of the column named, not a column
    assert "optimizer steps after step 1 (dpokit, chunked_logps off)" in profile and "## by self host time" in profile
    assert "_ChunkedTokenLogps" not in profile  # its settings were taken: the model's full logits, not dpokit's chunks
    assert list(report["summary"]) == ["dpokit", "dpokit-full-logits", "dpokit-checkpointing", "dpokit-autocast",
                                       "dpokit-attn-dpokit_varlen"]
    dpokit = report["raw"]["dpokit"]
    assert math.isclose(dpokit["loss"][0], math.log(2), abs_tol=1e-5)  # policy == reference at step 1
    assert len(dpokit["step_seconds"]) == 3 and all(t > 0 for t in dpokit["step_tokens"])
    assert report["order_check"]["dpokit"] == "3/3 steps match"  # the intended pairs, in order
    assert report["data"]["used"]["pairs"] == 3 * 3 and math.isclose(
        report["summary"]["dpokit"]["pairs_per_s"], 3 / report["summary"]["dpokit"]["median_step_s"])
    assert "| median s/step (after warm-up) |" in result.stdout
    # the output layer counted at reply positions only: fewer FLOPs than 6N at every token
    summary = report["summary"]["dpokit"]
    assert 0 < summary["step_fraction_of_matmul_head_at_replies"] < summary["step_fraction_of_matmul"]
    assert "| % of matmul FLOP/s, output layer at reply positions only (median step) |" in result.stdout
    recounted = subprocess.run([sys.executable, str(SCRIPT), "--recount", str(out)], capture_output=True, text=True, timeout=120)
    assert recounted.returncode == 0, recounted.stderr[-2000:]
    assert "dpokit: 3/3 steps match" in recounted.stdout  # the same pairs, generated again from the saved seed
    assert (f"dpokit (defaults): {summary['step_fraction_of_matmul']:.1%} of the matmul peak (N at every token), "
            f"{summary['step_fraction_of_matmul_head_at_replies']:.1%} (output layer at reply positions only)") in recounted.stdout
    assert "| s/step ÷ dpokit defaults' s/step |" in result.stdout
    full_logits = report["raw"]["dpokit-full-logits"]
    assert full_logits["settings"]["chunked_logps"] is False and full_logits["step_tokens"] == dpokit["step_tokens"]
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(full_logits["loss"], dpokit["loss"]))  # same numbers

    checkpointing = report["raw"]["dpokit-checkpointing"]
    assert checkpointing["settings"]["gradient_checkpointing"] is True
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(checkpointing["loss"], dpokit["loss"]))

    autocast = report["raw"]["dpokit-autocast"]  # float32 weights, bfloat16 matmuls: the same start, then bf16 rounding
    assert autocast["settings"]["dtype"] == "float32" and autocast["settings"]["bf16"] is True
    assert dpokit["settings"]["bf16"] is False and autocast["step_tokens"] == dpokit["step_tokens"]
    assert math.isclose(autocast["loss"][0], math.log(2), abs_tol=1e-5) and autocast["loss"] != dpokit["loss"]

    varlen = report["raw"]["dpokit-attn-dpokit_varlen"]
    assert varlen["settings"]["attn_implementation"] == "dpokit_varlen" and varlen["step_tokens"] == dpokit["step_tokens"]
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(varlen["loss"], dpokit["loss"]))
    assert "| dpokit, dpokit_varlen |" in result.stdout


def test_benchmark_times_logged_rows_with_logging_steps(tmp_path):
    """--logging-steps 2: dpokit logs (a host copy, on a GPU a synchronisation) every 2 steps, each step is
    timed as its logged row's average, the pairs are checked row by row; the warm-up must end on a row."""
    out = tmp_path / "result.json"
    command = [sys.executable, str(SCRIPT), "--model-size", "tiny-test", "--steps", "4", "--warmup", "2", "--pairs-per-step", "3",
               "--logging-steps", "2", "--skip-trl", "--skip-live", "--threads", "2", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    dpokit = report["raw"]["dpokit"]
    assert dpokit["logging_steps"] == 2 and len(dpokit["loss"]) == 2  # one loss per logged row
    seconds, tokens = dpokit["step_seconds"], dpokit["step_tokens"]
    assert len(seconds) == 4 and seconds[0] == seconds[1] and seconds[2] == seconds[3]
    assert tokens[0] == tokens[1] and tokens[2] == tokens[3]
    assert report["order_check"]["dpokit"] == "2/2 logged rows match"
    assert math.isclose(report["summary"]["dpokit"]["median_step_s"], seconds[2])  # steps 3..4: the second row
    assert "logging every 2" in result.stdout

    misaligned = subprocess.run([*command[:-2], "--warmup", "1"], capture_output=True, text=True, timeout=60)
    assert misaligned.returncode != 0 and "must be a multiple of --logging-steps" in misaligned.stderr
    sys.path.insert(0, str(SCRIPT.parent))
    import plan_vs_measured

    report["machine"]["gpu"] = "a GPU"  # the plan check needs each step's own token count, which rows average
    with pytest.raises(SystemExit, match="per-step token counts"):
        plan_vs_measured.compare(report)


def test_tuned_trl_columns(tmp_path):
    """TRL with precompute_ref_log_probs: its precompute is timed apart (it runs while the trainer is
    built), its steps score no reference, and dpokit's ratios against it are in the table."""
    pytest.importorskip("trl")
    out = tmp_path / "result.json"
    command = [sys.executable, str(SCRIPT), "--model-size", "tiny-test", "--steps", "3", "--warmup", "1", "--pairs-per-step", "3",
               "--skip-live", "--trl-variants", "trl-precompute", "--threads", "2", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert list(report["summary"]) == ["dpokit", "trl", "trl-precompute"]
    tuned, plain = report["raw"]["trl-precompute"], report["raw"]["trl"]
    assert tuned["settings"]["precompute_ref_log_probs"] is True and plain["settings"]["precompute_ref_log_probs"] is False
    assert tuned["precompute_seconds"] > 0 and plain["precompute_seconds"] == 0
    assert set(tuned["ref_tokens_per_step"]) == {0} and tuned["step_tokens"] == plain["step_tokens"]
    assert report["order_check"]["trl-precompute"] == "3/3 steps match"
    assert all(math.isclose(a, b, abs_tol=1e-5) for a, b in zip(tuned["loss"], plain["loss"]))  # the same reference numbers
    assert "| speedup vs TRL, precompute_ref_log_probs (its s/step ÷ s/step) |" in result.stdout


def test_plan_stays_within_the_gpu_peaks_measured():
    """dpokit plan at each H100 benchmark column's largest step (its real token count) against the
    peak torch's allocator measured there (benchmarks/results): within 0.8x-1.3x."""
    sys.path.insert(0, str(SCRIPT.parent))
    import plan_vs_measured

    results = sorted((SCRIPT.parent / "results").glob("2026-11-22-h100-*-pairs.json"))
    assert len(results) == 2
    rows = [row for path in results for row in plan_vs_measured.compare(json.loads(path.read_text()))]
    assert {row["column"] for row in rows} == {"dpokit", "dpokit-checkpointing", "dpokit-attn-dpokit_varlen"}
    for row in rows:
        assert 0.8 <= row["ratio"] <= 1.3, row
    cpu = json.loads((SCRIPT.parent / "results" / "2026-11-22-cpu-ablation.json").read_text())
    with pytest.raises(SystemExit, match="only GPU results"):
        plan_vs_measured.compare(cpu)
