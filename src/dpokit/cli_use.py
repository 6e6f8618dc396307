"""The ``eval``, ``compare`` and ``chat`` subcommands: argument parsing and the thin calls behind them.

:mod:`dpokit.cli` registers these with :func:`add_parsers` and hands their parsed arguments
to :func:`run`; the work lives in :mod:`dpokit.evaluate`, :mod:`dpokit.compare`, :mod:`dpokit.chat`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMANDS = ("eval", "compare", "chat")

MODEL_HELP = (
    "a dpokit run directory (its final/, else its newest checkpoint), a checkpoints/step-N folder, "
    "a Hugging Face model folder or hub id, builtin:tiny-qwen2, or a LoRA adapter folder"
)

EVAL_EPILOG = """\
examples:
  dpokit eval runs/quickstart                       # the run's eval data, against its reference
  dpokit eval runs/quickstart/checkpoints/step-100 --max-pairs 200
  dpokit eval my-org/my-dpo-model --reference Qwen/Qwen2.5-0.5B-Instruct --data pairs.jsonl

reward accuracy: share of pairs where the implicit reward beta*(log pi - log ref) of the chosen
reply beats the rejected one's; reward margin: its mean difference; log-prob accuracy: share of
pairs where the model alone gives the chosen reply the higher summed log-prob.
"""

COMPARE_EPILOG = """\
examples:
  dpokit compare runs/quickstart --from-data examples/data/quickstart/eval.jsonl --n 20
  dpokit compare my-dpo-model --reference Qwen/Qwen2.5-0.5B-Instruct --prompts prompts.txt --temperature 0

--prompts: a .txt file (one prompt per line) or .jsonl (a "prompt" per row: a string or messages).
"""

CHAT_EPILOG = """\
in the chat: /system TEXT, /reset, /save FILE, /help, /exit
example:
  dpokit chat runs/quickstart --system "You are a concise assistant."
