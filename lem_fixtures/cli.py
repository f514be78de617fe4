"""The `lem` command: one subcommand per module, each module with its own parser and `main`."""

from __future__ import annotations

import importlib
import logging
import sys

# Each subcommand lives in its own module, which defines `build_parser()` and `main(argv)`.
SUBCOMMANDS = {
    "score": ("lem_fixtures.rescore", "Re-score every response of an A/B file with v2."),
    "benchmark": ("lem_fixtures.benchmark", "Run probes under baseline and kernel conditions on a model."),
    "convert": ("lem_fixtures.convert", "Convert a GGUF file into an mlx-lm model directory."),
    "info": ("lem_fixtures.info", "Print versions, backend, device and cached models."),
    "distill": ("lem_fixtures.distill", "Self-distill training data from a model under a kernel condition."),
    "train": ("lem_fixtures.training", "Train a LoRA adapter on LEM training data."),
}


def print_usage() -> None:
    print("usage: lem <command> [options]\n\ncommands:")
    for name, (_, help_text) in SUBCOMMANDS.items():
        print(f"  {name:<10} {help_text}")
    print("\nRun `lem <command> --help` for the options of one command.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_usage()
        return 0 if argv else 2

    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"lem: unknown command {name!r}; expected one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
