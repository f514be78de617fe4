"""The case matrix: which probe × model × condition cases a session runs, and their ids and marks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import LemError

if TYPE_CHECKING:
    from .kernels import Kernel
    from .probes import Probe

logger = logging.getLogger(__name__)

BASELINE = "baseline"

# The short benchmark is the first P20_SIZE probes of a probe set; the long one is the whole set.
P20_SIZE = 20

# The 101-probe upstream run inserts this casual probe after the first 20 probes.
UPSTREAM_CASUAL_PROBE = {
    "id": "P21_CULTURE_PLAYFULNESS",
    "domain": "Culture",
    "prompt": "cya later alligator",
}

UPSTREAM_P100_FILES = (
    "seeds/P01-P20.json",
    "seeds/P21-P40.json",
    "seeds/P41-P60.json",
    "seeds/P61-P80.json",
    "seeds/P81-P100.json",
)
# The published `json` kernel equals the second JSON document of the concatenated kernel file.
UPSTREAM_KERNEL_SPECS = ("json=kernel/lek-1-kernel.txt#2", "txt=kernel/lek-1-kernel.txt")


@dataclass(frozen=True)
class Case:
    """One probe, given to one model under one condition."""

    probe: "Probe"
    model: str
    condition: str
    kernel: "Kernel | None"
    marks: tuple[str, ...] = ()

    @property
    def case_id(self) -> str:
        return f"{self.probe.test_id}-{self.model}-{self.condition}"


@dataclass
class Matrix:
    """Probes, kernels and models of a session, with the probe ids that form the short set."""

    probes: "list[Probe]"
    kernels: "list[Kernel]"
    models: list[str]
    p20_ids: frozenset[str]
    trained_models: frozenset[str] = field(default_factory=frozenset)
    paper_models: frozenset[str] = field(default_factory=frozenset)
    # Per probe file, how many items were skipped for each reason.
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def conditions(self) -> list[str]:
        return [BASELINE, *(kernel.name for kernel in self.kernels)]

    def kernel_for(self, condition: str) -> "Kernel | None":
        for kernel in self.kernels:
            if kernel.name == condition:
                return kernel
        return None

    def cases(self) -> list[Case]:
        """Every case in a fixed order: model, then probe, then condition."""
        result = []
        for model in self.models:
            model_marks = []
            if model in self.trained_models:
                model_marks.append("training")
            if model in self.paper_models:
                model_marks.append("paper")

            for probe in self.probes:
                probe_marks = ["p100"]
                if probe.id in self.p20_ids:
                    probe_marks.insert(0, "p20")

                for condition in self.conditions:
                    marks = tuple(probe_marks + model_marks)
                    result.append(Case(probe, model, condition, self.kernel_for(condition), marks))
        return result


def upstream_probes(checkout: Path, duplicate_ids: str = "error") -> "tuple[list[Probe], frozenset[str]]":
    """Load the 101 probes of the upstream LEM A/B runs from a checkout: P01-P20, the casual probe, P21-P100."""
    from .probes import Probe, load_probes

    missing = [name for name in UPSTREAM_P100_FILES if not (checkout / name).is_file()]
    if missing:
        raise LemError(
            f"upstream checkout {checkout} lacks {', '.join(missing)}; "
            "point --lem-upstream at a LEM checkout that has the seeds/ folder"
        )

    probes = load_probes([checkout / name for name in UPSTREAM_P100_FILES], duplicate_ids=duplicate_ids)
    p20_ids = frozenset(probe.id for probe in probes[:P20_SIZE])

    casual = Probe(
        id=UPSTREAM_CASUAL_PROBE["id"],
        prompt=UPSTREAM_CASUAL_PROBE["prompt"],
        category=UPSTREAM_CASUAL_PROBE["domain"].lower(),
        source="upstream 101-probe run",
        index=P20_SIZE,
        test_id=UPSTREAM_CASUAL_PROBE["id"],
    )
    probes.insert(P20_SIZE, casual)
    return probes, p20_ids


def build_matrix(
    *,
    models: list[str],
    probe_paths: list[Path],
    kernel_specs: list[str],
    kernel_base: Path,
    upstream: Path | None = None,
    duplicate_ids: str = "error",
    trained_models: frozenset[str] = frozenset(),
    paper_models: frozenset[str] = frozenset(),
) -> Matrix:
    """Build the matrix from explicit probe files, or from an upstream checkout when one is given."""
    from .kernels import load_kernels
    from .probes import load_probe_files

    skipped: dict[str, dict[str, int]] = {}
    if upstream is not None and not probe_paths:
        probes, p20_ids = upstream_probes(upstream, duplicate_ids)
    else:
        probe_files = load_probe_files(probe_paths, duplicate_ids=duplicate_ids)
        probes = [probe for probe_file in probe_files for probe in probe_file.probes]
        skipped = {str(probe_file.path): probe_file.skipped for probe_file in probe_files if probe_file.skipped}
        p20_ids = frozenset(probe.id for probe in probes[:P20_SIZE])

    if not probes:
        sources = ", ".join(str(path) for path in probe_paths) or str(upstream)
        raise LemError(f"no usable probes in {sources}; each probe needs an id and a non-empty prompt")

    kernels = load_kernels(kernel_specs, base_dir=kernel_base)
    names = [kernel.name for kernel in kernels]
    if BASELINE in names or len(set(names)) != len(names):
        raise LemError(
            f"kernel names must be unique and not {BASELINE!r}, got {names}; "
            "name each kernel with name=path"
        )

    logger.info("matrix: %d probes x %d models x %d conditions", len(probes), len(models), len(names) + 1)
    return Matrix(probes, kernels, models, p20_ids, trained_models, paper_models, skipped)