"""


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling; 0 is off (default)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed (default 42)")


def _dtype_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"],
                        help="weights dtype (default: the run's model.dtype, else float32)")


def add_parsers(sub) -> None:
    """Add ``eval``, ``compare`` and ``chat`` to the ``dpokit`` subparsers ``sub``."""
    raw = argparse.RawDescriptionHelpFormatter
    ev = sub.add_parser("eval", help="preference accuracy and margins of a model against a reference",
                        description="Score preference pairs with a policy and a reference, with the training loop's code.",
                        epilog=EVAL_EPILOG, formatter_class=raw)
    ev.add_argument("model", help=MODEL_HELP)
    ev.add_argument("--reference", help="the reference MODEL (default: the run's reference, i.e. its starting model)")
    ev.add_argument("--data", help="preference data: .jsonl/.json/.parquet/.csv, saved dataset or hub id (default: the run's eval data)")
    ev.add_argument("--split", default="train", help="split of --data: a hub dataset, saved DatasetDict or split-keyed .json (default train)")
    ev.add_argument("--max-pairs", type=int, help="score only the first N pairs")
    ev.add_argument("--batch-size", type=int, help="pairs per batch (default: the run's per_device_eval_batch_size, else 8)")
    ev.add_argument("--max-length", type=int, help="prompt + reply tokens (default: the run's data.max_length, else 1024)")
    ev.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's, else 0.1)")
    _dtype_arg(ev)
    ev.add_argument("--output", help="JSON file to write (default: <run>/eval.json, <run>/eval-step-N.json for a checkpoint, else ./eval.json)")

    cmp = sub.add_parser("compare", help="reference and policy replies to the same prompts, side by side",
                         description="Generate replies from the reference and the policy with the same settings and seed; "
                                     "write compare.md and compare.jsonl.",
                         epilog=COMPARE_EPILOG, formatter_class=raw)
    cmp.add_argument("model", help=MODEL_HELP)
    cmp.add_argument("--reference", help="the reference MODEL (default: the run's reference, i.e. its starting model)")
    source = cmp.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="a .txt (one prompt per line) or .jsonl file (a 'prompt' per row)")
    source.add_argument("--from-data", help="take the prompts of a preference dataset dpokit reads")
    cmp.add_argument("--split", default="train", help="split of --from-data: a hub dataset, saved DatasetDict or split-keyed .json (default train)")
    cmp.add_argument("--n", type=int, help="use the first N prompts (default: 20 from --from-data, all of --prompts)")
    _sampling_args(cmp)
    cmp.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    _dtype_arg(cmp)
    cmp.add_argument("--output-dir", help="where compare.md/.jsonl go (default: the run directory, else .)")

    ch = sub.add_parser("chat", help="chat with a model in the terminal",
                        description="Interactive chat through the model's chat template, tokens streamed.",
                        epilog=CHAT_EPILOG, formatter_class=raw)
    ch.add_argument("model", help=MODEL_HELP)
    ch.add_argument("--system", help="system prompt (change it in the chat with /system TEXT)")
    _sampling_args(ch)
    _dtype_arg(ch)


def _settings(args):
    from dpokit.generate import SamplingSettings

    return SamplingSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed).check()


def _eval(args) -> None:
    from accelerate import PartialState

    from dpokit.config import ConfigError
    from dpokit.evaluate import evaluate_model
    from dpokit.launch import end_process_group
    from dpokit.resolve import output_dir, write_text_atomic

    if args.output and Path(args.output).is_dir():  # said before any model is loaded
        raise ConfigError(f"--output {args.output} is a folder: give the JSON file to write, e.g. {Path(args.output) / 'eval.json'}")
    report, model = evaluate_model(args.model, args.reference, args.data, args.split, args.max_pairs,
                                   args.batch_size, args.max_length, args.beta, args.dtype)
    # launched on several processes: every one holds the same report, and what is left is the main
    # process's writing. End the process group now (see dpokit.launch).
    state = PartialState()
    state.wait_for_everyone()
    end_process_group(state)
    if not state.is_main_process:
        return
    path = Path(args.output) if args.output else output_dir(model) / f"eval{model.file_suffix}.json"
    write_text_atomic(path, json.dumps(report.to_json(), indent=2) + "\n")
    print(report.table())
    print(f"wrote {path}")


def _check_prompt_source(prompts: str | None, from_data: str | None, split: str) -> None:
    """Refuse, before any model is loaded, a --split that would be ignored (a --prompts file, a
    --from-data file type without splits) and a --from-data file that does not exist."""
    from dpokit.config import ConfigError, DataSource
    from dpokit.data.sources import check_data_argument

    if prompts is not None and split != DataSource.split:
        raise ConfigError(f"--split {split} applies to --from-data only; --prompts {prompts} has no splits: drop --split")
    if from_data is not None:
        check_data_argument(from_data, split, "--from-data")


def _compare(args) -> None:
    from dpokit.compare import compare, write_comparison
    from dpokit.config import ConfigError
    from dpokit.generate import as_plain_text, prompts_from_data, read_prompt_file, trained_on_plain_text
    from dpokit.resolve import output_dir, resolve_model

    settings = _settings(args)
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():  # said before generating
        raise ConfigError(f"--output-dir {args.output_dir} is a file, not a folder: give the folder compare.md and compare.jsonl go into")
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    _check_prompt_source(args.prompts, args.from_data, args.split)
    policy = resolve_model(args.model)
    run_data = policy.run_config.data if policy.run_config else None
    if args.prompts:
        prompts = read_prompt_file(args.prompts)[: args.n]
        variables = [run_data.chat_template_kwargs if run_data else None] * len(prompts)  # as the run rendered its pairs
        if trained_on_plain_text(policy.run_dir):  # as it trained: no chat template
            prompts = as_plain_text(prompts)
            print("compare: the run trained on plain-text pairs, so the prompts are given as plain text")
    else:  # read as the run read its data (format, columns, system prompt, template variables), as eval reads --data
        prompts, variables = prompts_from_data(args.from_data, args.n or 20, args.split, run_data)
    comparison, model = compare(args.model, prompts, args.reference, settings, args.batch_size, args.dtype,
                                template_kwargs=variables)
    md, jsonl = write_comparison(comparison, output_dir(model, args.output_dir), model.file_suffix)
    print(f"wrote {md} and {jsonl}")


def _chat(args) -> None:
    from dpokit.chat import chat

    chat(args.model, args.system, _settings(args), args.dtype)


def run(args) -> None:
    """Run the parsed ``eval``/``compare``/``chat`` command; Ctrl-C ends it with status 130."""
    try:
        {"eval": _eval, "compare": _compare, "chat": _chat}[args.command](args)
    except KeyboardInterrupt:
        print(f"dpokit {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
