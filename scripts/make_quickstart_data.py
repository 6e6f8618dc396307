"""Write the quickstart preference data: examples/data/quickstart/{train,eval}.jsonl.

    python scripts/make_quickstart_data.py            # 2,000 train and 200 eval pairs
    python scripts/make_quickstart_data.py --train 5000 --out /tmp/qs

The rows come from dpokit.quickstart_data.generate_pairs; the same arguments always give
byte-identical files. Train and eval use different seeds, so eval pairs are new pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from dpokit.quickstart_data import generate_pairs  # noqa: E402

TRAIN_SEED, EVAL_SEED = 0, 1


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2000, help="number of train pairs")
    p.add_argument("--eval", type=int, default=200, help="number of eval pairs")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "data" / "quickstart")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", args.train, TRAIN_SEED), ("eval", args.eval, EVAL_SEED)):
        path = args.out / f"{name}.jsonl"
        write_jsonl(path, generate_pairs(n, seed))
        print(f"wrote {n} pairs to {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
