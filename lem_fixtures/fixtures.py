"""Fixtures of the plugin: the case, its model, its scored result, its baseline and the gates."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from .cases import Case
from .errors import LemError
from .session import SESSION_KEY, LemSession

class LemBaselineWarning(UserWarning):
    """A case ran without a recorded baseline to compare with."""


REFERENCE_DEFAULT = Path("..") / "shared" / "reference" / "lem"


@pytest.fixture(scope="session")
def lem_session(request: pytest.FixtureRequest) -> LemSession:
    """The session's matrix, models, responses and results."""
    return request.config.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def lem_reference(request: pytest.FixtureRequest) -> Path:
    """Path of an upstream LEM checkout for reference tests; skips the test when there is none."""
    value = request.config.getoption("--lem-reference") or os.environ.get("LEM_REFERENCE")
    path = Path(value) if value else Path(request.config.rootpath) / REFERENCE_DEFAULT
    if not path.is_absolute():
        path = Path(request.config.rootpath) / path
    if not (path / "benchmarks").is_dir() or not (path / "seeds").is_dir():
        pytest.skip(
            f"no upstream LEM checkout at {path}: pass --lem-reference DIR or set LEM_REFERENCE "
            "to a folder with seeds/ and benchmarks/"
        )
    return path.resolve()


