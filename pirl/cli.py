"""`pirl <command> ...`: a thin layer over the library's entry points."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("pirl.train", "pretrain a PIRL/NPID model (VISSL config names and overrides)"),
    "prep": ("pirl.prep", "turn an image folder into a sharded dataset on any fsspec URL"),
    "benchmark": ("pirl.benchmark", "linear evaluation and kNN of a trained trunk"),
    "extract": ("pirl.extract", "features of chosen layers for a dataset split (offline kNN/SVM)"),
    "throughput": (
        "pirl.tools.throughput",
        "images/s of training steps, per phase (a measurement)",
    ),
}
DEPRECATED = {"bench": "throughput"}


def usage() -> str:
    lines = ["usage: pirl <command> [args]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name in DEPRECATED:
        print(f"pirl: {name!r} is deprecated; use {DEPRECATED[name]!r}", file=sys.stderr)
        name = DEPRECATED[name]
    if name not in COMMANDS:
        print(f"pirl: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as exc:
        if exc.name == COMMANDS[name][0]:
            print(f"pirl: the {name!r} command is not available in this version", file=sys.stderr)
            return 2
        raise
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
