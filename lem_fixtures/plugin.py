"""The pytest plugin: options, markers, the case matrix, result collection, reports and baselines.

Cases are the parametrizations of any test that requests the `lem_case` fixture. The plain test
command collects them but deselects them. They are selected by a marker expression that names a
case marker (p20, p100, paper, training, lem_case), or by `--lem-cases`.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from pathlib import Path

import pytest

from . import cases as cases_module
from . import distill
from .backend import preload_openblas
from .errors import LemError
from .fixtures import (  # noqa: F401  (fixtures are found by name on the plugin module)
    lem_adapter,
    lem_case,
    lem_distill,
    lem_distilled,
    lem_expectation,
    lem_gate,
    lem_model,
    lem_reference,
    lem_result,
    lem_session,
    lem_summary,
    lem_train,
)
from .session import LemSession, SESSION_KEY

logger = logging.getLogger(__name__)

MARKERS = {
    "p20": "a case of the short benchmark: the first 20 probes of the probe set",
    "p100": "a case of the full benchmark: every probe of the probe set (101 for the paper's set)",
    "paper": "a case of a model from the paper's matrix (its weights must be downloaded)",
    "training": "a case that needs a LoRA-trained model (trains it on first use)",
    "lem_case": "any probe x model x condition case",
    "smoke": "a fast end-to-end check on a real model",
    "slow": "a test that takes more than about 30 seconds",
    "benchmark_suite": "a speed or memory benchmark (pytest-benchmark); deselected unless -m names it",
}
CASE_MARKERS = ("p20", "p100", "paper", "training", "lem_case")
DEFAULT_MODEL = "smollm2-135m-instruct"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lem", "LEM benchmark suite")
    group.addoption(
        "--lem-model", action="append", default=[], metavar="NAME",
        help=f"model to run: a registry name, hub id or local directory; repeatable (default: {DEFAULT_MODEL}). "
        "NAME+lek is NAME with a LoRA adapter trained in the session.",
    )
    group.addoption(
        "--lem-probes", action="append", default=[], metavar="PATH",
        help="probe file or directory, repeatable (default: probes/ of the rootdir, or the paper's 101 probes "
        "with --lem-upstream); p20 marks its first 20 probes, p100 all of them",
    )
    group.addoption(
        "--lem-kernel", action="append", default=[], metavar="NAME=PATH",
        help="kernel condition NAME from file PATH (PATH#N takes the Nth JSON document of the file); "
        "repeatable, in order (default: json=kernel/axioms.json txt=kernel/lek-kernel.txt)",
    )
    group.addoption(
        "--lem-upstream", default=os.environ.get("LEM_UPSTREAM"), metavar="DIR",
        help="an upstream LEM checkout: its 101 probes and kernels replace the project's (env LEM_UPSTREAM)",
    )
    group.addoption(
        "--lem-reference", default=os.environ.get("LEM_REFERENCE"), metavar="DIR",
        help="upstream LEM checkout used by the reference tests (env LEM_REFERENCE; "
        "default ../shared/reference/lem beside the rootdir)",
    )
    group.addoption("--lem-max-tokens", type=int, default=1024, metavar="N", help="maximum generated tokens per case (default 1024)")
    group.addoption("--lem-temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy (default 0)")
    group.addoption("--lem-top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold, in (0, 1] (default 1.0)")
    group.addoption("--lem-seed", type=int, default=0, metavar="S", help="base seed; each sampled case derives its own from it (default 0)")
    group.addoption("--lem-batch-size", type=int, default=None, metavar="N", help="cases generated together in fixed batches (default 16); 1 runs one case at a time, exactly as mlx_lm.generate does")
    group.addoption("--lem-no-cache", action="store_true", help="generate every case again instead of reading the generation cache")
    group.addoption(
        "--lem-report-dir", default="reports", metavar="DIR",
        help="folder in which each run writes a <run>/ subfolder of reports (default: reports/ of the project)",
    )
    group.addoption("--lem-no-report", action="store_true", help="write no report files")
    group.addoption(
        "--lem-record", action="store_true",
        help="write the scores of this run into <baselines folder>/<model>.yaml instead of gating on them",
    )
    group.addoption("--lem-expectations", default="expectations", metavar="DIR", help="folder of recorded baselines (default: expectations/ of the project)")
    group.addoption(
        "--lem-duplicate-ids", choices=("error", "number"), default="error",
        help="what a repeated probe id with another prompt does: fail (error, the default) or get a ~N suffix (number)",
    )
    group.addoption("--lem-cases", action="store_true", help="run the probe cases even without a case marker in -m")
    group.addoption("--lem-training-config", default=None, metavar="FILE", help="LoRA configuration for NAME+lek models (default: training/lora.yaml of the project, else the suite's paper config)")
    group.addoption("--lem-training-data", default=None, metavar="DIR", help="training data for NAME+lek models (default: training/data)")
    group.addoption(
        "--lem-training-split", choices=("train", "valid", "test"), default="train",
        help="split of the training data to train on; 'valid' suits a folder with only valid.jsonl and test.jsonl, "
        "like the upstream release, and then validates on test.jsonl (default: train)",
    )
    group.addoption(
        "--lem-distill", action="store_true",
        help="train NAME+lek models on data self-distilled from NAME (the LEK method without outside data) "
        "instead of --lem-training-data",
    )
    group.addoption(
        "--lem-distill-kernel", default=None, metavar="NAME",
        help="kernel condition that self-distillation samples under (default: the first kernel condition)",
    )
    group.addoption(
        "--lem-distill-k", type=int, default=distill.DEFAULT_K, metavar="K",
        help=f"samples per probe for self-distillation (default {distill.DEFAULT_K})",
    )
    group.addoption(
        "--lem-distill-threshold", type=float, default=distill.DEFAULT_THRESHOLD, metavar="SCORE",
        help=f"lowest v2 lek_score a sample needs to become a training example (default {distill.DEFAULT_THRESHOLD:g})",
    )
    group.addoption(
        "--lem-distill-temperature", type=float, default=distill.DEFAULT_TEMPERATURE, metavar="T",
        help=f"sampling temperature for self-distillation, above 0 (default {distill.DEFAULT_TEMPERATURE})",
    )
    group.addoption(
        "--lem-distill-max-tokens", type=int, default=None, metavar="N",
        help="maximum tokens per self-distilled sample (default: --lem-max-tokens)",
    )
    group.addoption(
        "--lem-distill-drop-truncated", action="store_true",
        help="reject self-distilled samples that stopped at the token limit, whatever their score",
    )
    group.addoption(
        "--lem-distill-probes", action="append", default=[], metavar="PATH",
        help="probe file or directory to self-distill from, repeatable (default: the session's probes; "
        "then the trained model is scored on probes it was trained on)",
    )


def pytest_cmdline_main(config: pytest.Config) -> None:
    """Under pytest-xdist, send all cases of a model to one worker unless --dist was given.

    xdist's own hook (tryfirst) has already turned -n N into --dist load by then.
    """
    dist_given = any(arg == "--dist" or arg.startswith("--dist=") for arg in config.invocation_params.args)
    if getattr(config.option, "numprocesses", None) and config.option.dist == "load" and not dist_given:
        config.option.dist = "loadgroup"


def pytest_configure(config: pytest.Config) -> None:
    # OpenBLAS must be loaded before anything imports mlx, test modules included.
    preload_openblas()

    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    session = LemSession(config)
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(session, "lem-session")


def markexpr_names(config: pytest.Config) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", config.option.markexpr or ""))


def cases_requested(config: pytest.Config) -> bool:
    return config.getoption("--lem-cases") or bool(markexpr_names(config) & set(CASE_MARKERS))


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session):
    """Pause the cyclic garbage collector while collecting: a large matrix creates hundreds of
    thousands of long-lived items, and repeated full collections over them only cost time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    wants_case = "lem_case" in metafunc.fixturenames
    wants_summary = "lem_summary" in metafunc.fixturenames
    if not (wants_case or wants_summary):
        return

    session: LemSession = metafunc.config.stash[SESSION_KEY]
    if not cases_requested(metafunc.config):
        # Collect a single placeholder that is deselected, so the plain test command stays fast.
        metafunc.parametrize("lem_case" if wants_case else "lem_summary", [None], ids=["not-selected"])
        return

    try:
        matrix = session.matrix()
    except LemError as error:
        raise pytest.UsageError(str(error)) from error

    if wants_case:
        # Cases share a handful of mark combinations; building each combination once keeps
        # collection of large probe sets fast.
        mark_sets: dict[tuple[str, tuple[str, ...]], list] = {}
        params = []
        for case in matrix.cases():
            key = (case.model, case.marks)
            marks = mark_sets.get(key)
            if marks is None:
                marks = [getattr(pytest.mark, name) for name in ("lem_case", *case.marks)]
                marks.append(pytest.mark.xdist_group(case.model))
                mark_sets[key] = marks
            params.append(pytest.param(case, marks=marks, id=case.case_id))
        metafunc.parametrize("lem_case", params)
    else:
        params = []
        all_marks = ("lem_case", "p20", "p100")
        for model in matrix.models:
            model_marks = [name for name in ("training", "paper") if name in matrix_model_marks(matrix, model)]
            for condition in matrix.conditions:
                marks = [getattr(pytest.mark, name) for name in (*all_marks, *model_marks)]
                marks.append(pytest.mark.xdist_group(model))
                params.append(pytest.param((model, condition), marks=marks, id=f"{model}-{condition}"))
        metafunc.parametrize("lem_summary", params)


def matrix_model_marks(matrix: cases_module.Matrix, model: str) -> set[str]:
    marks = set()
    if model in matrix.trained_models:
        marks.add("training")
    if model in matrix.paper_models:
        marks.add("paper")
    return marks


def is_case_item(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and ("lem_case" in callspec.params or "lem_summary" in callspec.params)


def is_placeholder(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return callspec.params.get("lem_case", 0) is None or callspec.params.get("lem_summary", 0) is None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    names = markexpr_names(config)
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        if is_placeholder(item):
            dropped.append(item)
        elif item.get_closest_marker("benchmark_suite") and "benchmark_suite" not in names:
            dropped.append(item)
        else:
            keep.append(item)

    # Summary checks read the results of their model's cases, so they run after all cases.
    cases = [item for item in keep if is_case_item(item)]
    summaries = [item for item in cases if "lem_summary" in item.callspec.params]
    if summaries:
        summary_ids = {id(item) for item in summaries}
        keep = [item for item in keep if id(item) not in summary_ids] + summaries

    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
    elif summaries:
        items[:] = keep
