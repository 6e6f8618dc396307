"""``dpokit`` command line: thin parsing around the library; problems a user can fix are one line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dpokit import __version__

TRAIN_EPILOG = """\
examples:
  dpokit train examples/quickstart.yaml
  dpokit train my.yaml learning_rate=5e-7 max_steps=200 output_dir=runs/try2
  dpokit train my.yaml loss.loss_type=[sigmoid,sft] loss.loss_weights=[1.0,0.2]
  accelerate launch --num_processes 2 -m dpokit train my.yaml
  accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m dpokit train my.yaml

Overrides are key=value, with the section (training.learning_rate=...) or without it
(learning_rate=...); values are read as YAML. Every key is listed in the README's config tour.
"""


def _parser() -> argparse.ArgumentParser:
    from dpokit.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="dpokit", description="Align causal LMs on preference pairs (DPO and relatives).")
    parser.add_argument("--version", action="version", version=f"dpokit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="train a model on preference pairs",
        description="Train a policy on preference pairs from a YAML config plus key=value overrides.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(train, "learning_rate=5e-7 max_steps=200")
    _add_use_parsers(sub)
    _add_data_parser(sub)
    _add_export_parser(sub)
    _add_plan_parser(sub)
    _add_report_parser(sub)
    return parser


def _add_report_parser(sub) -> None:
    report = sub.add_parser(
        "report",
        help="write a run's plots and print its summary (while it trains, after it ends or is killed)",
        description="Read RUN_DIR/metrics.jsonl and run.json, write RUN_DIR/plots/*.png and print the run's summary: what "
        "`dpokit train` prints at its end, for a run still going, a killed one, or one trained with plots=false.",
    )
    report.add_argument("run_dir", help="a dpokit run directory (the output_dir of `dpokit train`)")
    report.add_argument("--no-plots", action="store_true", help="print the summary only")


def _add_export_parser(sub) -> None:
    export = sub.add_parser(
        "export",
        help="write a run's model as a plain Hugging Face folder (LoRA merged)",
        description="Write MODEL (a run directory, checkpoints/step-N, adapter or model folder) to the new folder OUT "
        "in Hugging Face format, with LoRA adapters folded into the base weights: a model that loads without dpokit "
        "or peft.",
    )
    export.add_argument("model", help="run directory, checkpoints/step-N folder, adapter folder or model folder")
    export.add_argument("-o", "--output-dir", "--merge", dest="out", metavar="OUT", required=True,
                        help="new (or empty) folder to write the model to (--merge is the older name)")
    export.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                        help="dtype of the written weights (default: the run's model.dtype, where it is auto or outside a run the "
                             "checkpoint's own)")


def _add_plan_parser(sub) -> None:
    """``plan``: memory estimate for full, LoRA and QLoRA training (see :mod:`dpokit.plan`)."""
    from dpokit.plan import add_parser

    add_parser(sub)


def _add_use_parsers(sub) -> None:
    """``eval``, ``compare``, ``chat``: using a trained model (see :mod:`dpokit.cli_use`)."""
    from dpokit.cli_use import add_parsers

    add_parsers(sub)


def _add_data_parser(sub) -> None:
    """``data inspect`` / ``data convert`` (see :mod:`dpokit.data_cli`)."""
    from dpokit.data_cli import add_parser

    add_parser(sub)


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """The command's arguments; ``key=value`` overrides may also follow its flags
    (``dpokit plan my.yaml --gpu-memory 80GB max_length=512``: argparse alone stops at the flag)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.parse_args(argv)  # argparse's own message for what is left
    return args


QUIET_WARNINGS = ((FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),)
"""Library warnings about library internals (peft reading transformers' old attribute) that every
LoRA run and ``dpokit plan`` printed, and that a user can do nothing about."""


def main(argv: list[str] | None = None) -> None:
    args = parse_command_line(argv)
    import warnings

    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    from dpokit import launch
    from dpokit.config import ConfigError, load_config, split_config_argument
    from dpokit.data.sources import DataError

    launch.EXITS_WHEN_DONE = launch.launched()  # a launched process ends itself once its command succeeded
    try:
        if args.command == "train":
            from dpokit.train import train

            path, overrides = split_config_argument(args.config, args.overrides)
            train(load_config(path, overrides))
        elif args.command in ("eval", "compare", "chat"):
            from dpokit.cli_use import run

            run(args)
        elif args.command == "export":
            from dpokit.export import export_model

            print(f"wrote {export_model(args.model, args.out, merge=True, dtype=args.dtype)}")
        elif args.command == "plan":
            from dpokit.plan import run as run_plan

            run_plan(args)
        elif args.command == "report":
            from dpokit.report import make_report

            metrics = Path(args.run_dir) / "metrics.jsonl"
            if not metrics.is_file():
                raise FileNotFoundError(f"{metrics} not found: give the output_dir of a `dpokit train` run")
            print(make_report(args.run_dir, plots=not args.no_plots))
        elif args.command == "data":
            from dpokit.data_cli import run as run_data

            run_data(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError) as e:
        say_error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        print("dpokit: interrupted; resume with resume_from_checkpoint=latest", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # output piped into a reader that stopped (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so flushing at exit does not fail again
        sys.exit(1)
    if launch.EXITS_WHEN_DONE:
        launch.exit_now()


OTHER_PROCESS_ERROR_DELAY = 5.0
"""Seconds a launched process other than the first waits before saying its error (see :func:`say_error`)."""


def say_error(message: str) -> None:
    """``dpokit: error: message`` on stderr. A launched process other than the first (``RANK`` > 0)
    waits first: where the first process has the same error (a bad config stops every process) it
    says it and the launcher ends the others meanwhile, so eight processes do not print it eight
    times; an error of that process alone is still said, naming the process."""
    rank = int(os.environ.get("RANK") or 0)
    if rank > 0:
        time.sleep(OTHER_PROCESS_ERROR_DELAY)
    print(f"dpokit: error{f' (process {rank})' if rank > 0 else ''}: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
