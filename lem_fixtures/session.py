"""The state of one pytest session: its matrix, loaded models, generated responses and collected results.

A `LemSession` is registered as a pytest plugin object, so its hook methods see every test report,
also the ones that pytest-xdist workers send to the controller.
"""

from __future__ import annotations

import datetime
import logging
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from . import __version__
from . import cases as cases_module
from .errors import LemError, ModelNotAvailableError
from .session_training import SessionTraining

logger = logging.getLogger(__name__)

SESSION_KEY = pytest.StashKey["LemSession"]()
TRAINED_SUFFIX = "+lek"
DEFAULT_MODEL = "smollm2-135m-instruct"
# Cases generated together. For SmolLM2 in float32 on a 2-core CPU, mlx-lm's batched decoding
# gave 124 tokens/s at batch 16 against 18.7 for one stream. Fixed batches (LemSession.blocks)
# keep every response reproducible; batch size 1 reproduces mlx_lm.generate exactly.
SUITE_BATCH_SIZE = 16
DEFAULT_KERNELS = ("json=kernel/axioms.json", "txt=kernel/lek-kernel.txt")


class LemProbeWarning(UserWarning):
    """A probe file with items that cannot be used as probes."""


class LemSession:
    """Matrix, engine and results of one pytest session."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.started = time.time()
        self.run_name = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.report_paths: list[Path] = []
        self.items: list[pytest.Item] = []
        self.gate_messages: list[str] = []
        self._matrix: cases_module.Matrix | None = None
        self._loaded: dict[str, Any] = {}
        self._responses: dict[str, dict[str, Any]] = {}
        self._prefetched: set[str] = set()
        self._unavailable: dict[str, str] = {}
        self._failed: dict[str, str] = {}
        self.training = SessionTraining(self)

    # Configuration

    def option(self, name: str) -> Any:
        return self.config.getoption(name)

    def resolve(self, value: str | Path) -> Path:
        """Resolve a path given on the command line against the directory pytest was started in."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.config.invocation_params.dir) / path

    def project_dir(self) -> Path:
        """Return the project folder, which contains probes/, kernel/ and expectations/: the pytest.ini folder, else the start folder.

        Not the rootdir: pytest picks the rootdir before plugin options are known, so the value of
        `--lem-probes PATH` written with a space can move it elsewhere.
        """
        if self.config.inipath is not None:
            return Path(self.config.inipath).parent
        return Path(self.config.invocation_params.dir)

    def path_option(self, name: str, default: str) -> Path:
        """Resolve a path option; its default is taken relative to the project folder."""
        value = self.option(name)
        if value:
            return self.resolve(value)
        return self.project_dir() / default

    def upstream(self) -> Path | None:
        value = self.option("--lem-upstream")
        if not value:
            return None
        path = Path(value).expanduser()
        path = path if path.is_absolute() else (Path.cwd() / path)
        if not path.is_dir():
            raise LemError(f"--lem-upstream {value}: not a directory; give the path of an upstream LEM checkout")
        return path.resolve()

    def model_names(self) -> list[str]:
        names = list(self.option("--lem-model") or [])
        markexpr = self.config.option.markexpr or ""
        if not names:
            names = [DEFAULT_MODEL]
            if "paper" in markexpr:
                names = self.paper_model_names()
        if "training" in markexpr and not any(name.endswith(TRAINED_SUFFIX) for name in names):
            names = names + [f"{DEFAULT_MODEL}{TRAINED_SUFFIX}"]
        return names

    def paper_model_names(self) -> list[str]:
        from .models import load_registry

        return [spec.name for spec in load_registry().values() if not spec.embedded]

    def generation_params(self):
        from .generation import GenerationParams

        return GenerationParams(**self.params_dict())

    def params_dict(self) -> dict[str, Any]:
        """Generation parameters; greedy runs carry no seed, since it cannot change their output."""
        temperature = self.option("--lem-temperature")
        return {
            "max_tokens": self.option("--lem-max-tokens"),
            "temperature": temperature,
            "top_p": self.option("--lem-top-p"),
            "seed": self.option("--lem-seed") if temperature > 0 else None,
        }

    def matrix(self) -> cases_module.Matrix:
        if self._matrix is not None:
            return self._matrix

        upstream = self.upstream()
        probe_paths = [self.resolve(value) for value in self.option("--lem-probes")]
        if not probe_paths and upstream is None:
            probe_paths = [self.project_dir() / "probes"]

        kernel_specs = list(self.option("--lem-kernel")) or list(
            cases_module.UPSTREAM_KERNEL_SPECS if upstream is not None else DEFAULT_KERNELS
        )
        if self.option("--lem-kernel"):
            kernel_base = Path(self.config.invocation_params.dir)
        else:
            kernel_base = upstream if upstream is not None else self.project_dir()

        models = self.model_names()
        markexpr = self.config.option.markexpr or ""
        paper = frozenset(self.paper_model_names()) if "paper" in markexpr else frozenset()
        self._matrix = cases_module.build_matrix(
            models=models,
            probe_paths=probe_paths,
            kernel_specs=kernel_specs,
            kernel_base=kernel_base,
            upstream=upstream,
            duplicate_ids=self.option("--lem-duplicate-ids"),
            trained_models=frozenset(m for m in models if m.endswith(TRAINED_SUFFIX)),
            paper_models=frozenset(m for m in models if m in paper),
        )
        return self._matrix

    # Models and generation

    def model(self, name: str):
        """Load a model once; loading another one releases the previous, since cases arrive grouped by model."""
        if name in self._loaded:
            return self._loaded[name]

        from .models import load_model

        if name in self._unavailable:
            pytest.skip(self._unavailable[name])
        if name in self._failed:
            pytest.fail(self._failed[name], pytrace=False)

        self._loaded.clear()
        adapter = None
        base = name
        if name.endswith(TRAINED_SUFFIX):
            base = name[: -len(TRAINED_SUFFIX)]
            try:
                adapter = self.trained_adapter(base)
            except ModelNotAvailableError as error:
                self._unavailable[name] = str(error)
            except LemError as error:
                # Training failed: every case of the model fails with the same message, without training again.
                self._failed[name] = f"cannot train {name}: {error}"
            if name in self._unavailable:
                pytest.skip(self._unavailable[name])
            if name in self._failed:
                pytest.fail(self._failed[name], pytrace=False)

        logger.info("loading model %s", name)
        try:
            loaded = load_model(base, adapter_path=adapter)
        except ModelNotAvailableError as error:
            # Every case of a model that is not downloaded skips with the command that downloads it.
            self._unavailable[name] = str(error)
            pytest.skip(str(error))
        self._loaded[name] = loaded
        return loaded

    def trained_adapter(self, base: str) -> Path:
        return self.training.adapter(base).path

    def check_options(self) -> None:
        """Reject option values that cannot work, before anything is loaded or generated."""
        problems = []
        for name in ("--lem-max-tokens", "--lem-batch-size", "--lem-distill-k", "--lem-distill-max-tokens"):
            value = self.option(name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        problems.extend(self.training.option_problems())
        if problems:
            raise pytest.UsageError("; ".join(problems))

    def selected_cases(self, model: str) -> list[cases_module.Case]:
        """Every selected case of a model in this session, in run order."""
        found = []
        for item in self.items:
            case = getattr(item, "callspec", None) and item.callspec.params.get("lem_case")
            if case is not None and case.model == model:
                found.append(case)
        return found

    def batch_size(self) -> int:
        value = self.option("--lem-batch-size")
        return SUITE_BATCH_SIZE if value is None else value

    def blocks(self, model: str) -> list[list[cases_module.Case]]:
        """Split a model's cases of the whole matrix into fixed generation batches.

        The batches do not depend on -k or -m, so a case gets the same response whether it runs
        alone or with the whole matrix. The short set's cases are batched apart from the rest, so
        `-m p20` generates exactly its own cases.
        """
        size = self.batch_size()
        cases = [case for case in self.matrix().cases() if case.model == model]
        short = [case for case in cases if "p20" in case.marks]
        rest = [case for case in cases if "p20" not in case.marks]

        blocks = []
        for group in (short, rest):
            blocks.extend(group[start:start + size] for start in range(0, len(group), size))
        return blocks

    def response(self, case: cases_module.Case) -> dict[str, Any]:
        """Return the response of a case. The first call for a model generates every batch that contains a selected case."""
        if case.case_id not in self._responses and case.model not in self._prefetched:
            self._prefetched.add(case.model)
            selected = {selected.case_id for selected in self.selected_cases(case.model)} | {case.case_id}
            blocks = [block for block in self.blocks(case.model) if any(c.case_id in selected for c in block)]
            if self.batch_size() == 1:
                blocks = [[c for block in blocks for c in block if c.case_id in selected]]
            for number, block in enumerate(blocks, start=1):
                self.generate(case.model, block, f"{case.model} batch {number}/{len(blocks)}")

        if case.case_id not in self._responses:
            block = next(block for block in self.blocks(case.model) if case in block)
            self.generate(case.model, block if self.batch_size() > 1 else [case], case.model)
        return self._responses[case.case_id]

    def generate(self, model_name: str, batch: Sequence[cases_module.Case], label: str) -> None:
        from .engine import generate_cases

        loaded = self.model(model_name)
        params = self.generation_params()
        records = generate_cases(
            loaded,
            [(case.probe.prompt, case.kernel.text if case.kernel else None) for case in batch],
            params,
            batch_size=self.batch_size(),
            use_cache=not self.option("--lem-no-cache"),
            progress=self.progress,
            label=label,
        )
        adapter_path = getattr(loaded, "adapter_path", None)
        for case, record in zip(batch, records):
            if adapter_path is not None:
                record = {**record, "adapter_path": str(adapter_path)}
            self._responses[case.case_id] = record

    def progress(self, message: str) -> None:
        """Print a progress line past pytest's output capture, since generation runs inside a fixture."""
        capture = self.config.pluginmanager.getplugin("capturemanager")
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        if capture is None or reporter is None:
            logger.info(message)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"lem: {message}")

    # Results, gates and reports

    def add_result(self, result: dict[str, Any]) -> None:
        self.results.append(result)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == "lem_result":
                self.add_result(value)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """Build the matrix before collection when cases are requested, so a bad option fails at once."""
        from .plugin import cases_requested

        self.check_options()
        if cases_requested(self.config):
            try:
                matrix = self.matrix()
            except LemError as error:
                raise pytest.UsageError(str(error)) from error

            for path, reasons in matrix.skipped.items():
                details = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
                self.config.issue_config_time_warning(
                    LemProbeWarning(f"{path}: skipped unusable probe items ({details}); fix or remove them"),
                    stacklevel=2,
                )

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)

    def expectations_dir(self) -> Path:
        return self.path_option("--lem-expectations", "expectations")

    def expectation(self, model: str):
        """Return the model's baseline: its file in expectations/, else the published LEM figures in models.yaml."""
        from . import expectations as expectations_module

        recorded = expectations_module.load_expectation(self.expectations_dir(), model)
        if recorded is not None:
            return recorded
        return self.published_expectation(model)

    def published_expectation(self, model: str):
        """Per-probe figures from the upstream checkout's A/B file when it has one, else the published means."""
        from . import expectations as expectations_module
        from .models import load_registry

        spec = load_registry().get(model)
        if spec is None or spec.embedded or self._matrix is None:
            return None

        probe_set = "p100" if len(self._matrix.probes) > cases_module.P20_SIZE else "p20"
        run = spec.published.get(probe_set)
        if run is None or run.scorer != "v2":
            return None

        upstream = self.upstream()
        if upstream is not None and (upstream / "benchmarks" / run.file).is_file():
            from .results import read_ab_file

            source = upstream / "benchmarks" / run.file
            return expectations_module.expectation_from_ab_lines(model, read_ab_file(source).probes, str(source))
        return expectations_module.published_expectation(model, run.avg_lek, f"models.yaml published.{probe_set} of {model}")

    def results_for(self, model: str, condition: str | None = None) -> list[dict[str, Any]]:
        return [
            result for result in self.results
            if result["model"] == model and (condition is None or result["condition"] == condition)
        ]

    def run_settings(self) -> dict[str, Any]:
        """The configuration that reproduces this run; stored with reports and recorded baselines."""
        matrix = self._matrix
        settings: dict[str, Any] = {
            "params": self.params_dict(),
            "lem_fixtures": __version__,
            "python": platform.python_version(),
            "argv": sys.argv[1:],
        }
        if matrix is not None:
            settings["kernels"] = {kernel.name: {"path": str(kernel.path), "sha256": kernel.sha256} for kernel in matrix.kernels}
            settings["probes"] = sorted({probe.source for probe in matrix.probes})
        return settings

    def finish(self) -> None:
        if not self.results:
            return

        if self.option("--lem-record"):
            self.record_baselines()

        if not self.option("--lem-no-report"):
            from .reports import write_reports

            run_dir = self.path_option("--lem-report-dir", "reports") / self.run_name
            self.report_paths = write_reports(run_dir, self.results, self.run_settings(), time.time() - self.started)

    def record_baselines(self) -> None:
        from . import expectations as expectations_module

        by_model: dict[str, list[dict[str, Any]]] = {}
        for result in self.results:
            by_model.setdefault(result["model"], []).append(result)

        for model, results in by_model.items():
            recorded = self.run_settings()
            recorded.pop("argv", None)
            recorded["model"] = results[0].get("model_info", {})
            recorded["versions"] = results[0].get("versions", {})
            current = self.expectation(model)
            merged = expectations_module.merge_scores(
                current, model, expectations_module.scores_by_probe(results), recorded
            )
            path = expectations_module.save_expectation(self.expectations_dir(), merged)
            self.gate_messages.append(f"recorded {len(results)} scores of {model} in {path}")

    def terminal_lines(self) -> list[str]:
        if not self.results:
            return []

        from .reports import terminal_table

        lines = terminal_table(self.results)
        lines.extend(self.gate_messages)
        for path in self.report_paths:
            if path.suffix == ".html":
                lines.append(f"report: {path}")
        return lines

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        lines = self.terminal_lines()
        if not lines:
            return
        terminalreporter.section("LEM benchmark")
        for line in lines:
            terminalreporter.write_line(line)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput"):
            return
        self.finish()
