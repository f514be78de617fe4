"""A persistent cache of generated responses, keyed by everything that determines a response.

The cache is one SQLite file, <cache_dir()>/generations.sqlite, in WAL mode with a busy
timeout, so several processes (pytest-xdist workers, parallel `lem benchmark` runs) can
read and write it at once. Each `put` commits on its own, so a killed run keeps every case
that finished before it died.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lem_fixtures.paths import cache_dir

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "generations.sqlite"
NO_CACHE_ENV = "LEM_NO_CACHE"
# Bump when the record layout or the key's fields change, so old entries are never served.
KEY_SCHEMA_VERSION = 1
# Seconds a writer waits for another process's write lock before SQLite raises "database is locked".
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


def cache_key(
    weights_sha256: str,
    adapter_sha256: str | None,
    tokenizer_sha256: str,
    rendered_prompt: str,
    params: Mapping[str, Any],
    mlx_version: str,
    mlx_lm_version: str,
    **extra: Any,
) -> str:
    """Return the sha256 hex digest of the canonical JSON of every input that shapes a response.

    tokenizer_sha256 must cover the chat template. `extra` takes further inputs, for example
    the stop token ids or the batch size; values must be JSON-serializable.
    """
    fields = {
        "schema": KEY_SCHEMA_VERSION,
        "weights_sha256": weights_sha256,
        "adapter_sha256": adapter_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "rendered_prompt": rendered_prompt,
        "params": dict(params),
        "mlx_version": mlx_version,
        "mlx_lm_version": mlx_lm_version,
        "extra": extra,
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cache_disabled_by_env() -> bool:
    """Return whether $LEM_NO_CACHE turns the cache off (any value but "", "0", "false", "no")."""
    value = os.environ.get(NO_CACHE_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no")


def default_cache_path() -> Path:
    return cache_dir() / CACHE_FILE_NAME


class GenerationCache:
    """Generation records by cache key, stored in SQLite.

    path defaults to default_cache_path(). enabled=None reads $LEM_NO_CACHE; a disabled
    cache opens no file, `get` returns None and `put` stores nothing.
    """

    def __init__(self, path: Path | str | None = None, *, enabled: bool | None = None) -> None:
        self.enabled = (not cache_disabled_by_env()) if enabled is None else enabled
        self.path = Path(path) if path is not None else default_cache_path()
        self._connection: sqlite3.Connection | None = None
        if self.enabled:
            self._connection = self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: statements run in autocommit mode unless wrapped in BEGIN, so
        # every put is its own committed transaction.
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._enable_wal(connection)
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute(_SCHEMA)
        return connection

    def _enable_wal(self, connection: sqlite3.Connection) -> None:
        # Switching to WAL needs a moment of exclusive access; when many processes open a new
        # file at once, SQLite can return "database is locked" despite busy_timeout.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if str(mode).lower() != "wal":
            logger.warning("cache %s runs in journal mode %r, not WAL; concurrent writers may wait longer", self.path, mode)

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the record stored under `key`, or None."""
        if self._connection is None:
            return None
        row = self._connection.execute("SELECT record FROM generations WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError:
            logger.warning("cache %s: unreadable record under key %s; generating it again", self.path, key[:16])
            return None

    def put(self, key: str, record: Mapping[str, Any]) -> None:
        """Store `record` under `key` and commit at once, replacing an older record."""
        if self._connection is None:
            return
        text = json.dumps(dict(record), ensure_ascii=False, allow_nan=False)
        self._connection.execute(
            "INSERT OR REPLACE INTO generations (key, record, created_at) VALUES (?, ?, ?)",
            (key, text, time.time()),
        )

    def __len__(self) -> int:
        if self._connection is None:
            return 0
        return int(self._connection.execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> GenerationCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Generation through the cache


@dataclass(frozen=True)
class CachedGeneration:
    """A generation, its cache key and whether it came from the cache."""

    generation: Any  # lem_fixtures.generation.Generation
    key: str
    cached: bool


def generation_path(batch_size: int) -> str:
    """Return the cache-key label of the generation path: batched float32 results differ from sequential ones."""
    return "sequential" if batch_size == 1 else f"batched-{batch_size}"


def generation_cache_key(
    loaded: Any,
    rendered_text: str,
    params: Any,
    *,
    stop_ids: Iterable[int],
    batch_size: int,
    seed: int | None,
    mlx_version: str,
    mlx_lm_version: str,
) -> str:
    """Return cache_key for one case of a loaded model (anything with weights_sha256, adapter_sha256, tokenizer_sha256)."""
    extra: dict[str, Any] = {
        "stop_token_ids": sorted(stop_ids),
        "generation_path": generation_path(batch_size),
    }
    if not params.greedy:
        extra["case_seed"] = seed
    return cache_key(
        loaded.weights_sha256,
        getattr(loaded, "adapter_sha256", None),
        loaded.tokenizer_sha256,
        rendered_text,
        params.to_dict(),
        mlx_version,
        mlx_lm_version,
        **extra,
    )


def generation_cache_keys(
    loaded: Any,
    prompts: Sequence[Any],
    params: Any,
    *,
    batch_size: int = 1,
    seeds: Sequence[int] | None = None,
) -> list[str]:
    """Return the cache key of each rendered prompt of a run, as generate_with_cache computes them."""
    from lem_fixtures import generation as generation_module

    generation_module.import_mlx_backend()
    mlx_version, mlx_lm_version = generation_module.library_versions()
    stop_ids = generation_module.stop_token_ids_for(loaded)
    if seeds is None:
        seeds = [generation_module.case_seed(params, rendered.text) for rendered in prompts]
    return [
        generation_cache_key(
            loaded,
            rendered.text,
            params,
            stop_ids=stop_ids,
            batch_size=batch_size,
            seed=seed,
            mlx_version=mlx_version,
            mlx_lm_version=mlx_lm_version,
        )
        for rendered, seed in zip(prompts, seeds)
    ]


def generate_with_cache(
    loaded: Any,
    prompts: Sequence[Any],
    params: Any,
    cache: GenerationCache,
    *,
    batch_size: int = 1,
    seeds: Sequence[int] | None = None,
    on_result: Callable[[int, CachedGeneration], None] | None = None,
) -> list[CachedGeneration]:
    """Serve each rendered prompt from `cache` or generate it, storing every new generation as it finishes.

    Arguments as in lem_fixtures.generation.generate. on_result(index, result) is called for
    cache hits first, then for each generated case as it finishes.
    """
    from lem_fixtures import generation as generation_module

    if seeds is None:
        seeds = [generation_module.case_seed(params, rendered.text) for rendered in prompts]
    keys = generation_cache_keys(loaded, prompts, params, batch_size=batch_size, seeds=seeds)
    results: dict[int, CachedGeneration] = {}

    def deliver(index: int, result: CachedGeneration) -> None:
        results[index] = result
        if on_result is not None:
            on_result(index, result)

    missing: list[int] = []
    for index, key in enumerate(keys):
        record = cache.get(key)
        if record is None:
            missing.append(index)
            continue
        deliver(index, CachedGeneration(generation_module.Generation.from_dict(record), key, cached=True))

    def store(position: int, generation: Any) -> None:
        index = missing[position]
        cache.put(keys[index], generation.to_dict())
        deliver(index, CachedGeneration(generation, keys[index], cached=False))

    if missing:
        generation_module.generate(
            loaded,
            [prompts[index] for index in missing],
            params,
            batch_size=batch_size,
            seeds=[seeds[index] for index in missing],
            on_result=store,
        )
    return [results[index] for index in range(len(prompts))]
