"""Recorded baselines: one YAML file per model in expectations/, and the gates that compare a run with them.

A file stores, per probe and condition, the recorded `lek_score`, per condition the mean, and how the
scores were recorded (model hashes, versions, generation parameters), so a reader can tell whether a
run is comparable.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ExpectationError
from .statistics import paired_bootstrap_ci

logger = logging.getLogger(__name__)

# A case fails when its score falls more than this many points below its recorded score.
DEFAULT_CASE_TOLERANCE = 2.0
# The summary gate fails when the 95% CI of the mean drop lies wholly below minus this value.
DEFAULT_ALLOWED_DROP = 0.5
SCHEMA_VERSION = 1


@dataclass
class Expectation:
    """The recorded baseline of one model."""

    model: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    recorded: dict = field(default_factory=dict)
    case_tolerance: float = DEFAULT_CASE_TOLERANCE
    allowed_drop: float = DEFAULT_ALLOWED_DROP
    path: Path | str | None = None
    # Published condition means, for models whose per-probe figures are not available.
    published_means: dict[str, float] = field(default_factory=dict)

    def score(self, probe_id: str, condition: str) -> float | None:
        return self.scores.get(probe_id, {}).get(condition)

    def means(self) -> dict[str, float]:
        per_condition: dict[str, list[float]] = {}
        for conditions in self.scores.values():
            for condition, value in conditions.items():
                per_condition.setdefault(condition, []).append(value)
        return {name: round(sum(values) / len(values), 2) for name, values in per_condition.items()}


def expectation_path(directory: Path, model: str) -> Path:
    """Return the file of a model: its name with characters unsafe in file names replaced by `_`."""
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", model)
    return directory / f"{safe}.yaml"


def load_expectation(directory: Path, model: str) -> Expectation | None:
    """Read a model's recorded baseline, or return None when it has none."""
    path = expectation_path(directory, model)
    if not path.is_file():
        return None

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ExpectationError(f"{path}: invalid YAML: {error}; fix the file or re-record it with --lem-record") from error

    if not isinstance(data, dict) or not isinstance(data.get("probes", {}), dict):
        raise ExpectationError(f"{path}: expected a mapping with a 'probes' mapping; re-record it with --lem-record")

    scores: dict[str, dict[str, float]] = {}
    for probe_id, conditions in (data.get("probes") or {}).items():
        if not isinstance(conditions, dict):
            raise ExpectationError(f"{path}: probes.{probe_id} must map condition names to scores")
        for condition, value in conditions.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ExpectationError(
                    f"{path}: probes.{probe_id}.{condition} is {value!r}, expected a number"
                )
        scores[str(probe_id)] = {str(name): float(value) for name, value in conditions.items()}

    gate = data.get("gate") or {}
    return Expectation(
        model=str(data.get("model", model)),
        scores=scores,
        recorded=data.get("recorded") or {},
        case_tolerance=float(gate.get("case_tolerance", DEFAULT_CASE_TOLERANCE)),
        allowed_drop=float(gate.get("allowed_drop", DEFAULT_ALLOWED_DROP)),
        path=path,
    )


def save_expectation(directory: Path, expectation: Expectation) -> Path:
    """Write a baseline atomically, probes and conditions in a stable order so updates show as small diffs."""
    directory.mkdir(parents=True, exist_ok=True)
    path = expectation_path(directory, expectation.model)

    data = {
        "schema": SCHEMA_VERSION,
        "model": expectation.model,
        "gate": {"case_tolerance": expectation.case_tolerance, "allowed_drop": expectation.allowed_drop},
        "recorded": expectation.recorded,
        "means": dict(sorted(expectation.means().items())),
        "probes": {
            probe_id: dict(sorted(conditions.items())) for probe_id, conditions in sorted(expectation.scores.items())
        },
    }
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)

    handle, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.replace(temp_name, path)
    logger.info("recorded baseline %s", path)
    return path


def merge_scores(
    expectation: Expectation | None,
    model: str,
    scores: Mapping[str, Mapping[str, float]],
    recorded: dict,
) -> Expectation:
    """Return a baseline with the new scores added to or replacing the old ones."""
    merged = Expectation(model=model) if expectation is None else expectation
    for probe_id, conditions in scores.items():
        merged.scores.setdefault(probe_id, {}).update({name: float(value) for name, value in conditions.items()})

    merged.recorded = dict(recorded)
    merged.recorded["at"] = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return merged


