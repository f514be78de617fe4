"""Cached generation of many cases on one model: render, read the cache, generate the misses, store each at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .cache import GenerationCache, cache_key
from .generation import DEFAULT_BATCH_SIZE, Generation, GenerationParams, generate, library_versions, render_prompt

logger = logging.getLogger(__name__)


def model_info(loaded: Any) -> dict[str, Any]:
    """The identity of a loaded model as stored with every response."""
    return {
        "name": loaded.name,
        "path": str(loaded.path),
        "weights_sha256": loaded.weights_sha256,
        "tokenizer_sha256": loaded.tokenizer_sha256,
        "adapter_sha256": loaded.adapter_sha256,
    }


def generate_cases(
    loaded: Any,
    cases: Sequence[tuple[str, str | None]],
    params: GenerationParams,
    *,
    batch_size: int | None = None,
    use_cache: bool = True,
    cache: GenerationCache | None = None,
    progress: Callable[[str], None] | None = None,
    label: str = "",
) -> list[dict[str, Any]]:
    """Return one response record per (prompt, kernel text or None) case, in order.

    Each record holds the Generation fields, the model's identity, the library versions and
    whether it came from the cache. A newly generated case is written to the cache as soon as
    it finishes, so a killed run loses no finished case.
    """
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    mlx_version, mlx_lm_version = library_versions()
    identity = model_info(loaded)
    versions = {"mlx": mlx_version, "mlx_lm": mlx_lm_version}

    rendered = [render_prompt(loaded.tokenizer, prompt, kernel) for prompt, kernel in cases]
    # Batched decoding may differ from one-at-a-time decoding in the last bits, so its responses get their own keys.
    extra = {"batch_size": batch_size} if batch_size > 1 else {}
    keys = [
        cache_key(
            loaded.weights_sha256, loaded.adapter_sha256, loaded.tokenizer_sha256,
            prompt.text, params.to_dict(), mlx_version, mlx_lm_version, **extra,
        )
        for prompt in rendered
    ]

    own_cache = cache is None and use_cache
    if own_cache:
        cache = GenerationCache()

    records: list[dict[str, Any] | None] = [None] * len(cases)
    if use_cache and cache is not None:
        for index, key in enumerate(keys):
            stored = cache.get(key)
            if stored is not None:
                records[index] = {**stored, "cached": True}

    missing = [index for index, record in enumerate(records) if record is None]
    hits = len(cases) - len(missing)
    if progress is not None:
        progress(f"{label}: {len(cases)} cases, {hits} from the cache, {len(missing)} to generate (batch size {batch_size})")

    started = time.time()
    done = 0

    def store(position: int, generation: Generation) -> None:
        nonlocal done
        index = missing[position]
        record = {**generation.to_dict(), "model_info": identity, "versions": versions}
        if use_cache and cache is not None:
            cache.put(keys[index], record)
        records[index] = {**record, "cached": False}

        done += 1
        if progress is not None:
            elapsed = time.time() - started
            progress(
                f"{label}: {done}/{len(missing)} generated, {generation.generation_tokens} tokens, "
                f"{elapsed:.0f} s elapsed"
            )

    if missing:
        generate(loaded, [rendered[index] for index in missing], params, batch_size=batch_size, on_result=store)

    if own_cache and cache is not None:
        cache.close()
    return [record for record in records if record is not None]
