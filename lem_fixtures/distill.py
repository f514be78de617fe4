"""Self-distillation: sample a model under a kernel condition and keep its best responses as training data.

Each probe is sampled k times with the kernel rendered into the prompt (generation.render_prompt),
each sample with a fixed seed. Samples whose v2 `lek_score` is at least the threshold become chat
examples without the kernel (user = the bare probe prompt, assistant = the sample), so a model
trained on them learns to respond that way without being given the kernel. The data directory gets
train.jsonl and a distill.json manifest with the keep rate, the mean kept score and every sample's
score and seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from lem_fixtures.errors import LemError
from lem_fixtures.training_data import write_examples

logger = logging.getLogger(__name__)

MANIFEST_FILE = "distill.json"
TRAIN_FILE = "train.jsonl"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class DistillSample:
    """One sampled answer, its score and whether it became a training example."""

    probe_id: str
    sample_index: int
    seed: int
    score: float
    kept: bool
    response: str
    finish_reason: str


@dataclass
class DistillResult:
    """The distilled data directory and its bookkeeping (also stored in distill.json)."""

    data_dir: Path
    manifest_path: Path
    kernel: str | None
    k: int
    threshold: float
    n_probes: int
    n_samples: int
    n_kept: int
    keep_rate: float
    mean_kept_score: float | None
    mean_score: float | None
    samples: list[DistillSample] = field(default_factory=list)
    # True when distilled_data found the data in the cache instead of sampling; not stored in distill.json.
    reused: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.pop("reused")
        document["data_dir"] = str(self.data_dir)
        document["manifest_path"] = str(self.manifest_path)
        return document

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> DistillResult:
        values = {name: document[name] for name in cls.__dataclass_fields__ if name in document}
        values["data_dir"] = Path(values["data_dir"])
        values["manifest_path"] = Path(values["manifest_path"])
        values["samples"] = [DistillSample(**sample) for sample in values.get("samples", [])]
        return cls(**values)


def sample_seed(base_seed: int, probe_id: str, sample_index: int) -> int:
    """Return the sampling seed of one sample: a hash of the base seed, the probe id and the sample index."""
    digest = hashlib.sha256(f"{base_seed}\0{probe_id}\0{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def v2_lek_score(text: str) -> float:
    from lem_fixtures.scoring import score_v2

    return float(score_v2(text)["lek_score"])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def distill(
    loaded: Any,
    probes: Sequence[Any],
    kernel: Any,
    k: int,
    threshold: float,
    params: Any,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    score: Callable[[str], float] = v2_lek_score,
) -> DistillResult:
    """Sample `k` responses per probe under `kernel`, keep those scoring >= `threshold`, and write them to `out_dir`.

    loaded: a lem_fixtures.models.LoadedModel (anything with .model and .tokenizer). probes:
    objects with .id and .prompt. kernel: an object with .name and .text, or None for the
    baseline condition. params: generation.GenerationParams, with temperature > 0 when k > 1.
    Sample j of probe p uses seed sample_seed(params.seed, p.id, j). score: maps a response to
    its score (default: v2 lek_score). An empty response is never kept, because an empty
    assistant message fails data validation. Writes train.jsonl (possibly empty) and distill.json.
    """
    from lem_fixtures import generation

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > 1 and params.temperature <= 0:
        raise ValueError(f"k={k} samples per probe need temperature > 0, got {params.temperature}; greedy samples would all be equal")
    if not probes:
        raise ValueError("no probes to distill from; pass at least one probe")

    kernel_text = kernel.text if kernel is not None else None
    rendered_by_probe = [generation.render_prompt(loaded.tokenizer, probe.prompt, kernel_text) for probe in probes]
    prompts, seeds, keys = [], [], []
    for probe, rendered in zip(probes, rendered_by_probe):
        for index in range(k):
            prompts.append(rendered)
            seeds.append(sample_seed(params.seed or 0, probe.id, index))
            keys.append((probe, index))

    started = time.perf_counter()
    options = {"batch_size": batch_size} if batch_size is not None else {}
    generations = generation.generate(loaded, prompts, params, seeds=seeds, **options)
    logger.info("sampled %d answers for %d probes in %.1f s", len(generations), len(probes), time.perf_counter() - started)

    samples = []
    examples = []
    for (probe, index), seed, result in zip(keys, seeds, generations):
        value = float(score(result.response))
        kept = value >= threshold and bool(result.response.strip())
        samples.append(DistillSample(probe.id, index, seed, value, kept, result.response, result.finish_reason))
        if kept:
            examples.append({"messages": [{"role": "user", "content": probe.prompt}, {"role": "assistant", "content": result.response}]})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_examples(out_dir / TRAIN_FILE, examples)
    kept_scores = [sample.score for sample in samples if sample.kept]
    result = DistillResult(
        data_dir=out_dir,
        manifest_path=out_dir / MANIFEST_FILE,
        kernel=kernel.name if kernel is not None else None,
        k=k,
        threshold=threshold,
        n_probes=len(probes),
        n_samples=len(samples),
        n_kept=len(kept_scores),
        keep_rate=len(kept_scores) / len(samples),
        mean_kept_score=_mean(kept_scores),
        mean_score=_mean([sample.score for sample in samples]),
        samples=samples,
    )
    manifest = result.to_json() | {
        "params": params.to_dict() if hasattr(params, "to_dict") else vars(params),
        "kernel_sha256": getattr(kernel, "sha256", None),
        "model": str(getattr(loaded, "name", None) or getattr(loaded, "path", "")),
    }
    temporary = result.manifest_path.with_name(f".{MANIFEST_FILE}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    temporary.replace(result.manifest_path)
    logger.info(
        "kept %d of %d samples (keep rate %.2f, threshold %s) in %s",
        result.n_kept, result.n_samples, result.keep_rate, threshold, out_dir,
    )
    return result


def distill_cache_key(model_sha256: str, probes: Sequence[Any], kernel: Any, k: int, threshold: float, params: Any) -> str:
    """Hash everything that decides distilled data: model files, probe ids and prompts, kernel text, k, threshold and params."""
    document = {
        "cache_format": CACHE_FORMAT,
        "model_sha256": model_sha256,
        "probes": [[probe.id, probe.prompt] for probe in probes],
        "kernel": None if kernel is None else [kernel.name, hashlib.sha256(kernel.text.encode()).hexdigest()],
        "k": k,
        "threshold": threshold,
        "params": params.to_dict() if hasattr(params, "to_dict") else vars(params),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def distilled_data(
    model: str | Path,
    probes: Sequence[Any],
    kernel: Any,
    *,
    k: int,
    threshold: float,
    params: Any,
    cache_dir: str | Path | None = None,
    batch_size: int | None = None,
) -> DistillResult:
    """Return distilled data for (model, probes, kernel, k, threshold, params) from the cache, distilling on a miss.

    Stored under <cache dir>/distill/<key>/ and written through a temporary directory that is
    renamed into place, under a file lock, so concurrent pytest-xdist workers distill once.
    The model is loaded only on a miss.
    """
    from filelock import FileLock

    from lem_fixtures.paths import cache_dir as default_cache_dir
    from lem_fixtures.training import model_files_sha256, resolve_model_path

    model_path = resolve_model_path(model)
    key = distill_cache_key(model_files_sha256(model_path), probes, kernel, k, threshold, params)
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "distill"
    root.mkdir(parents=True, exist_ok=True)
    final = root / key

    def cached() -> DistillResult | None:
        manifest = final / MANIFEST_FILE
        if not manifest.is_file():
            return None
        result = replace(DistillResult.from_json(json.loads(manifest.read_text())), reused=True)
        logger.info("reused cached distilled data %s at %s", key[:16], final)
        return result

    hit = cached()
    if hit is not None:
        return hit
    with FileLock(str(root / f"{key}.lock")):
        hit = cached()
        if hit is not None:
            return hit
        if final.exists():
            shutil.rmtree(final)
        from lem_fixtures.models import load_model

        loaded = load_model(str(model_path))
        temporary = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=root))
        try:
            result = distill(loaded, probes, kernel, k, threshold, params, temporary, batch_size=batch_size)
            result = replace(result, data_dir=final, manifest_path=final / MANIFEST_FILE)
            manifest_path = temporary / MANIFEST_FILE
            manifest = json.loads(manifest_path.read_text()) | {"data_dir": str(final), "manifest_path": str(final / MANIFEST_FILE)}
            manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
            os.replace(temporary, final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    logger.info("distilled data %s written to %s", key[:16], final)
    return result


DEFAULT_K = 4
DEFAULT_THRESHOLD = 0.0
DEFAULT_TEMPERATURE = 0.7
DEFAULT_MAX_TOKENS = 1024


def build_parser() -> argparse.ArgumentParser:
    from lem_fixtures.benchmark import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="lem distill",
        description="Self-distill LEM training data: sample each probe K times under a kernel condition, keep the samples "
        "whose v2 score reaches the threshold and write them as chat examples without the kernel. Prints the data "
        "folder, which `lem train --data` takes.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registry name or mlx-lm model directory (default: {DEFAULT_MODEL})")
    parser.add_argument(
        "--kernel", metavar="NAME=PATH",
        help="kernel condition to sample under; PATH#N takes the Nth JSON document of a file "
        "(default: json=kernel/axioms.json of the working folder, else of the project)",
    )
    parser.add_argument(
        "--prompts", nargs="+", type=Path, metavar="PATH",
        help="probe files or folders to distill from (default: the project's probes/)",
    )
    parser.add_argument("--k", type=int, default=DEFAULT_K, metavar="K", help=f"samples per probe (default: {DEFAULT_K})")
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, metavar="SCORE",
        help=f"lowest v2 lek_score a sample needs to be kept (default: {DEFAULT_THRESHOLD:g})",
    )
    parser.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE, metavar="T",
        help=f"sampling temperature, above 0 when K > 1 (default: {DEFAULT_TEMPERATURE})",
    )
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold in (0, 1] (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N", help=f"maximum tokens per sample (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="base seed; each sample derives its own from it (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples generated together (default: 16)")
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="write train.jsonl and distill.json to this folder, replacing them (default: the cache, where a repeated "
        "command reuses them)",
    )
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="cache root (default: $LEM_CACHE_DIR, else $XDG_CACHE_HOME/lem, else ~/.cache/lem)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"--k must be at least 1, got {args.k}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    from lem_fixtures.generation import GenerationParams

    try:
        params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    if args.k > 1 and args.temperature <= 0:
        parser.error(f"--k {args.k} needs --temperature above 0; greedy samples of one probe are all the same")

    try:
        result = _run_cli(args, params)
    except LemError as error:
        print(f"lem: error: {error}", file=sys.stderr)
        return 1

    mean_kept = "none" if result.mean_kept_score is None else f"{result.mean_kept_score:.2f}"
    source = "from the cache: " if result.reused else ""
    print(
        f"{source}kept {result.n_kept} of {result.n_samples} samples from {result.n_probes} probes "
        f"(keep rate {result.keep_rate:.2f}, mean kept score {mean_kept}, threshold {result.threshold:g})",
        file=sys.stderr,
    )
    print(result.data_dir)
    return 0


def _run_cli(args: argparse.Namespace, params: Any) -> DistillResult:
    from lem_fixtures.benchmark import default_kernel_specs, project_root
    from lem_fixtures.errors import KernelError
    from lem_fixtures.kernels import load_kernel
    from lem_fixtures.probes import load_probes

    spec = args.kernel
    if spec is None:
        defaults = default_kernel_specs()
        if not defaults:
            raise KernelError("no default kernel file found; pass --kernel NAME=PATH")
        spec = defaults[0]
    kernel = load_kernel(spec)
    prompts = args.prompts or [project_root() / "probes"]
    probes = load_probes(prompts)
    if args.out is None:
        return distilled_data(
            args.model, probes, kernel, k=args.k, threshold=args.threshold, params=params,
            cache_dir=args.cache_dir, batch_size=args.batch_size,
        )

    from lem_fixtures.models import load_model
    from lem_fixtures.training import resolve_model_path

    loaded = load_model(str(resolve_model_path(args.model)))
    return distill(loaded, probes, kernel, args.k, args.threshold, params, args.out, batch_size=args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