def comparable(expectation: Expectation, run_settings: Mapping) -> str | None:
    """Return why a run cannot be compared with a baseline (different generation parameters), or None."""
    recorded = expectation.recorded.get("params")
    current = run_settings.get("params")
    if recorded is not None and current is not None and recorded != current:
        return (
            f"baseline {expectation.path} was recorded with generation parameters {recorded}, "
            f"this run uses {current}; rerun with those parameters or re-record with --lem-record"
        )
    return None


def check_case(expectation: Expectation, probe_id: str, condition: str, score: float) -> str | None:
    """Return a failure message when a case scores more than the tolerance below its baseline, else None."""
    recorded = expectation.score(probe_id, condition)
    if recorded is None:
        return None

    if score < recorded - expectation.case_tolerance:
        return (
            f"{probe_id} [{condition}] scored {score:.2f}, recorded baseline {recorded:.2f} "
            f"(drop {recorded - score:.2f} > tolerance {expectation.case_tolerance:.2f}) in {expectation.path}"
        )
    return None


@dataclass(frozen=True)
class SummaryCheck:
    """The paired comparison of one condition's scores with its baseline."""

    condition: str
    n: int
    mean_delta: float
    low: float
    high: float
    allowed_drop: float

    @property
    def failed(self) -> bool:
        return self.n > 0 and self.high < -self.allowed_drop

    def message(self) -> str:
        verdict = "FAILED" if self.failed else "passed"
        return (
            f"[{self.condition}] mean change {self.mean_delta:+.2f} over {self.n} probes, "
            f"95% CI [{self.low:+.2f}, {self.high:+.2f}], allowed drop {self.allowed_drop:.2f}: {verdict}"
        )


def check_summary(
    expectation: Expectation,
    condition: str,
    scores: Mapping[str, float],
    seed: int = 0,
) -> SummaryCheck:
    """Compare a condition's per-probe scores with the baseline through a paired bootstrap of the mean change.

    The gate fails only when the whole 95% confidence interval of the mean change lies below
    `-allowed_drop`, so one noisy probe cannot fail it on its own.
    """
    deltas: list[float] = []
    for probe_id in sorted(scores):
        recorded = expectation.score(probe_id, condition)
        if recorded is not None:
            deltas.append(scores[probe_id] - recorded)

    if not deltas and condition in expectation.published_means and scores:
        # Only the published mean is known: compare means, with no interval.
        mean_delta = sum(scores.values()) / len(scores) - expectation.published_means[condition]
        return SummaryCheck(condition, len(scores), mean_delta, mean_delta, mean_delta, expectation.allowed_drop)

    if not deltas:
        return SummaryCheck(condition, 0, 0.0, 0.0, 0.0, expectation.allowed_drop)

    interval = paired_bootstrap_ci(deltas, seed=seed)
    return SummaryCheck(condition, len(deltas), interval.mean, interval.low, interval.high, expectation.allowed_drop)


def scores_by_probe(results: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Group case results ({probe, condition, lek_score}) into {probe id: {condition: score}}."""
    grouped: dict[str, dict[str, float]] = {}
    for result in results:
        grouped.setdefault(result["probe"], {})[result["condition"]] = float(result["lek_score"])
    return grouped


def published_expectation(model: str, means: Mapping[str, float], source: str) -> Expectation:
    """A baseline made of a paper model's published condition means (see models.yaml)."""
    return Expectation(model=model, published_means=dict(means), path=source, recorded={"source": source})


def expectation_from_ab_lines(model: str, probe_lines: Sequence[Mapping], source: str) -> Expectation:
    """A baseline made of the per-probe scores of a published A/B file."""
    scores: dict[str, dict[str, float]] = {}
    for line in probe_lines:
        for condition, entry in line.get("conditions", {}).items():
            if entry.get("lek_score") is not None:
                scores.setdefault(str(line["id"]), {})[condition] = float(entry["lek_score"])
    return Expectation(model=model, scores=scores, path=source, recorded={"source": source})
