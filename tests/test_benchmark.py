"""`lem benchmark`: A/B file format, resuming, stale-output checks, and round trips through `lem score`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lem_fixtures import benchmark
from lem_fixtures.benchmark import BenchmarkConfig, EXTRA_CONDITION_KEYS, run_benchmark
from lem_fixtures.cache import GenerationCache
from lem_fixtures.errors import ResultFileError
from lem_fixtures.generation import GenerationParams
from lem_fixtures.results import read_ab_file, summarize
from lem_fixtures.scoring import score_v2

from tiny_model import build_tiny_model

pytest.importorskip("mlx_lm")

UPSTREAM_CONDITION_KEYS = ("response", "lek_score", "heuristic", "chars", "time_s")
TINY_PROBES = [
    {"id": "P01_TINY_HELLO", "domain": "Identity", "prompt": "hello world"},
    {"id": "P02_TINY_CONSENT", "domain": "Privacy", "prompt": "tell me about consent and dignity"},
    {"id": "P03_TINY_WHY", "domain": "Privacy", "prompt": "why is the kernel kind ?"},
]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=64).path


@pytest.fixture
def tiny_setup(tmp_path, tiny_model_dir):
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps(TINY_PROBES))
    (tmp_path / "a.txt").write_text("be kind and honest")
    (tmp_path / "b.json").write_text('{"axiom": "consent and dignity"}\n')
    config = BenchmarkConfig(
        model=str(tiny_model_dir),
        kernel_specs=(f"kind={tmp_path / 'a.txt'}", f"axioms={tmp_path / 'b.json'}"),
        prompt_paths=(probes,),
        output=tmp_path / "ab.jsonl",
        params=GenerationParams(max_tokens=8),
    )
    cache = GenerationCache(tmp_path / "cache.sqlite", enabled=True)
    yield config, cache
    cache.close()


def assert_valid_ab_file(path: Path, probe_ids: list[str], conditions: list[str]) -> None:
    ab_file = read_ab_file(path)

    assert [line["id"] for line in ab_file.probes] == probe_ids
    assert ab_file.summary is not None
    assert path.read_text().splitlines()[-1].startswith('{"type": "summary"')
    for line in ab_file.probes:
        assert list(line["conditions"]) == conditions
        for entry in line["conditions"].values():
            assert set(UPSTREAM_CONDITION_KEYS + EXTRA_CONDITION_KEYS) <= set(entry)
            assert entry["heuristic"] == score_v2(entry["response"])
            assert entry["lek_score"] == entry["heuristic"]["lek_score"]
            assert entry["chars"] == len(entry["response"])
            assert entry["finish_reason"] in ("stop", "length")
    assert [entry["name"] for entry in ab_file.summary["conditions"]] == conditions
    expected = summarize(ab_file.probes, ab_file.summary["model"], ab_file.summary["max_tokens"], None, conditions)
    assert ab_file.summary["conditions"] == expected["conditions"]
    assert ab_file.summary["categories"] == expected["categories"]


# ---------------------------------------------------------------------------------------------
# Runs on a tiny model


def test_run_writes_valid_ab_file(tiny_setup):
    config, cache = tiny_setup

    result = run_benchmark(config, cache)

    assert_valid_ab_file(config.output, [p["id"] for p in TINY_PROBES], ["baseline", "kind", "axioms"])
    assert result.generated == 9
    assert result.cached == 0
    assert result.summary["total_probes"] == 3
    assert result.summary["max_tokens"] == 8
    assert result.summary["model"] == config.model


def test_run_records_modes(tiny_setup):
    config, cache = tiny_setup

    result = run_benchmark(config, cache)

    modes = {name: entry["mode"] for name, entry in result.probe_lines[0]["conditions"].items()}
    assert modes == {"baseline": "chat", "kind": "chat-system", "axioms": "chat-system"}


def test_finished_output_rejected_without_overwrite(tiny_setup):
    config, cache = tiny_setup
    run_benchmark(config, cache)

    with pytest.raises(ResultFileError, match="--overwrite"):
        run_benchmark(config, cache)


def test_overwrite_serves_cache(tiny_setup):
    config, cache = tiny_setup
    first = run_benchmark(config, cache)

    second = run_benchmark(replace(config, overwrite=True), cache)

    assert second.generated == 0
    assert second.cached == 9
    assert_valid_ab_file(config.output, [p["id"] for p in TINY_PROBES], ["baseline", "kind", "axioms"])
    responses = [[e["response"] for e in line["conditions"].values()] for line in second.probe_lines]
    assert responses == [[e["response"] for e in line["conditions"].values()] for line in first.probe_lines]


def test_no_cache_generates_again(tiny_setup):
    config, cache = tiny_setup
    run_benchmark(config, cache)
    disabled = GenerationCache(enabled=False)

    again = run_benchmark(replace(config, overwrite=True), disabled)

    assert again.generated == 9
    assert again.cached == 0


class SimulatedCrash(Exception):
    pass


def crash_after(monkeypatch, cases: int) -> None:
    """Make the run die while handling its `cases`-th finished case, as a killed process would."""
    real_entry = benchmark.condition_entry
    seen = []

    def entry_then_crash(result):
        seen.append(result)
        if len(seen) == cases:
            raise SimulatedCrash
        return real_entry(result)

    monkeypatch.setattr(benchmark, "condition_entry", entry_then_crash)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_crashed_run_resumes(tiny_setup, monkeypatch, batch_size):
    config, cache = replace(tiny_setup[0], batch_size=batch_size), tiny_setup[1]
    crash_after(monkeypatch, 5)
    with pytest.raises(SimulatedCrash):
        run_benchmark(config, cache)
    monkeypatch.undo()
    partial = read_ab_file(config.output)
    assert partial.summary is None
    assert len(partial.probes) <= 1

    resumed = run_benchmark(config, cache)

    assert resumed.resumed_probes == len(partial.probes)
    # Five cases finished before the crash: each was either written in a probe line or cached.
    assert resumed.cached + 3 * resumed.resumed_probes == 5
    assert resumed.generated == 9 - 5
    assert_valid_ab_file(config.output, [p["id"] for p in TINY_PROBES], ["baseline", "kind", "axioms"])


@pytest.mark.parametrize(
    "change",
    ["max_tokens", "kernel_text", "model"],
)
def test_resume_with_changed_setup_rejected(tiny_setup, monkeypatch, tmp_path, change):
    config, cache = tiny_setup
    crash_after(monkeypatch, 4)
    with pytest.raises(SimulatedCrash):
        run_benchmark(config, cache)
    monkeypatch.undo()
    assert len(read_ab_file(config.output).probes) == 1

    if change == "max_tokens":
        changed = replace(config, params=GenerationParams(max_tokens=9))
    elif change == "kernel_text":
        (tmp_path / "a.txt").write_text("be kind, honest and brief")
        changed = config
    else:
        other = build_tiny_model(tmp_path / "other", hidden_size=64, seed=1).path
        changed = replace(config, model=str(other))

    with pytest.raises(ResultFileError, match="cache_key differs"):
        run_benchmark(changed, cache)


def test_output_with_unknown_probe_rejected(tiny_setup):
    config, cache = tiny_setup
    line = {"type": "probe", "id": "P99_ELSEWHERE", "conditions": {"baseline": {"lek_score": 1.0}}}
    config.output.write_text(json.dumps(line) + "\n")

    with pytest.raises(ResultFileError, match="P99_ELSEWHERE"):
        run_benchmark(config, cache)


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_end_to_end_on_tiny_model(tiny_setup, monkeypatch, capsys):
    config, _ = tiny_setup
    monkeypatch.setenv("LEM_CACHE_DIR", str(config.output.parent / "cli-cache"))
    argv = [
        "--model", config.model, "--prompts", str(config.prompt_paths[0]), "--output", str(config.output),
        "--kernel", config.kernel_specs[0], "--max-tokens", "6", "--batch-size", "2",
    ]

    code = benchmark.main(argv)

    assert code == 0
    assert "avg_lek" in capsys.readouterr().out
    assert_valid_ab_file(config.output, [p["id"] for p in TINY_PROBES], ["baseline", "kind"])
    assert (config.output.parent / "cli-cache" / "generations.sqlite").is_file()


def test_cli_duplicate_ids_option(tiny_setup, monkeypatch, capsys):
    config, _ = tiny_setup
    monkeypatch.setenv("LEM_CACHE_DIR", str(config.output.parent / "cli-cache"))
    repeated = config.output.parent / "repeated.json"
    repeated.write_text(json.dumps([TINY_PROBES[0], {**TINY_PROBES[0], "prompt": "another prompt"}]))
    argv = ["--model", config.model, "--prompts", str(repeated), "--kernel", config.kernel_specs[0], "--max-tokens", "2"]

    rejected = benchmark.main([*argv, "--output", str(config.output)])
    numbered = benchmark.main([*argv, "--output", str(config.output), "--duplicate-ids", "number"])

    assert rejected == 1
    assert "P01_TINY_HELLO" in capsys.readouterr().err
    assert numbered == 0
    assert [line["id"] for line in read_ab_file(config.output).probes] == ["P01_TINY_HELLO", "P01_TINY_HELLO~2"]


def test_cli_missing_probe_file(tmp_path, capsys):
    code = benchmark.main(["--prompts", str(tmp_path / "absent.json"), "--output", str(tmp_path / "ab.jsonl")])

    assert code == 1
    assert "lem: error:" in capsys.readouterr().err


def test_cli_sampling_without_seed_is_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        benchmark.main(["--temperature", "0.7", "--output", str(tmp_path / "ab.jsonl")])

    assert exited.value.code == 2
    assert "seed" in capsys.readouterr().err


def test_default_kernels_and_prompts_resolve():
    specs = benchmark.default_kernel_specs()
    prompts = benchmark.default_prompt_paths()

    assert [spec.split("=", 1)[0] for spec in specs] == ["json", "txt"]
    assert all(Path(spec.split("=", 1)[1]).is_file() for spec in specs)
    assert [path.name for path in prompts] == ["P001-P020.json"]


# ---------------------------------------------------------------------------------------------
# The real default model


@pytest.fixture(scope="module")
def smollm2_name():
    from lem_fixtures.errors import LemError
    from lem_fixtures.models import resolve_model

    try:
        resolve_model(benchmark.DEFAULT_MODEL)
    except LemError as error:
        pytest.skip(f"{benchmark.DEFAULT_MODEL} is not available: {error}")
    return benchmark.DEFAULT_MODEL


@pytest.mark.slow
def test_smollm2_benchmark_rescored_identically(smollm2_name, tmp_path):
    from lem_fixtures import rescore

    first_probes = json.loads(Path(benchmark.default_prompt_paths()[0]).read_text())[:2]
    probes = tmp_path / "p2.json"
    probes.write_text(json.dumps(first_probes))
    output = tmp_path / "ab.jsonl"
    # --no-cache keeps the test out of the user's generation cache (the converted model still goes there).
    argv = ["--model", smollm2_name, "--prompts", str(probes), "--output", str(output), "--max-tokens", "12", "--no-cache"]

    assert benchmark.main(argv) == 0
    assert_valid_ab_file(output, [p["id"] for p in first_probes], ["baseline", "json", "txt"])
    assert rescore.main(["--input", str(output), "--output", str(tmp_path / "rescored.jsonl")]) == 0

    written = read_ab_file(output)
    rescored = read_ab_file(tmp_path / "rescored.jsonl")
    for before, after in zip(written.probes, rescored.probes):
        for name in before["conditions"]:
            assert after["conditions"][name]["lek_score"] == before["conditions"][name]["lek_score"]
            assert after["conditions"][name]["heuristic"] == before["conditions"][name]["heuristic"]
    assert rescored.summary["conditions"] == written.summary["conditions"]
    assert rescored.summary["categories"] == written.summary["categories"]
    modes = {name: entry["mode"] for name, entry in written.probes[0]["conditions"].items()}
    assert modes == {"baseline": "chat", "json": "chat-system", "txt": "chat-system"}
