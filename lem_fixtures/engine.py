"""Cached generation of many cases on one model: render, read the cache, generate the misses, store each at once."""

# NOTE: lem_fixtures.cache.generate_with_cache does the same job for `lem benchmark`, with keys that
# also cover the stop token ids. Moving the suite onto it changes every cached suite response's key.

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .cache import GenerationCache, cache_key
from .generation import DEFAULT_BATCH_SIZE, Generation, GenerationParams, generate, library_versions, render_prompt

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 15.0


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

    With batch_size 1 the cases run one at a time, as `mlx_lm.generate` does. With a larger
    batch_size all cases form one batch, so pass at most batch_size cases per call. Each record
    contains the Generation fields, the model's identity, the library versions and whether it came
    from the cache. A newly generated case is written to the cache as soon as it finishes.
    """
    batch_size = batch_size or DEFAULT_BATCH_SIZE
    mlx_version, mlx_lm_version = library_versions()
    identity = model_info(loaded)
    versions = {"mlx": mlx_version, "mlx_lm": mlx_lm_version}

    rendered = [render_prompt(loaded.tokenizer, prompt, kernel) for prompt, kernel in cases]

    # A batched response depends on its batch: the matrix products round differently with the
    # number of rows, and padding changes with the other prompts. So a batch is one unit: its
    # key names every prompt in it, and it is generated again whole when any case is missing.
    batched = batch_size > 1 and len(cases) > 1
    extra: dict[str, Any] = {}
    if batched:
        batch_digest = hashlib.sha256("\x00".join(prompt.text for prompt in rendered).encode("utf-8")).hexdigest()
        extra = {"batch_size": min(batch_size, len(cases)), "batch_sha256": batch_digest}
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
    if batched and missing:
        missing = list(range(len(cases)))
    hits = len(cases) - len(missing)
    if progress is not None:
        progress(f"{label}: {len(cases)} cases, {hits} from the cache, {len(missing)} to generate (batch size {batch_size})")

    started = time.time()
    done = 0
    last_report = started

    def store(position: int, generation: Generation) -> None:
        nonlocal done
        index = missing[position]
        record = {**generation.to_dict(), "model_info": identity, "versions": versions}
        if use_cache and cache is not None:
            cache.put(keys[index], record)
        records[index] = {**record, "cached": False}

        nonlocal last_report
        done += 1
        now = time.time()
        # One line per PROGRESS_INTERVAL_S at most, and one when the last case finishes.
        if progress is not None and (done == len(missing) or now - last_report >= PROGRESS_INTERVAL_S):
            last_report = now
            progress(f"{label}: {done}/{len(missing)} generated, {now - started:.0f} s elapsed")

    if missing:
        generate(
            loaded, [rendered[index] for index in missing], params,
            batch_size=batch_size if batched else 1, on_result=store,
        )

    if own_cache and cache is not None:
        cache.close()
    return [record for record in records if record is not None]
