"""Fixtures shared by the test modules."""

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASE_TEST = (REPO / "tests" / "test_benchmark_cases.py").read_text()


@pytest.fixture
def small_project(pytester):
    """A project with two probes, the own kernels and the real benchmark test module.

    Tests run it in a subprocess: an in-process run would unload mlx after the first inner
    session, and a native extension cannot be imported a second time.
    """
    probes = pytester.path / "probes"
    probes.mkdir()
    (probes / "P-small.json").write_text(
        '[{"id": "P01_TEST_CAPITAL", "domain": "Geography", "prompt": "What is the capital of France?"},\n'
        ' {"id": "P02_TEST_KIND", "domain": "Ethics", "prompt": "Is it kind to share a secret?"}]\n'
    )
    shutil.copytree(REPO / "kernel", pytester.path / "kernel")
    pytester.makepyfile(test_benchmark_cases=CASE_TEST)
    pytester.makeini("[pytest]\n")
    return pytester
