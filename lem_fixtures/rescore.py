"""`lem score`: re-score every response of an A/B file with the v2 heuristic and rewrite its summary."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .errors import LemError, ResultFileError
from .results import ABFile, condition_order, format_summary_table, read_ab_file, summarize, write_ab_file_atomic
from .scoring import score_v2

logger = logging.getLogger(__name__)

# Keys of the old summary line that describe the run rather than the scores, kept as they were.
KEPT_SUMMARY_KEYS = ("model", "duration", "max_tokens", "ts")


def rescore_ab_file(ab_file: ABFile) -> dict[str, Any]:
    """Re-score every condition of every probe line in place and return the new summary line.

    Raises ResultFileError when the file has no probe lines or a condition has no response text.
    A `chars` field, where present, is set to the response length again.
    """
    if not ab_file.probes:
        raise ResultFileError(f"{ab_file.path} has no probe lines, so there is nothing to re-score; pass an A/B result file")

    for line, line_number in zip(ab_file.probes, ab_file.line_numbers):
        for name, entry in line["conditions"].items():
            response = entry.get("response")
            if not isinstance(response, str):
                raise ResultFileError(
                    f"{ab_file.path} line {line_number}: condition {name!r} of probe {line['id']!r} "
                    "has no 'response' text, so it cannot be re-scored"
                )
            heuristic = score_v2(response)
            entry["lek_score"] = heuristic["lek_score"]
            entry["heuristic"] = heuristic
            if "chars" in entry:
                entry["chars"] = len(response)

    old = ab_file.summary or {}
    # Keep the condition order of the old summary, then any condition it did not list.
    names = [entry["name"] for entry in old.get("conditions", []) if isinstance(entry, dict) and "name" in entry]
    names += [name for name in condition_order(ab_file.probes) if name not in names]
    summary = summarize(ab_file.probes, model=None, max_tokens=None, duration_s=None, conditions=names)
    for key in KEPT_SUMMARY_KEYS:
        if key in old:
            summary[key] = old[key]
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lem score",
        description="Re-score every response of an A/B result file with the v2 heuristic, "
        "rewrite each lek_score, heuristic and the summary line, and print the summary.",
    )
    parser.add_argument("--input", required=True, type=Path, metavar="FILE", help="A/B result file (JSONL) to re-score")
    parser.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="file to write (default: replace --input atomically through a temporary file)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output or args.input
    try:
        ab_file = read_ab_file(args.input)
        summary = rescore_ab_file(ab_file)
        write_ab_file_atomic(output, ab_file.probes, summary)
    except LemError as error:
        print(f"lem: error: {error}", file=sys.stderr)
        return 1
    logger.info("re-scored %s: probe lines %d, written to %s", args.input, len(ab_file.probes), output)
    sys.stdout.write(format_summary_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