def _or_fail(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call `function`; a LemError becomes a test failure that shows its message without a traceback."""
    try:
        return function(*args, **kwargs)
    except LemError as error:
        message = str(error)
    pytest.fail(message, pytrace=False)


def _default_base(lem_session: LemSession) -> str:
    """The base model that the training fixtures use when a test names none."""
    from .session import DEFAULT_MODEL, TRAINED_SUFFIX

    for name in lem_session.model_names():
        if name.endswith(TRAINED_SUFFIX):
            return name[: -len(TRAINED_SUFFIX)]
    names = lem_session.option("--lem-model")
    return names[0] if names else DEFAULT_MODEL


@pytest.fixture(scope="session")
def lem_distill(lem_session: LemSession) -> Callable[..., Any]:
    """Self-distill training data: `lem_distill(model=None, **settings)` returns a distill.DistillResult.

    The defaults come from the --lem-distill-* options: the first kernel condition, k samples per
    probe, the v2 threshold, temperature sampling with fixed seeds, and the session's probes.
    Settings (kernel, probes, k, threshold, max_tokens, temperature, top_p, seed) override them.
    The data is cached across sessions and distilled once under pytest-xdist.
    """
    def distill(model: str | None = None, **settings: Any) -> Any:
        return _or_fail(lem_session.training.distilled, model or _default_base(lem_session), **settings)

    return distill


@pytest.fixture(scope="session")
def lem_distilled(lem_distill: Callable[..., Any]) -> Any:
    """Training data self-distilled from the session's base model with the --lem-distill-* options.

    A distill.DistillResult: data_dir contains train.jsonl (examples without the kernel) and
    distill.json; keep_rate and mean_kept_score are the bookkeeping.
    """
    return lem_distill()


@pytest.fixture(scope="session")
def lem_train(lem_session: LemSession) -> Callable[..., Any]:
    """Train a LoRA adapter: `lem_train(model=None, data=None, config=None, split="train")` returns a training.CachedAdapter.

    Defaults: the session's base model, --lem-training-data and --lem-training-config. The adapter
    is cached under a key of base weights, data and config, so a later session reuses it, and a
    file lock makes one pytest-xdist worker train while the others wait.
    """
    from .training import ensure_adapter

    def train(
        model: str | None = None,
        data: str | os.PathLike[str] | None = None,
        config: str | os.PathLike[str] | None = None,
        split: str | None = None,
    ) -> Any:
        base = model or _default_base(lem_session)
        data_dir = lem_session.resolve(data) if data is not None else lem_session.path_option("--lem-training-data", "training/data")
        config_path = lem_session.resolve(config) if config is not None else lem_session.training.config_path()
        return _or_fail(ensure_adapter, base, data_dir, config_path, train_split=split or lem_session.option("--lem-training-split"))

    return train


@pytest.fixture(scope="session")
def lem_adapter(lem_session: LemSession) -> Any:
    """The adapter of the session's NAME+lek model (a training.CachedAdapter), trained on first use.

    It is the adapter that the trained cases load: --lem-training-data, or self-distilled data
    with --lem-distill, and --lem-training-config.
    """
    return _or_fail(lem_session.training.adapter, _default_base(lem_session))


@pytest.fixture
def lem_case(request: pytest.FixtureRequest) -> Case:
    """The probe × model × condition of this test; the plugin parametrizes it."""
    param = getattr(request, "param", None)
    if param is None:
        pytest.skip("lem_case is parametrized by the lem plugin; select cases with -m p20, -m p100 or --lem-cases")
    return param


@pytest.fixture
def lem_model(lem_case: Case, lem_session: LemSession) -> Any:
    """The loaded model of this case; each model is loaded once per session (per worker under xdist)."""
    return lem_session.model(lem_case.model)


@pytest.fixture
def lem_result(lem_case: Case, lem_session: LemSession, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Generate (or read from the cache) and v2-score this case's response, and hand it to the reports."""
    from .scoring import score_v2

    record = lem_session.response(lem_case)
    heuristic = score_v2(record["response"])
    result = {
        "probe": lem_case.probe.id,
        "test_id": lem_case.probe.test_id,
        "category": lem_case.probe.category,
        "prompt": lem_case.probe.prompt,
        "model": lem_case.model,
        "condition": lem_case.condition,
        "kernel": None if lem_case.kernel is None else lem_case.kernel.name,
        "lek_score": heuristic["lek_score"],
        "heuristic": heuristic,
        **record,
    }
    request.node.user_properties.append(("lem_result", result))
    return result


@pytest.fixture
def lem_expectation(lem_case: Case, lem_session: LemSession) -> Any:
    """The recorded baseline of this case's model, or None when it has none."""
    return lem_session.expectation(lem_case.model)


@pytest.fixture
def lem_summary(request: pytest.FixtureRequest) -> tuple[str, str]:
    """The (model, condition) of a summary check; the plugin parametrizes it."""
    param = getattr(request, "param", None)
    if param is None:
        pytest.skip("lem_summary is parametrized by the lem plugin; select cases with -m p20 or -m p100")
    return param


@dataclass
class Gate:
    """Compares results with recorded baselines and fails the test with a message that names the case."""

    session: LemSession

    def recording(self) -> bool:
        return bool(self.session.option("--lem-record"))

    def baseline(self, model: str) -> Any:
        from . import expectations as expectations_module

        expectation = self.session.expectation(model)
        if expectation is None:
            return None

        reason = expectations_module.comparable(expectation, self.session.run_settings())
        if reason:
            pytest.skip(reason)
        return expectation

    def case_failure(self, result: dict[str, Any]) -> str | None:
        """Return why a case fails its baseline, or None; a case without a baseline passes with a warning."""
        if self.recording():
            return None

        expectation = self.baseline(result["model"])
        if expectation is None or expectation.score(result["probe"], result["condition"]) is None:
            where = f"{result['model']}" if expectation is None else f"{expectation.path}"
            warnings.warn(
                LemBaselineWarning(
                    f"no recorded baseline for {result['probe']} [{result['condition']}] in {where}; "
                    "record one with --lem-record"
                ),
                stacklevel=2,
            )
            return None

        from . import expectations as expectations_module

        return expectations_module.check_case(expectation, result["probe"], result["condition"], result["lek_score"])

    def check_summary(self, model: str, condition: str) -> Any:
        from . import expectations as expectations_module

        results = self.session.results_for(model, condition)
        if not results:
            pytest.skip(f"no case of {model} [{condition}] ran in this session")
        if self.recording():
            pytest.skip("recording baselines with --lem-record; nothing to compare")

        expectation = self.baseline(model)
        if expectation is None:
            pytest.skip(f"no recorded baseline for {model}; record one with --lem-record")

        scores = {result["probe"]: result["lek_score"] for result in results}
        check = expectations_module.check_summary(expectation, condition, scores)
        if check.n == 0:
            pytest.skip(f"{expectation.path} has no scores for the {condition} cases of this run")
        return check


@pytest.fixture
def lem_gate(lem_session: LemSession) -> Gate:
    """The score gate: `check_case(result)` per case, `check_summary(model, condition)` per model."""
    return Gate(lem_session)
