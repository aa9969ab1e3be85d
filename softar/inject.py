"""`python -m softar.inject --nan-steps 5,6 train ...`: `softar train ...` with those optimizer steps' losses made
non-finite by a forward hook (`softar.faults.nan_steps`). The fault tests and `softar bench faults` run it as a real
process; the production CLI and training step carry no hook."""

from __future__ import annotations

import argparse
import sys

from softar import cli
from softar.faults import nan_steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softar.inject")
    parser.add_argument("--nan-steps", required=True, help="comma-separated optimizer steps (1-based)")
    args, rest = parser.parse_known_args(argv)
    with nan_steps({int(s) for s in args.nan_steps.split(",") if s.strip()}):
        return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
