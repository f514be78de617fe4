"""A/B result files in the upstream JSONL format: reading, writing, summarising, printing.

One line per probe, then one summary line:

    {"type": "probe", "id", "category", "prompt", "conditions": {name: {"response", "lek_score",
     "heuristic", "chars", "time_s", ...}}, "ts"}
    {"type": "summary", "model", "total_probes", "conditions": [{"name", "avg_lek", "improved",
     "regressed", "unchanged", "delta_vs_baseline"}], "categories": {category: {name: avg}},
     "duration", "max_tokens", "ts"}

The first condition is the baseline (named "baseline" in every upstream file).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from .errors import ResultFileError

logger = logging.getLogger(__name__)

# A per-probe change above this many points counts as improved, below its negative as regressed.
CHANGE_THRESHOLD = 0.5
UNCATEGORISED = "uncategorised"


@dataclass
class ABFile:
    """The probe lines and the last summary line of an A/B file; `line_numbers[i]` is the line of probes[i]."""

    path: Path
    probes: list[dict[str, Any]]
    summary: dict[str, Any] | None
    line_numbers: list[int] = field(default_factory=list)


def _require(condition: bool, path: Path, line_number: int, problem: str) -> None:
    if not condition:
        raise ResultFileError(f"{path} line {line_number}: {problem}; fix or remove that line")


def _check_probe_line(line: Mapping[str, Any], path: Path, line_number: int) -> None:
    for key in ("id", "conditions"):
        _require(key in line, path, line_number, f"probe line has no {key!r} key")
    conditions = line["conditions"]
    _require(isinstance(conditions, dict), path, line_number, "'conditions' of a probe line must be an object")
    for name, entry in conditions.items():
        _require(isinstance(entry, dict), path, line_number, f"condition {name!r} must be an object")
        _require("lek_score" in entry, path, line_number, f"condition {name!r} has no 'lek_score' key")
        score = entry["lek_score"]
        _require(
            isinstance(score, (int, float)) and not isinstance(score, bool),
            path,
            line_number,
            f"'lek_score' of condition {name!r} must be a number, got {score!r}",
        )


def _check_summary_line(line: Mapping[str, Any], path: Path, line_number: int) -> None:
    _require("conditions" in line, path, line_number, "summary line has no 'conditions' key")
    _require(isinstance(line["conditions"], list), path, line_number, "'conditions' of a summary line must be an array")


def read_ab_file(path: str | os.PathLike[str]) -> ABFile:
    """Read an A/B file. Blank lines are ignored; when several summary lines exist, the last one wins.

    Raises ResultFileError naming the file and line for unreadable files, invalid JSON, lines
    that are not objects, unknown `type` values and missing keys.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ResultFileError(f"A/B file not found: {path}; check the path") from error
    except OSError as error:
        raise ResultFileError(f"cannot read A/B file {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise ResultFileError(
            f"A/B file {path} is not valid UTF-8 (byte {error.start}: {error.reason}); it must be UTF-8 JSONL"
        ) from error

    probes: list[dict[str, Any]] = []
    line_numbers: list[int] = []
    summary: dict[str, Any] | None = None
    for line_number, raw_line in enumerate(text.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            line = json.loads(raw_line)
        except json.JSONDecodeError as error:
            raise ResultFileError(
                f"{path} line {line_number}: invalid JSON at column {error.colno}: {error.msg}; "
                "fix or remove that line (a run killed mid-write can leave a cut-off last line)"
            ) from error
        _require(isinstance(line, dict), path, line_number, "a line must be a JSON object")
        _require("type" in line, path, line_number, "line has no 'type' key")
        if line["type"] == "probe":
            _check_probe_line(line, path, line_number)
            probes.append(line)
            line_numbers.append(line_number)
        elif line["type"] == "summary":
            _check_summary_line(line, path, line_number)
            if summary is not None:
                logger.warning("%s line %d: another summary line; the last one is used", path, line_number)
            summary = line
        else:
            _require(False, path, line_number, f"unknown line type {line['type']!r}, expected 'probe' or 'summary'")
    return ABFile(path, probes, summary, line_numbers)


def _dumps(line: Mapping[str, Any]) -> str:
    # json.dumps defaults (ASCII escapes, ", " separators), as the upstream files are written.
    return json.dumps(line) + "\n"


class ABWriter:
    """Write an A/B file one line at a time, flushing each line so a killed run keeps every finished probe.

    mode "a" (default) appends and creates a missing file, "x" requires a new file, and "w"
    truncates an existing file. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike[str], mode: Literal["a", "x", "w"] = "a") -> None:
        if mode not in ("a", "x", "w"):
            raise ValueError(f"mode must be 'a', 'x' or 'w', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._file: IO[str] | None = None

    def __enter__(self) -> ABWriter:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> None:
        try:
            self._file = open(self.path, self.mode, encoding="utf-8")
        except FileExistsError as error:
            raise ResultFileError(
                f"A/B file {self.path} exists; pass mode='a' to append to it or mode='w' to overwrite it"
            ) from error
        except OSError as error:
            raise ResultFileError(f"cannot open A/B file {self.path} for writing: {error}") from error

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, line: Mapping[str, Any]) -> None:
        if self._file is None:
            raise ResultFileError(f"A/B file {self.path} is not open; use ABWriter as a context manager")
        self._file.write(_dumps(line))
        self._file.flush()

    def write_probe(self, line: Mapping[str, Any]) -> None:
        """Append one probe line; `type` is set to "probe" when missing."""
        self._write({"type": "probe", **line} if "type" not in line else line)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Append the summary line; `type` is set to "summary" when missing."""
        self._write({"type": "summary", **summary} if "type" not in summary else summary)


def write_ab_file_atomic(path: str | os.PathLike[str], probes: Iterable[Mapping[str, Any]], summary: Mapping[str, Any] | None) -> None:
    """Write a whole A/B file through a temporary file in the same directory and os.replace.

    A crash leaves either the old file or the new one, never a mix. Raises ResultFileError.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    try:
        descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as error:
        raise ResultFileError(f"cannot create a temporary file next to {path}: {error}") from error
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            for line in probes:
                handle.write(_dumps(line))
            if summary is not None:
                handle.write(_dumps(summary))
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temp_name, path.stat().st_mode & 0o7777)
        os.replace(temp_name, path)
    except OSError as error:
        Path(temp_name).unlink(missing_ok=True)
        raise ResultFileError(f"cannot write A/B file {path}: {error}") from error
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def probe_category(line: Mapping[str, Any]) -> str:
    """Return the category of a probe line: `category`, else `domain`, else "uncategorised", lower-cased."""
    for key in ("category", "domain"):
        value = line.get(key)
        if isinstance(value, str) and value:
            return value.lower()
    return UNCATEGORISED


def condition_order(probe_lines: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return condition names in order of first appearance across the probe lines."""
    names: dict[str, None] = {}
    for line in probe_lines:
        for name in line["conditions"]:
            names.setdefault(name, None)
    return list(names)


def _mean(values: Sequence[float]) -> float:
    # Summed left to right, as the upstream summary does; Python 3.12's sum() of floats is
    # compensated and can differ in the last bit.
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def summarize(
    probe_lines: Sequence[Mapping[str, Any]],
    model: str | None,
    max_tokens: int | None,
    duration_s: float | None,
    conditions: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Build the summary line of an A/B file, computed as the published tables compute it.

    - avg_lek per condition: round(mean of lek_score, 2) over the probes that have the
      condition, 0 when none has it.
    - improved / regressed / unchanged: for each probe that has both the condition and the
      baseline (the first condition), Δ = score - baseline score; Δ > 0.5 improved, Δ < -0.5
      regressed, else unchanged. The baseline itself gets 0/0/0 and no delta.
    - delta_vs_baseline = round(avg_lek - baseline avg_lek, 2), from the rounded averages.
    - categories: {category: {condition: round(mean, 2)}}, in order of first appearance when
      walking conditions in order, and probes in order within each condition.
    `conditions` defaults to the order of first appearance in the probe lines.
    """
    names = list(conditions) if conditions is not None else condition_order(probe_lines)
    baseline = names[0] if names else None

    condition_summaries = []
    category_scores: dict[str, dict[str, list[float]]] = {}
    for name in names:
        scores: list[float] = []
        improved = regressed = unchanged = 0
        for line in probe_lines:
            entries = line["conditions"]
            if name not in entries:
                continue
            score = entries[name]["lek_score"]
            scores.append(score)
            category_scores.setdefault(probe_category(line), {}).setdefault(name, []).append(score)
            if name != baseline and baseline in entries:
                delta = score - entries[baseline]["lek_score"]
                if delta > CHANGE_THRESHOLD:
                    improved += 1
                elif delta < -CHANGE_THRESHOLD:
                    regressed += 1
                else:
                    unchanged += 1
        condition_summaries.append(
            {
                "name": name,
                "avg_lek": round(_mean(scores), 2) if scores else 0,
                "improved": improved,
                "regressed": regressed,
                "unchanged": unchanged,
            }
        )

    if condition_summaries:
        baseline_avg = condition_summaries[0]["avg_lek"]
        for entry in condition_summaries[1:]:
            entry["delta_vs_baseline"] = round(entry["avg_lek"] - baseline_avg, 2)

    categories = {
        category: {name: round(_mean(values), 2) for name, values in by_condition.items()}
        for category, by_condition in category_scores.items()
    }
    return {
        "type": "summary",
        "model": model,
        "total_probes": len(probe_lines),
        "conditions": condition_summaries,
        "categories": categories,
        "duration": f"{duration_s:.0f}s" if duration_s is not None else None,
        "max_tokens": max_tokens,
        "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def _format_number(value: Any, signed: bool = False) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return "-"


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """Format a summary line as plain-text tables: conditions with averages and changes, then categories."""
    conditions = list(summary.get("conditions", []))
    names = [entry["name"] for entry in conditions]
    header = (
        f"model: {summary.get('model')}  probes: {summary.get('total_probes')}  "
        f"max_tokens: {summary.get('max_tokens')}  duration: {summary.get('duration')}"
    )
    lines = [header, ""]

    name_width = max([len("condition"), *(len(name) for name in names)])
    lines.append(f"{'condition':<{name_width}}  {'avg_lek':>8}  {'delta':>7}  {'improved':>8}  {'regressed':>9}  {'unchanged':>9}")
    for index, entry in enumerate(conditions):
        if index == 0:
            changes = f"{'-':>8}  {'-':>9}  {'-':>9}"
        else:
            changes = f"{entry.get('improved', 0):>8}  {entry.get('regressed', 0):>9}  {entry.get('unchanged', 0):>9}"
        delta = _format_number(entry.get("delta_vs_baseline"), signed=True)
        lines.append(f"{entry['name']:<{name_width}}  {_format_number(entry.get('avg_lek')):>8}  {delta:>7}  {changes}")

    categories: Mapping[str, Mapping[str, Any]] = summary.get("categories") or {}
    if categories:
        category_width = max([len("category"), *(len(category) for category in categories)])
        column_widths = [max(len(name), 7) for name in names]
        lines.append("")
        lines.append(
            f"{'category':<{category_width}}" + "".join(f"  {name:>{width}}" for name, width in zip(names, column_widths))
        )
        for category, averages in categories.items():
            cells = "".join(
                f"  {_format_number(averages.get(name)):>{width}}" for name, width in zip(names, column_widths)
            )
            lines.append(f"{category:<{category_width}}{cells}")
    return "\n".join(lines) + "\n"
