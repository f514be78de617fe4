"""The generation cache: keys, storage, concurrent writers, resuming a killed run, stale records."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from lem_fixtures.cache import (
    CACHE_FILE_NAME,
    GenerationCache,
    cache_key,
    default_cache_path,
    generate_with_cache,
)
from lem_fixtures.generation import GenerationParams, render_prompt
from lem_fixtures.paths import cache_dir

from tiny_model import build_tiny_model

TESTS_DIR = Path(__file__).resolve().parent
KEY_ARGS = {
    "weights_sha256": "w" * 64,
    "adapter_sha256": None,
    "tokenizer_sha256": "t" * 64,
    "rendered_prompt": "<|im_start|>user hello<|im_end|>",
    "params": {"max_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "seed": None},
    "mlx_version": "0.32.4",
    "mlx_lm_version": "0.32.2",
}


# ---------------------------------------------------------------------------------------------
# Paths


def test_cache_dir_env_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LEM_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"

    monkeypatch.delenv("LEM_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "lem"

    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "lem"


def test_default_cache_file_under_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LEM_CACHE_DIR", str(tmp_path))

    assert default_cache_path() == tmp_path / CACHE_FILE_NAME


# ---------------------------------------------------------------------------------------------
# Keys


def test_cache_key_is_stable_sha256():
    first = cache_key(**KEY_ARGS)
    second = cache_key(**{**KEY_ARGS, "params": dict(reversed(list(KEY_ARGS["params"].items())))})

    assert first == second
    assert len(first) == 64
    assert int(first, 16) >= 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("weights_sha256", "x" * 64),
        ("adapter_sha256", "a" * 64),
        ("tokenizer_sha256", "u" * 64),
        ("rendered_prompt", "<|im_start|>system kernel<|im_end|><|im_start|>user hello<|im_end|>"),
        ("mlx_version", "0.33.0"),
        ("mlx_lm_version", "0.33.0"),
    ],
)
def test_cache_key_changes_with_field(field, value):
    assert cache_key(**{**KEY_ARGS, field: value}) != cache_key(**KEY_ARGS)


@pytest.mark.parametrize(
    "name, value", [("max_tokens", 256), ("temperature", 0.7), ("top_p", 0.9), ("seed", 3)]
)
def test_cache_key_changes_with_param(name, value):
    params = {**KEY_ARGS["params"], name: value}

    assert cache_key(**{**KEY_ARGS, "params": params}) != cache_key(**KEY_ARGS)


def test_cache_key_changes_with_extra():
    base = cache_key(**KEY_ARGS, stop_token_ids=[2])

    assert cache_key(**KEY_ARGS, stop_token_ids=[2, 106]) != base
    assert cache_key(**KEY_ARGS, stop_token_ids=[2], generation_path="batched-16") != base


# ---------------------------------------------------------------------------------------------
# Storage


def test_get_missing_returns_none(tmp_path):
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        assert cache.get("0" * 64) is None


def test_put_then_get_round_trip(tmp_path):
    record = {"response": "héllo ✓", "finish_reason": "stop", "generation_tokens": 3, "params": {"seed": None}}

    with GenerationCache(tmp_path / "c.sqlite") as cache:
        cache.put("k", record)
    with GenerationCache(tmp_path / "c.sqlite") as reopened:
        assert reopened.get("k") == record
        assert len(reopened) == 1


def test_put_replaces_record(tmp_path):
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        cache.put("k", {"response": "old"})
        cache.put("k", {"response": "new"})

        assert cache.get("k") == {"response": "new"}
        assert len(cache) == 1


def test_cache_uses_wal_journal(tmp_path):
    path = tmp_path / "c.sqlite"
    GenerationCache(path).close()

    connection = sqlite3.connect(path)
    mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()

    assert mode == "wal"


def test_cache_created_in_env_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LEM_CACHE_DIR", str(tmp_path / "nested" / "dir"))
    monkeypatch.delenv("LEM_NO_CACHE", raising=False)

    with GenerationCache() as cache:
        cache.put("k", {"response": "x"})

    assert (tmp_path / "nested" / "dir" / CACHE_FILE_NAME).is_file()


@pytest.mark.parametrize("value, enabled", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_no_cache_env(monkeypatch, tmp_path, value, enabled):
    monkeypatch.setenv("LEM_NO_CACHE", value)
    path = tmp_path / "c.sqlite"

    cache = GenerationCache(path)
    cache.put("k", {"response": "x"})

    assert cache.enabled is enabled
    assert (cache.get("k") is not None) is enabled
    assert path.exists() is enabled
    cache.close()


def test_disabled_parameter_overrides_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LEM_NO_CACHE", "1")
    path = tmp_path / "c.sqlite"

    with GenerationCache(path, enabled=True) as cache:
        cache.put("k", {"response": "x"})
        assert cache.get("k") == {"response": "x"}
    with GenerationCache(path, enabled=False) as disabled:
        assert disabled.get("k") is None
        assert len(disabled) == 0


# ---------------------------------------------------------------------------------------------
# Concurrent writers


def _write_records(path: str, writer: int, count: int) -> None:
    with GenerationCache(path, enabled=True) as cache:
        for index in range(count):
            cache.put(f"{writer}-{index}", {"writer": writer, "index": index, "response": "x" * 200})
            # Read back while others write, as an xdist worker checks the cache before generating.
            assert cache.get(f"{writer}-{index}")["index"] == index


def test_concurrent_writer_processes(tmp_path):
    path = tmp_path / "shared.sqlite"
    writers, count = 6, 150
    context = multiprocessing.get_context("spawn")

    processes = [context.Process(target=_write_records, args=(str(path), writer, count)) for writer in range(writers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)

    assert [process.exitcode for process in processes] == [0] * writers
    with GenerationCache(path, enabled=True) as cache:
        assert len(cache) == writers * count
        for writer in range(writers):
            assert cache.get(f"{writer}-{count - 1}") == {"writer": writer, "index": count - 1, "response": "x" * 200}


# ---------------------------------------------------------------------------------------------
# Generation through the cache, on a tiny model


PROMPTS = ["hello world", "tell me about consent", "what is the kernel ?", "why", "how are you"]


def _identity(**overrides) -> dict:
    identity = {"weights_sha256": "w" * 64, "adapter_sha256": None, "tokenizer_sha256": "t" * 64}
    identity.update(overrides)
    return identity


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    pytest.importorskip("mlx_lm")
    from lem_fixtures.backend import import_mlx

    import_mlx()
    import mlx_lm

    tiny = build_tiny_model(tmp_path_factory.mktemp("models") / "random", hidden_size=64)
    model, tokenizer, config = mlx_lm.load(str(tiny.path), return_config=True)
    return SimpleNamespace(name="tiny", path=tiny.path, model=model, tokenizer=tokenizer, config=config, **_identity())


def _rendered(loaded, kernel=None):
    return [render_prompt(loaded.tokenizer, prompt, kernel) for prompt in PROMPTS]


def test_second_run_served_from_cache(tiny_loaded, tmp_path):
    params = GenerationParams(max_tokens=6)

    with GenerationCache(tmp_path / "c.sqlite", enabled=True) as cache:
        first = generate_with_cache(tiny_loaded, _rendered(tiny_loaded), params, cache)
        second = generate_with_cache(tiny_loaded, _rendered(tiny_loaded), params, cache)

    assert [result.cached for result in first] == [False] * len(PROMPTS)
    assert [result.cached for result in second] == [True] * len(PROMPTS)
    assert [r.generation for r in second] == [r.generation for r in first]
    assert [r.key for r in second] == [r.key for r in first]


@pytest.mark.parametrize(
    "change",
    ["weights", "adapter", "tokenizer", "kernel", "max_tokens", "temperature", "batch_size"],
)
def test_changed_input_never_served_stale(tiny_loaded, tmp_path, change):
    params = GenerationParams(max_tokens=6)
    loaded, prompts, batch_size = tiny_loaded, _rendered(tiny_loaded), 1
    with GenerationCache(tmp_path / "c.sqlite", enabled=True) as cache:
        generate_with_cache(loaded, prompts, params, cache)

        if change == "weights":
            loaded = SimpleNamespace(**{**vars(tiny_loaded), "weights_sha256": "v" * 64})
        elif change == "adapter":
            loaded = SimpleNamespace(**{**vars(tiny_loaded), "adapter_sha256": "a" * 64})
        elif change == "tokenizer":
            loaded = SimpleNamespace(**{**vars(tiny_loaded), "tokenizer_sha256": "u" * 64})
        elif change == "kernel":
            prompts = _rendered(tiny_loaded, kernel="be kind")
        elif change == "max_tokens":
            params = dataclasses.replace(params, max_tokens=7)
        elif change == "temperature":
            params = dataclasses.replace(params, temperature=0.5, seed=0)
        elif change == "batch_size":
            batch_size = 2

        results = generate_with_cache(loaded, prompts, params, cache, batch_size=batch_size)

    assert [result.cached for result in results] == [False] * len(PROMPTS)


def test_disabled_cache_generates_every_time(tiny_loaded, tmp_path):
    params = GenerationParams(max_tokens=4)
    cache = GenerationCache(tmp_path / "c.sqlite", enabled=False)

    generate_with_cache(tiny_loaded, _rendered(tiny_loaded), params, cache)
    again = generate_with_cache(tiny_loaded, _rendered(tiny_loaded), params, cache)

    assert not any(result.cached for result in again)
    assert not (tmp_path / "c.sqlite").exists()


KILLED_RUN_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from types import SimpleNamespace
    from lem_fixtures.backend import import_mlx
    import_mlx()
    import mlx_lm
    from lem_fixtures.cache import GenerationCache, generate_with_cache
    from lem_fixtures.generation import GenerationParams, render_prompt

    model_path, cache_path, kill_after, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = {prompts!r}
    model, tokenizer, config = mlx_lm.load(model_path, return_config=True)
    loaded = SimpleNamespace(name="tiny", path=model_path, model=model, tokenizer=tokenizer, config=config,
                             weights_sha256="w" * 64, adapter_sha256=None, tokenizer_sha256="t" * 64)
    finished = 0

    def on_result(index, result):
        global finished
        finished += 1
        if finished == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    cache = GenerationCache(cache_path, enabled=True)
    generate_with_cache(loaded, [render_prompt(tokenizer, p) for p in prompts], GenerationParams(max_tokens=6),
                        cache, batch_size=batch_size, on_result=on_result)
    """
).format(prompts=PROMPTS)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_killed_run_keeps_finished_cases(tiny_loaded, tmp_path, batch_size):
    cache_path = tmp_path / "c.sqlite"
    command = [sys.executable, "-c", KILLED_RUN_SCRIPT, str(tiny_loaded.path), str(cache_path), "2", str(batch_size)]

    killed = subprocess.run(command, capture_output=True, text=True, timeout=300)

    assert killed.returncode == -9, killed.stderr
    with GenerationCache(cache_path, enabled=True) as cache:
        assert len(cache) == 2
        resumed = generate_with_cache(
            tiny_loaded, _rendered(tiny_loaded), GenerationParams(max_tokens=6), cache, batch_size=batch_size
        )
    assert sum(result.cached for result in resumed) == 2
    assert len(resumed) == len(PROMPTS)
