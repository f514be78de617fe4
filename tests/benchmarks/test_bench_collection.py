"""Collection cost of the case matrix at the scale of the largest upstream seed corpus.

The upstream project has about 91K seed probes. This benchmark synthesises that many, collects
91K × 3 conditions × 1 model cases in a fresh pytest process and records its wall time and peak
memory (targets: 30 s, 2 GiB).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE_COUNT = 91_000
WORDS = "consent privacy network archive river ledger clinic school memory border signal migrant".split()


def synthesise_probes(path: Path, count: int) -> None:
    probes = [
        {
            "id": f"S{index:05d}_SYNTHETIC",
            "domain": WORDS[index % len(WORDS)].title(),
            "prompt": f"Probe {index}: " + " ".join(WORDS[(index + offset) % len(WORDS)] for offset in range(40)),
        }
        for index in range(count)
    ]
    path.write_text(json.dumps(probes))


def peak_rss_mib(status_text: str) -> float:
    for line in status_text.splitlines():
        if line.strip().startswith("Maximum resident set size"):
            return int(line.split(":")[1]) / 1024
    raise AssertionError(f"no peak memory in /usr/bin/time output: {status_text[-500:]}")


@pytest.mark.benchmark_suite
def test_collect_91k_probes(benchmark, tmp_path):
    probes = tmp_path / "probes.json"
    synthesise_probes(probes, PROBE_COUNT)
    (tmp_path / "test_cases.py").write_text("def test_probe(lem_case):\n    assert lem_case\n")
    command = [
        "/usr/bin/time", "-v", sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
        "-m", "p100", "--lem-probes", str(probes),
        "--lem-kernel", f"json={REPO / 'kernel' / 'axioms.json'}",
        "--lem-kernel", f"txt={REPO / 'kernel' / 'lek-kernel.txt'}",
        "test_cases.py",
    ]
    outcome = {}

    def collect():
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=True)
        outcome["seconds"] = time.perf_counter() - started
        outcome["stdout"] = completed.stdout
        outcome["peak_mib"] = peak_rss_mib(completed.stderr)

    benchmark.pedantic(collect, rounds=1, iterations=1)

    assert f"{PROBE_COUNT * 3} tests collected" in outcome["stdout"]
    benchmark.extra_info["cases"] = PROBE_COUNT * 3
    benchmark.extra_info["seconds"] = round(outcome["seconds"], 1)
    benchmark.extra_info["peak_rss_mib"] = round(outcome["peak_mib"])
    print(f"\ncollected {PROBE_COUNT * 3} cases in {outcome['seconds']:.1f} s, peak RSS {outcome['peak_mib']:.0f} MiB")
