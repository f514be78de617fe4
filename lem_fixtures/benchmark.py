"""`lem benchmark`: generate responses to probes under the baseline and each kernel condition, as an A/B file.

The interface and output follow the upstream LEM A/B script: one probe line per probe with
every condition's response and v2 score, then a summary line. Probe lines are appended in
probe order, each flushed once its conditions and those of every earlier probe are done, and
every generated response goes to the generation cache at once. A killed run therefore keeps its finished probes in the output file
and its finished cases in the cache. Running the same command again skips the probes in the
file and serves the cached cases.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lem_fixtures.errors import LemError, ProbeFileError, ResultFileError
from lem_fixtures.generation import DEFAULT_BATCH_SIZE, RECOMMENDED_BATCH_SIZE, GenerationParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_KERNEL_SPECS = ("json=kernel/axioms.json", "txt=kernel/lek-kernel.txt")
DEFAULT_PROMPT_FILES = ("probes/P001-P020.json",)
# Keys this tool adds to each condition of a probe line, besides upstream's response,
# lek_score, heuristic, chars and time_s.
EXTRA_CONDITION_KEYS = ("finish_reason", "prompt_tokens", "generation_tokens", "mode", "cached", "cache_key")


@dataclass(frozen=True)
class BenchmarkConfig:
    """Inputs of one `lem benchmark` run."""

    model: str
    kernel_specs: tuple[str, ...]
    prompt_paths: tuple[Path, ...]
    output: Path
    params: GenerationParams = field(default_factory=GenerationParams)
    batch_size: int = DEFAULT_BATCH_SIZE
    adapter: Path | None = None
    use_cache: bool = True
    overwrite: bool = False
    duplicate_ids: str = "error"


@dataclass
class BenchmarkResult:
    """What a run wrote: every probe line in probe order, the summary line, and case counts."""

    probe_lines: list[dict[str, Any]]
    summary: dict[str, Any]
    generated: int = 0
    cached: int = 0
    resumed_probes: int = 0


def project_root() -> Path:
    """Return the directory that contains the lem_fixtures package (the repository root of a checkout)."""
    return Path(__file__).resolve().parent.parent


def find_default_file(relative: str | Path) -> Path | None:
    """Return `relative` under the working directory, else under project_root(), else None."""
    for base in (Path.cwd(), project_root()):
        candidate = base / relative
        if candidate.is_file():
            return candidate
    return None


def default_kernel_specs() -> list[str]:
    """Return the default kernel specs whose files exist, with resolved paths."""
    from lem_fixtures.kernels import parse_kernel_spec

    specs = []
    for spec in DEFAULT_KERNEL_SPECS:
        name, relative = parse_kernel_spec(spec)
        path = find_default_file(relative)
        if path is None:
            logger.warning("default kernel %s not found in %s or %s; running without it", relative, Path.cwd(), project_root())
            continue
        specs.append(f"{name}={path}")
    return specs


def default_prompt_paths() -> list[Path]:
    paths = []
    for relative in DEFAULT_PROMPT_FILES:
        path = find_default_file(relative)
        if path is None:
            raise ProbeFileError(
                f"default probe file {relative} not found in {Path.cwd()} or {project_root()}; pass --prompts FILE"
            )
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Resuming


def read_finished_probes(output: Path, overwrite: bool) -> dict[str, dict[str, Any]]:
    """Return the probe lines already in `output` by probe id; an absent file has none.

    Raises ResultFileError when the file already ends with a summary line (a finished run)
    and overwrite is False. With overwrite, the file is emptied and nothing counts as done.
    """
    from lem_fixtures.results import read_ab_file

    if not output.exists():
        return {}
    if overwrite:
        output.write_text("", encoding="utf-8")
        return {}

    ab_file = read_ab_file(output)
    if ab_file.summary is not None:
        raise ResultFileError(
            f"{output} already holds a finished run (it has a summary line); pass --overwrite to replace it, "
            "or choose another --output"
        )
    return {str(line["id"]): line for line in ab_file.probes}


def check_finished_probes(
    output: Path,
    finished: dict[str, dict[str, Any]],
    expected_keys: dict[str, dict[str, str]],
) -> None:
    """Raise ResultFileError unless each finished probe line was written by this very setup.

    expected_keys maps probe id -> condition -> cache key of the current run. Matching cache
    keys mean the same model weights, adapter, tokenizer, rendered prompt (so the same
    kernel), parameters, batching and library versions.
    """
    fix = "pass --overwrite to start again, or choose another --output"
    for probe_id, line in finished.items():
        if probe_id not in expected_keys:
            raise ResultFileError(f"{output} holds probe {probe_id!r}, which is not in --prompts; {fix}")
        conditions = line["conditions"]
        for condition, key in expected_keys[probe_id].items():
            entry = conditions.get(condition)
            if entry is None:
                raise ResultFileError(f"{output}: probe {probe_id!r} has no {condition!r} condition; {fix}")
            if entry.get("cache_key") != key:
                raise ResultFileError(
                    f"{output}: probe {probe_id!r} condition {condition!r} was written with another model, kernel, "
                    f"generation parameter, batch size or library version (its cache_key differs); {fix}"
                )
        extra = sorted(set(conditions) - set(expected_keys[probe_id]))
        if extra:
            raise ResultFileError(f"{output}: probe {probe_id!r} has conditions {extra} that this run does not have; {fix}")


# ---------------------------------------------------------------------------------------------
# Running


def condition_entry(result: Any) -> dict[str, Any]:
    """Return one condition of a probe line: upstream's keys, then EXTRA_CONDITION_KEYS."""
    from lem_fixtures.scoring import score_v2

    generation = result.generation
    heuristic = score_v2(generation.response)
    return {
        "response": generation.response,
        "lek_score": heuristic["lek_score"],
        "heuristic": heuristic,
        "chars": len(generation.response),
        "time_s": round(generation.seconds, 1),
        "finish_reason": generation.finish_reason,
        "prompt_tokens": generation.prompt_tokens,
        "generation_tokens": generation.generation_tokens,
        "mode": generation.mode,
        "cached": result.cached,
        "cache_key": result.key,
    }


