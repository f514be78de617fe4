"""Time and peak memory of loading probe files: the project's probes/ and every reference seed file.

Run with: pytest tests/benchmarks/test_bench_probes.py -m benchmark_suite --dist no
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from lem_fixtures.probes import PROBE_FILE_SUFFIXES, load_probes

PROJECT_PROBES = Path(__file__).resolve().parents[2] / "probes"


def peak_memory_mb(load) -> float:
    """Run load once under tracemalloc and return the peak of traced Python allocations in MB."""
    tracemalloc.start()
    try:
        load()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 1e6


@pytest.mark.benchmark_suite
def test_load_project_probes(benchmark):
    if not any(path.suffix in PROBE_FILE_SUFFIXES for path in PROJECT_PROBES.glob("*")):
        pytest.skip(f"{PROJECT_PROBES} has no probe files yet")

    probes = benchmark(load_probes, [PROJECT_PROBES])

    benchmark.extra_info["probes"] = len(probes)
    benchmark.extra_info["peak_memory_mb"] = round(peak_memory_mb(lambda: load_probes([PROJECT_PROBES])), 2)


@pytest.mark.benchmark_suite
def test_load_every_reference_seed_file(benchmark, lem_reference):
    # The upstream aggregate files reuse ids for different prompts, so they need numbering.
    folders = [lem_reference / "seeds", lem_reference / "seeds" / "regional"]
    files = [path for folder in folders for path in folder.iterdir() if path.suffix in PROBE_FILE_SUFFIXES]

    probes = benchmark.pedantic(load_probes, args=(folders,), kwargs={"duplicate_ids": "number"}, rounds=5, iterations=1)

    benchmark.extra_info["files"] = len(files)
    benchmark.extra_info["megabytes"] = round(sum(path.stat().st_size for path in files) / 1e6, 2)
    benchmark.extra_info["probes"] = len(probes)
    benchmark.extra_info["peak_memory_mb"] = round(
        peak_memory_mb(lambda: load_probes(folders, duplicate_ids="number")), 2
    )
