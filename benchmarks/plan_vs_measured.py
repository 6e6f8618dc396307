"""``dpokit plan``'s estimate against the peaks a GPU benchmark measured.

Reads JSON written by ``dpo_vs_trl.py --device cuda`` and, for each dpokit column, estimates the
memory of its largest step (its real token count, through the plan's ``tokens``) with the
column's settings, then prints estimate, measured peak (``torch.cuda.max_memory_allocated``) and
their ratio. Only GPU results: a CPU run's peak RSS also holds the interpreter and libraries.

    python benchmarks/plan_vs_measured.py benchmarks/results/2026-11-22-h100-*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dpo_vs_trl import MAX_LENGTH, MODEL_SIZES  # noqa: E402


def compare(result: dict) -> list[dict]:
    """One row per dpokit column of a benchmark result: tokens, estimated and measured MiB."""
    from transformers import Qwen2Config

    from dpokit.config import TrainingConfig, batch_layout
    from dpokit.plan import RunShape, count_model, estimate

    if not result["machine"].get("gpu"):
        raise SystemExit("only GPU results: a CPU peak RSS also counts the interpreter and libraries")
    if result["args"].get("logging_steps", 1) > 1:
        raise SystemExit("only results with per-step token counts (dpo_vs_trl.py --logging-steps 1): "
                         "a logged row gives its steps' average, not the largest step")
    args = result["args"]
    shape = count_model(Qwen2Config(**MODEL_SIZES[args["model_size"]], tie_word_embeddings=True))
    rows = []
    for name, raw in result["raw"].items():
        if name == "trl":
            continue
        settings = raw["settings"]
        dtype = settings.get("dtype") or args["dtype"]  # a column's own dtype (dpokit-autocast: float32), else the run's
        layout = batch_layout(TrainingConfig(prefix_sharing=settings["prefix_sharing"], padding_free=settings["padding_free"]))
        run = RunShape(batch_size=args.get("pairs_per_step") or 4, max_length=MAX_LENGTH, layout=layout,
                       gradient_checkpointing=settings["gradient_checkpointing"], chunked_logps=settings["chunked_logps"],
                       logps_chunk_size=settings["logps_chunk_size"], dtype_bytes=2 if dtype == "bfloat16" else 4,
                       autocast_16bit=settings.get("bf16", False),
                       live_reference=not settings["precompute_ref_log_probs"],
                       regrouped_rows=settings["attn_implementation"] == "dpokit_varlen", tokens=max(raw["step_tokens"]))
        estimated = estimate(shape, run)["full"]["total"]
        measured = raw["peak_memory_bytes"]
        rows.append({"column": name, "tokens": run.tokens, "estimated_mib": estimated / 2**20,
                     "measured_mib": measured / 2**20, "ratio": estimated / measured})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="JSON files from dpo_vs_trl.py --device cuda")
    a = ap.parse_args(argv)
    print("| result | column | tokens (largest step) | plan (MiB) | measured peak (MiB) | plan / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in a.results:
        for row in compare(json.loads(Path(path).read_text())):
            print(f"| {Path(path).name} | {row['column']} | {row['tokens']} | {row['estimated_mib']:.0f} | "
                  f"{row['measured_mib']:.0f} | {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