def probe_line(probe: Any, conditions: dict[str, dict[str, Any]], condition_order: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "probe",
        "id": probe.id,
        "category": probe.category,
        "prompt": probe.prompt,
        "conditions": {name: conditions[name] for name in condition_order},
        "ts": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def run_benchmark(config: BenchmarkConfig, cache: Any = None) -> BenchmarkResult:
    """Run every probe under every condition, appending probe lines and then the summary line to config.output.

    cache: a GenerationCache; None opens the default one (disabled when config.use_cache is
    False or $LEM_NO_CACHE is set).
    """
    from lem_fixtures.cache import GenerationCache, generate_with_cache, generation_cache_keys
    from lem_fixtures.generation import render_prompt
    from lem_fixtures.kernels import condition_names, load_kernels
    from lem_fixtures.models import load_model
    from lem_fixtures.probes import load_probes
    from lem_fixtures.results import ABWriter, summarize

    started = time.perf_counter()
    probes = load_probes(config.prompt_paths, duplicate_ids=config.duplicate_ids)
    kernels = load_kernels(config.kernel_specs)
    conditions = condition_names(kernels)
    kernel_texts: dict[str, str | None] = {kernel.name: kernel.text for kernel in kernels}
    logger.info("%d probes x %d conditions (%s)", len(probes), len(conditions), ", ".join(conditions))

    finished = read_finished_probes(config.output, config.overwrite)
    loaded = load_model(config.model, adapter_path=config.adapter)

    cases = [(probe, condition) for probe in probes for condition in conditions]
    rendered = [
        render_prompt(loaded.tokenizer, probe.prompt, kernel_texts.get(condition), use_chat_template=loaded.chat)
        for probe, condition in cases
    ]
    keys = generation_cache_keys(loaded, rendered, config.params, batch_size=config.batch_size)
    expected_keys: dict[str, dict[str, str]] = {}
    for (probe, condition), key in zip(cases, keys):
        expected_keys.setdefault(probe.id, {})[condition] = key
    check_finished_probes(config.output, finished, expected_keys)
    if finished:
        logger.info("%s: %d of %d probes already done; running the rest", config.output, len(finished), len(probes))

    todo = [index for index, (probe, _) in enumerate(cases) if probe.id not in finished]
    entries: dict[str, dict[str, dict[str, Any]]] = {}
    lines: list[dict[str, Any]] = []
    counts = {"generated": 0, "cached": 0}
    probe_numbers = {probe.id: number for number, probe in enumerate(probes, start=1)}

    own_cache = cache is None
    if own_cache:
        cache = GenerationCache(enabled=None if config.use_cache else False)
    try:
        with ABWriter(config.output, mode="a") as writer:

            def write_ready_lines() -> None:
                # Lines go out in probe order, so a probe finished early waits for the ones before it.
                while len(lines) < len(probes):
                    probe = probes[len(lines)]
                    if probe.id in finished:
                        lines.append(finished[probe.id])
                        continue
                    done = entries.get(probe.id, {})
                    if len(done) < len(conditions):
                        return
                    line = probe_line(probe, done, conditions)
                    writer.write_probe(line)
                    lines.append(line)

            def on_result(position: int, result: Any) -> None:
                probe, condition = cases[todo[position]]
                entry = condition_entry(result)
                entries.setdefault(probe.id, {})[condition] = entry
                counts["cached" if result.cached else "generated"] += 1
                source = "cached" if result.cached else f"{result.generation.seconds:.1f} s"
                logger.info(
                    "%s %d/%d %s %s, %d tokens, %s, lek %.2f",
                    probe.id, probe_numbers[probe.id], len(probes), condition, source,
                    result.generation.generation_tokens, result.generation.finish_reason, entry["lek_score"],
                )
                write_ready_lines()

            write_ready_lines()
            generate_with_cache(
                loaded,
                [rendered[index] for index in todo],
                config.params,
                cache,
                batch_size=config.batch_size,
                on_result=on_result,
            )
            write_ready_lines()

            summary = summarize(
                lines,
                model=config.model,
                max_tokens=config.params.max_tokens,
                duration_s=time.perf_counter() - started,
                conditions=conditions,
            )
            writer.write_summary(summary)
    finally:
        if own_cache:
            cache.close()

    return BenchmarkResult(
        probe_lines=lines,
        summary=summary,
        generated=counts["generated"],
        cached=counts["cached"],
        resumed_probes=len(finished),
    )


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lem benchmark",
        description="Generate responses to probes with a model under the baseline (no system prompt) and each kernel as the system "
        "prompt, score every response with the v2 heuristic and write an A/B result file (JSONL: one line per probe, "
        "then a summary line). Re-running the same command resumes a killed run.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name, model directory, GGUF file or Hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--adapter", type=Path, metavar="DIR", help="LoRA adapter directory to load on top of the model")
    parser.add_argument(
        "--kernel", action="append", metavar="NAME=PATH",
        help="kernel file used as the system prompt of condition NAME; repeatable "
        f"(default: {' '.join(DEFAULT_KERNEL_SPECS)}, each one whose file exists)",
    )
    parser.add_argument(
        "--prompts", nargs="+", type=Path, metavar="FILE",
        help=f"probe files (JSON array or JSONL) (default: {' '.join(DEFAULT_PROMPT_FILES)})",
    )
    parser.add_argument(
        "--duplicate-ids", choices=("error", "number"), default="error",
        help="what a repeated probe id with another prompt does: fail (error, the default) or get a ~N suffix (number), "
        "which the upstream aggregate seed files need",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("ab-results.jsonl"), metavar="FILE",
        help="A/B result file to write or resume (default: ab-results.jsonl)",
    )

    parser.add_argument("--max-tokens", type=int, default=1024, metavar="N", help="maximum generated tokens per response (default: 1024)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
        help=f"sequences generated together (default: {DEFAULT_BATCH_SIZE}, which reproduces mlx_lm.generate token for "
        f"token). {RECOMMENDED_BATCH_SIZE} is several times faster on a CPU, but its float32 results differ in the last bits, "
        "so a greedy response can change where two tokens nearly tie",
    )
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 is greedy decoding (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold in (0, 1]; 1 turns it off (default: 1)")
    parser.add_argument("--seed", type=int, metavar="S", help="sampling seed, required when --temperature is above 0")

    parser.add_argument("--no-cache", action="store_true", help="generate every response again instead of reading the generation cache")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file instead of resuming it")
    return parser


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchmarkConfig:
    try:
        params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")

    kernel_specs = args.kernel if args.kernel is not None else default_kernel_specs()
    prompt_paths = args.prompts if args.prompts is not None else default_prompt_paths()
    return BenchmarkConfig(
        model=args.model,
        kernel_specs=tuple(kernel_specs),
        prompt_paths=tuple(prompt_paths),
        output=args.output,
        params=params,
        batch_size=args.batch_size,
        adapter=args.adapter,
        use_cache=not args.no_cache,
        overwrite=args.overwrite,
        duplicate_ids=args.duplicate_ids,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    try:
        config = config_from_args(args, parser)
        result = run_benchmark(config)
    except LemError as error:
        print(f"lem: error: {error}", file=sys.stderr)
        return 1

    from lem_fixtures.results import format_summary_table

    logger.info(
        "%s: %d probes written (%d resumed), %d responses generated, %d from the cache",
        config.output, len(result.probe_lines), result.resumed_probes, result.generated, result.cached,
    )
    sys.stdout.write(format_summary_table(result.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
