"""Generation throughput on the default model: sequential (upstream's method), batched, and a rerun from the cache.

Run with: pytest tests/benchmarks/test_bench_generation.py -m benchmark_suite
Each benchmark runs once, because a round takes tens of seconds on two CPU cores. extra_info
records tokens/s and peak memory. scripts/bench_generation.py measures the full 20-probe comparison.
"""

from __future__ import annotations

import resource

import pytest

from lem_fixtures.errors import LemError

MODEL = "smollm2-135m-instruct"
PROBES = 4
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def cases():
    """The default model and its rendered prompts: PROBES probes x (baseline + default kernels)."""
    from lem_fixtures.benchmark import default_kernel_specs, default_prompt_paths
    from lem_fixtures.generation import render_prompt
    from lem_fixtures.kernels import condition_names, load_kernels
    from lem_fixtures.models import load_model
    from lem_fixtures.probes import load_probes

    try:
        loaded = load_model(MODEL)
    except LemError as error:
        pytest.skip(f"{MODEL} is not available: {error}")
    kernels = load_kernels(default_kernel_specs())
    texts = {kernel.name: kernel.text for kernel in kernels}
    rendered = [
        render_prompt(loaded.tokenizer, probe.prompt, texts.get(condition))
        for probe in load_probes(default_prompt_paths())[:PROBES]
        for condition in condition_names(kernels)
    ]
    return loaded, rendered


def record(benchmark, results) -> None:
    import mlx.core as mx

    tokens = sum(result.generation_tokens for result in results)
    seconds = benchmark.stats.stats.mean
    benchmark.extra_info["cases"] = len(results)
    benchmark.extra_info["generated_tokens"] = tokens
    benchmark.extra_info["tokens_per_s"] = round(tokens / seconds, 2)
    benchmark.extra_info["peak_mlx_gb"] = round(mx.get_peak_memory() / 1e9, 3)
    benchmark.extra_info["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@pytest.mark.benchmark_suite
def test_bench_upstream_sequential(benchmark, cases):
    import mlx.core as mx
    import mlx_lm

    from lem_fixtures.backend import mapped_openblas

    loaded, rendered = cases

    def run():
        finals = []
        for prompt in rendered:
            last = None
            for last in mlx_lm.stream_generate(loaded.model, loaded.tokenizer, prompt.text, max_tokens=MAX_TOKENS):
                pass
            finals.append(last)
        return finals

    mx.reset_peak_memory()
    finals = benchmark.pedantic(run, rounds=1, iterations=1)

    record(benchmark, finals)
    benchmark.extra_info["openblas"] = mapped_openblas()


@pytest.mark.benchmark_suite
@pytest.mark.parametrize("batch_size", [1, 16])
def test_bench_generate(benchmark, cases, batch_size):
    import mlx.core as mx

    from lem_fixtures.generation import GenerationParams, generate

    loaded, rendered = cases
    mx.reset_peak_memory()

    results = benchmark.pedantic(
        generate, args=(loaded, rendered, GenerationParams(max_tokens=MAX_TOKENS)),
        kwargs={"batch_size": batch_size}, rounds=1, iterations=1,
    )

    record(benchmark, results)


@pytest.mark.benchmark_suite
def test_bench_rerun_from_cache(benchmark, cases, tmp_path):
    from lem_fixtures.cache import GenerationCache, generate_with_cache
    from lem_fixtures.generation import GenerationParams

    loaded, rendered = cases
    params = GenerationParams(max_tokens=MAX_TOKENS)
    with GenerationCache(tmp_path / "g.sqlite", enabled=True) as cache:
        generate_with_cache(loaded, rendered, params, cache, batch_size=16)

        results = benchmark.pedantic(
            generate_with_cache, args=(loaded, rendered, params, cache), kwargs={"batch_size": 16}, rounds=3, iterations=1
        )

    assert all(result.cached for result in results)
    benchmark.extra_info["cases"] = len(results)
