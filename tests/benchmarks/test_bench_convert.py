"""Benchmarks of GGUF conversion and model loading for the two embedded models.

Run with `pytest tests/benchmarks/test_bench_convert.py -m benchmark_suite`. Each case is timed
in this process with pytest-benchmark, then run again in a fresh interpreter whose peak resident
set size lands in the benchmark's extra_info as `peak_rss_mb`, next to that run's own `seconds`.
Conversions write into a new temporary cache each time, from a GGUF already in place (Gemma's is
assembled from its chunk packages beforehand, untimed). Loads read the conversions in the user's
LEM cache (converted first if missing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lem_fixtures import convert

pytestmark = [pytest.mark.benchmark_suite, pytest.mark.xdist_group("embedded-models")]

EMBEDDED_MODELS = ["smollm2-135m-instruct", "gemma3-270m"]

MEASURE_IN_CHILD = """
import json, resource, sys, time
from lem_fixtures import convert, models
operation, name, cache = sys.argv[1:4]
started = time.perf_counter()
if operation == "convert":
    convert.convert_gguf(convert.embedded_gguf_path(name), cache_dir=cache)
else:
    models.load_model(name)
seconds = time.perf_counter() - started
# Linux keeps ru_maxrss across exec, so a child forked from a large pytest process would report
# the parent's size; VmHWM belongs to the new address space. getrusage is the fallback elsewhere.
try:
    status = open("/proc/self/status").read()
    peak_kib = int(status.split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin":
        peak_kib //= 1024  # macOS reports bytes
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kib / 1024, 1)}))
"""


def measure_in_child(operation: str, name: str, cache: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE_IN_CHILD, operation, name, str(cache)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_bench_convert_fresh_cache(benchmark, tmp_path, name):
    gguf_path = convert.embedded_gguf_path(name)
    caches = iter(tmp_path / f"cache-{round_index}" for round_index in range(100))

    def fresh_cache():
        return (gguf_path,), {"cache_dir": next(caches)}

    converted = benchmark.pedantic(convert.convert_gguf, setup=fresh_cache, rounds=1, iterations=1)

    assert convert._ready_dir(converted) == converted
    benchmark.extra_info["model"] = name
    benchmark.extra_info["child"] = measure_in_child("convert", name, tmp_path / "child-cache")


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_bench_load_model(benchmark, tmp_path, name):
    from lem_fixtures.backend import import_mlx
    from lem_fixtures.models import load_model

    # Import mlx-lm before timing, so that the first round does not time the import.
    import_mlx()
    import mlx_lm  # noqa: F401

    convert.embedded_model_dir(name)

    loaded = benchmark.pedantic(load_model, args=(name,), rounds=2, iterations=1, warmup_rounds=0)

    assert loaded.weights_sha256
    benchmark.extra_info["model"] = name
    benchmark.extra_info["child"] = measure_in_child("load", name, tmp_path)
