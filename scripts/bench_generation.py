#!/usr/bin/env python3
"""Measure generation throughput of `lem benchmark` against the upstream A/B script's method, in one run.

Phases, all on the same converted float32 weights:
  ours        generate_with_cache over probes x (baseline + kernels), batched, OpenBLAS preloaded,
              into a fresh temporary cache
  cached      the same call again, every case served from that cache
  upstream    one mlx_lm.stream_generate per case, one case after another, as upstream's
              mlx_lm.generate does, in this process (OpenBLAS loaded) on a subset of the cases
  upstream-reference-blas
              the same subset in a child process with LEM_OPENBLAS=0, so mlx keeps its
              bundled reference BLAS: the situation of the upstream script on Linux

Tokens/s counts generated tokens (end-of-turn tokens included) over the wall time of the
phase, prefill included. The script prints a table and the ratio of ours to each upstream
row, and writes the numbers as JSON with --json-out.

Usage: python scripts/bench_generation.py [--probes 20] [--subset-probes 4] [--max-tokens 256] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"


def load_cases(probe_count: int) -> tuple[Any, list[Any], list[tuple[str, str]]]:
    """Load the default model, probes and kernels; return (loaded, rendered prompts, (probe id, condition) labels)."""
    from lem_fixtures.benchmark import default_kernel_specs, default_prompt_paths
    from lem_fixtures.generation import render_prompt
    from lem_fixtures.kernels import condition_names, load_kernels
    from lem_fixtures.models import load_model
    from lem_fixtures.probes import load_probes

    probes = load_probes(default_prompt_paths())[:probe_count]
    kernels = load_kernels(default_kernel_specs())
    texts = {kernel.name: kernel.text for kernel in kernels}
    loaded = load_model(MODEL)
    labels, rendered = [], []
    for probe in probes:
        for condition in condition_names(kernels):
            labels.append((probe.id, condition))
            rendered.append(render_prompt(loaded.tokenizer, probe.prompt, texts.get(condition), use_chat_template=loaded.chat))
    return loaded, rendered, labels


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_upstream(loaded: Any, rendered: list[Any], max_tokens: int) -> dict[str, Any]:
    """Generate each case with mlx_lm.stream_generate, one after another, and time the whole loop."""
    import mlx.core as mx
    import mlx_lm

    mx.reset_peak_memory()
    texts, tokens = [], 0
    started = time.perf_counter()
    for prompt in rendered:
        text, last = "", None
        for last in mlx_lm.stream_generate(loaded.model, loaded.tokenizer, prompt.text, max_tokens=max_tokens):
            text += last.text
        texts.append(text)
        tokens += last.generation_tokens
    seconds = time.perf_counter() - started
    return {
        "cases": len(rendered),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": round(tokens / seconds, 2),
        "peak_mlx_gb": round(mx.get_peak_memory() / 1e9, 3),
        "texts": texts,
    }


def run_ours(loaded: Any, rendered: list[Any], max_tokens: int, batch_size: int, cache: Any) -> dict[str, Any]:
    import mlx.core as mx

    from lem_fixtures.cache import generate_with_cache
    from lem_fixtures.generation import GenerationParams

    mx.reset_peak_memory()
    started = time.perf_counter()
    results = generate_with_cache(loaded, rendered, GenerationParams(max_tokens=max_tokens), cache, batch_size=batch_size)
    seconds = time.perf_counter() - started
    tokens = sum(result.generation.generation_tokens for result in results)
    return {
        "cases": len(rendered),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": round(tokens / seconds, 2),
        "from_cache": sum(result.cached for result in results),
        "peak_mlx_gb": round(mx.get_peak_memory() / 1e9, 3),
        "texts": [result.generation.response for result in results],
    }


def child_upstream(args: argparse.Namespace) -> int:
    """Run the upstream phase on the subset and print its JSON (used with LEM_OPENBLAS=0)."""
    from lem_fixtures.backend import backend_info

    loaded, rendered, _ = load_cases(args.subset_probes)
    result = run_upstream(loaded, rendered, args.max_tokens)
    result["backend"] = backend_info()
    result["max_rss_mb"] = round(max_rss_mb(), 1)
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--probes", type=int, default=20, help="probes of probes/P001-P020.json for ours (default: 20)")
    parser.add_argument("--subset-probes", type=int, default=4, help="first probes timed the upstream way (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=256, help="max tokens per response (default: 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of ours (default: 16)")
    parser.add_argument("--skip-reference-blas", action="store_true", help="skip the child process without OpenBLAS")
    parser.add_argument("--json-out", type=Path, help="write every number (and the texts) to this JSON file")
    parser.add_argument("--child-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_upstream:
        return child_upstream(args)

    from lem_fixtures.backend import backend_info
    from lem_fixtures.cache import GenerationCache

    info = backend_info()
    report: dict[str, Any] = {"backend": info, "load_average_start": os.getloadavg(), "args": vars(args) | {"json_out": str(args.json_out)}}
    loaded, rendered, labels = load_cases(args.probes)
    subset = len(rendered) if args.subset_probes >= args.probes else args.subset_probes * (len(rendered) // args.probes)

    with tempfile.TemporaryDirectory() as directory, GenerationCache(Path(directory) / "g.sqlite", enabled=True) as cache:
        report["ours"] = run_ours(loaded, rendered, args.max_tokens, args.batch_size, cache)
        report["ours"]["max_rss_mb"] = round(max_rss_mb(), 1)
        report["cached"] = run_ours(loaded, rendered, args.max_tokens, args.batch_size, cache)
    report["upstream"] = run_upstream(loaded, rendered[:subset], args.max_tokens)
    report["upstream"]["max_rss_mb"] = round(max_rss_mb(), 1)

    if not args.skip_reference_blas:
        command = [sys.executable, __file__, "--child-upstream", "--probes", str(args.probes),
                   "--subset-probes", str(args.subset_probes), "--max-tokens", str(args.max_tokens)]
        child = subprocess.run(command, env={**os.environ, "LEM_OPENBLAS": "0"}, capture_output=True, text=True, check=True)
        report["upstream_reference_blas"] = json.loads(child.stdout.strip().splitlines()[-1])
    report["load_average_end"] = os.getloadavg()

    ours_texts = report["ours"]["texts"][:subset]
    report["subset_equal_texts"] = sum(a == b for a, b in zip(ours_texts, report["upstream"]["texts"]))
    report["subset_cases"] = subset

    print_report(report, labels[:subset])
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict[str, Any], subset_labels: list[tuple[str, str]]) -> None:
    ours = report["ours"]
    rows = [("ours (batched, OpenBLAS)", ours), ("rerun from cache", report["cached"]),
            ("upstream method, OpenBLAS", report["upstream"])]
    if "upstream_reference_blas" in report:
        rows.append(("upstream method, reference BLAS", report["upstream_reference_blas"]))

    print(f"backend: {json.dumps(report['backend'])}")
    print(f"load average at start {report['load_average_start']}, at end {report['load_average_end']}")
    print(f"{'phase':<34} {'cases':>5} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'peak GB':>8} {'max RSS MB':>10}")
    for name, row in rows:
        print(f"{name:<34} {row['cases']:>5} {row['tokens']:>7} {row['seconds']:>8.2f} {row['tokens_per_s']:>8} "
              f"{row['peak_mlx_gb']:>8} {row.get('max_rss_mb', '-'):>10}")
    for name, row in rows[2:]:
        print(f"ratio ours / {name}: {ours['tokens_per_s'] / row['tokens_per_s']:.2f}x tokens/s")
    print(f"rerun from cache: {report['cached']['seconds']:.3f} s, {ours['seconds'] / report['cached']['seconds']:.0f}x faster than generating")
    print(f"upstream subset: {report['subset_cases']} cases ({subset_labels[0][0]} .. {subset_labels[-1][0]}); "
          f"{report['subset_equal_texts']} of them have the same text from ours (batched) and upstream (sequential)")


if __name__ == "__main__":
    sys.exit(main())
