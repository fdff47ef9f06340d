"""Parity sweep: one conversion per distinct architecture + head, on perturbed random weights.

    python scripts/sweep.py --out sweep-out            # every distinct architecture + head
    python scripts/sweep.py --out sweep-out 'convnextv2_*'

Resumable (entries whose report passed are skipped; --force redoes them). Writes one folder
per entry with its config, parity report and manifest (the weights too with --keep-weights: the whole
sweep is ~45 GB of random weights), `summary.json` and a Markdown `summary.md` under --out.
Exit code 1 if any conversion failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.batch import convert_all, summary_table  # noqa: E402
from zoo.core.catalogue import representatives  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", nargs="?", help="glob or substring of names")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-weights", action="store_true", help="keep the converted weights")
    args = parser.parse_args()
    names = [c.name for c in representatives(args.pattern)]
    print(f"{len(names)} conversions", file=sys.stderr)
    rows, summary = convert_all(
        names,
        out_root=args.out,
        force=args.force,
        random_seed=args.seed,
        keep_weights=args.keep_weights,
        echo=lambda line: print(line, file=sys.stderr),
    )
    table = summary_table(rows)
    (args.out / "summary.md").write_text("```\n" + table + "\n```\n")
    print(table)
    return int(any(r["status"] == "failed" for r in rows))


if __name__ == "__main__":
    raise SystemExit(main())
