"""``python -m modelopt_c``: the command-line tool (demo and bench for now)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m modelopt_c", description="modelopt_c command-line tool")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="apply two example modes, save, restore, check", add_help=False)
    sub.add_parser("bench", help="run benchmarks/run.py with the remaining arguments", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from modelopt_c.demo import main as demo

        return demo(rest)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run.py")
    return subprocess.call([sys.executable, script, *rest])


if __name__ == "__main__":
    raise SystemExit(main())
