"""Self-distillation: sample a model under a kernel condition and keep its best responses as training data.

Each probe is sampled k times with the kernel rendered into the prompt (generation.render_prompt),
each sample with a fixed seed. Samples whose v2 `lek_score` is at least the threshold become chat
examples without the kernel (user = the bare probe prompt, assistant = the sample), so a model
trained on them learns to respond that way without being given the kernel. Every tenth kept
example goes to valid.jsonl for the validation loss, the rest to train.jsonl. distill.json records
the keep rate, the mean kept score, how many samples reached the token limit, and every sample's
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
SAMPLES_FILE = "samples.json"
TRAIN_FILE = "train.jsonl"
VALID_FILE = "valid.jsonl"
# Every VALID_EVERY-th kept example (the 10th, 20th, ...) is held out for validation.
VALID_EVERY = 10
CACHE_FORMAT = 2
FINISH_LENGTH = "length"


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
    """The distilled data directory and its bookkeeping (also stored in distill.json).

    n_train and n_valid split the kept examples between train.jsonl and valid.jsonl.
    n_truncated counts the samples that stopped at the token limit, n_kept_truncated those of
    them that were kept; drop_truncated is true when such samples were rejected.
    """

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
    n_train: int = 0
    n_valid: int = 0
    n_truncated: int = 0
    n_kept_truncated: int = 0
    drop_truncated: bool = False
    # True when distilled_data found the samples in the cache instead of generating them; not stored in distill.json.
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


def _params_dict(params: Any) -> dict[str, Any]:
    return params.to_dict() if hasattr(params, "to_dict") else dict(vars(params))


def check_settings(k: int, params: Any) -> None:
    """Raise ValueError for settings that cannot distill: k below 1, or several greedy samples per probe."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > 1 and params.temperature <= 0:
        raise ValueError(f"k={k} samples per probe need temperature > 0, got {params.temperature}; greedy samples would all be equal")


def sample_responses(
    loaded: Any,
    probes: Sequence[Any],
    kernel: Any,
    k: int,
    params: Any,
    *,
    batch_size: int | None = None,
    score: Callable[[str], float] = v2_lek_score,
) -> list[DistillSample]:
    """Generate and score `k` samples per probe under `kernel`; every sample comes back with kept=False.

    loaded: a lem_fixtures.models.LoadedModel (anything with .model and .tokenizer). probes:
    objects with .id and .prompt. kernel: an object with .name and .text, or None for the
    baseline condition. params: generation.GenerationParams, with temperature > 0 when k > 1.
    Sample j of probe p uses seed sample_seed(params.seed, p.id, j). score: maps a response to
    its score (default: v2 lek_score).
    """
    from lem_fixtures import generation

    check_settings(k, params)
    if not probes:
        raise ValueError("no probes to distill from; pass at least one probe")

    kernel_text = kernel.text if kernel is not None else None
    prompts, seeds, keys = [], [], []
    for probe in probes:
        rendered = generation.render_prompt(loaded.tokenizer, probe.prompt, kernel_text)
        for index in range(k):
            prompts.append(rendered)
            seeds.append(sample_seed(params.seed or 0, probe.id, index))
            keys.append((probe.id, index))

    started = time.perf_counter()
    options = {"batch_size": batch_size} if batch_size is not None else {}
    generations = generation.generate(loaded, prompts, params, seeds=seeds, **options)
    logger.info("sampled %d answers for %d probes in %.1f s", len(generations), len(probes), time.perf_counter() - started)

    return [
        DistillSample(probe_id, index, seed, float(score(result.response)), False, result.response, result.finish_reason)
        for (probe_id, index), seed, result in zip(keys, seeds, generations)
    ]


def select_samples(samples: Sequence[DistillSample], threshold: float, *, drop_truncated: bool = False) -> list[DistillSample]:
    """Mark the samples to keep: score >= threshold, a non-empty response, and with drop_truncated not cut at the token limit.

    An empty response is never kept, because an empty assistant message fails data validation.
    """
    selected = []
    for sample in samples:
        kept = sample.score >= threshold and bool(sample.response.strip())
        if drop_truncated and sample.finish_reason == FINISH_LENGTH:
            kept = False
        selected.append(replace(sample, kept=kept))
    return selected


def write_distilled(
    out_dir: str | Path,
    probes: Sequence[Any],
    samples: Sequence[DistillSample],
    *,
    kernel: Any,
    k: int,
    threshold: float,
    drop_truncated: bool = False,
    extra: dict[str, Any] | None = None,
) -> DistillResult:
    """Write the kept samples of `samples` (see select_samples) as train.jsonl and valid.jsonl, plus distill.json."""
    prompts = {probe.id: probe.prompt for probe in probes}
    examples = [
        {"messages": [{"role": "user", "content": prompts[sample.probe_id]}, {"role": "assistant", "content": sample.response}]}
        for sample in samples
        if sample.kept
    ]
    valid = [example for number, example in enumerate(examples, start=1) if number % VALID_EVERY == 0]
    train = [example for number, example in enumerate(examples, start=1) if number % VALID_EVERY != 0]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_examples(out_dir / TRAIN_FILE, train)
    if valid:
        write_examples(out_dir / VALID_FILE, valid)
    elif (out_dir / VALID_FILE).exists():
        (out_dir / VALID_FILE).unlink()

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
        keep_rate=len(kept_scores) / len(samples) if samples else 0.0,
        mean_kept_score=_mean(kept_scores),
        mean_score=_mean([sample.score for sample in samples]),
        samples=list(samples),
        n_train=len(train),
        n_valid=len(valid),
        n_truncated=sum(sample.finish_reason == FINISH_LENGTH for sample in samples),
        n_kept_truncated=sum(sample.kept and sample.finish_reason == FINISH_LENGTH for sample in samples),
        drop_truncated=drop_truncated,
    )
    manifest = result.to_json() | {"kernel_sha256": getattr(kernel, "sha256", None), **(extra or {})}
    temporary = result.manifest_path.with_name(f".{MANIFEST_FILE}.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    temporary.replace(result.manifest_path)
    logger.info(
        "kept %d of %d samples (keep rate %.2f, threshold %s; %d reached the token limit) in %s",
        result.n_kept, result.n_samples, result.keep_rate, threshold, result.n_truncated, out_dir,
    )
    return result


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
    drop_truncated: bool = False,
) -> DistillResult:
    """Sample `k` responses per probe under `kernel`, keep those scoring >= `threshold`, and write them to `out_dir`.

    The steps are sample_responses, select_samples and write_distilled; see each for details.
    """
    samples = sample_responses(loaded, probes, kernel, k, params, batch_size=batch_size, score=score)
    selected = select_samples(samples, threshold, drop_truncated=drop_truncated)
    extra = {
        "params": _params_dict(params),
        "model": str(getattr(loaded, "name", None) or getattr(loaded, "path", "")),
    }
    return write_distilled(out_dir, probes, selected, kernel=kernel, k=k, threshold=threshold, drop_truncated=drop_truncated, extra=extra)


def samples_cache_key(model_sha256: str, probes: Sequence[Any], kernel: Any, k: int, params: Any) -> str:
    """Hash everything that decides the samples: model files, probe ids and prompts, kernel text, k and params.

    The threshold is not part of it: every threshold selects from the same cached samples.
    """
    document = {
        "cache_format": CACHE_FORMAT,
        "model_sha256": model_sha256,
        "probes": [[probe.id, probe.prompt] for probe in probes],
        "kernel": None if kernel is None else [kernel.name, hashlib.sha256(kernel.text.encode()).hexdigest()],
        "k": k,
        "params": _params_dict(params),
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def selection_dir_name(threshold: float, drop_truncated: bool) -> str:
    """Name the folder of one selection from cached samples, for example "threshold_0.0" or "threshold_-2.5_finished"."""
    return f"threshold_{float(threshold)!r}" + ("_finished" if drop_truncated else "")


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
    drop_truncated: bool = False,
) -> DistillResult:
    """Return distilled data for (model, probes, kernel, k, params) and a threshold, from the cache where it can.

    The samples are stored once under <cache dir>/distill/<key>/samples.json, written through a
    temporary file under a file lock, so concurrent pytest-xdist workers sample once. Each
    threshold (and drop_truncated) then gets its own data folder <key>/threshold_<value>/, made
    from the cached samples without loading the model. The model is loaded only when the samples
    are missing; `reused` in the result is true when they were found.
    """
    from filelock import FileLock

    from lem_fixtures.paths import cache_dir as default_cache_dir
    from lem_fixtures.training import model_files_sha256, resolve_model_path

    check_settings(k, params)
    model_path = resolve_model_path(model)
    key = samples_cache_key(model_files_sha256(model_path), probes, kernel, k, params)
    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "distill"
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    samples_path = folder / SAMPLES_FILE
    data_dir = folder / selection_dir_name(threshold, drop_truncated)

    with FileLock(str(root / f"{key}.lock")):
        reused = samples_path.is_file()
        if reused:
            stored = json.loads(samples_path.read_text())
            samples = [DistillSample(**sample) for sample in stored["samples"]]
            logger.info("reused %d cached samples %s at %s", len(samples), key[:16], folder)
        else:
            from lem_fixtures.models import load_model

            loaded = load_model(str(model_path))
            samples = sample_responses(loaded, probes, kernel, k, params, batch_size=batch_size)
            stored = {
                "model": str(model),
                "model_path": str(model_path),
                "kernel": None if kernel is None else kernel.name,
                "kernel_sha256": getattr(kernel, "sha256", None),
                "k": k,
                "params": _params_dict(params),
                "samples": [asdict(sample) for sample in samples],
            }
            temporary = samples_path.with_name(f".{SAMPLES_FILE}.tmp")
            temporary.write_text(json.dumps(stored, indent=2, ensure_ascii=False))
            os.replace(temporary, samples_path)
            logger.info("stored %d samples %s at %s", len(samples), key[:16], folder)

        manifest = data_dir / MANIFEST_FILE
        if manifest.is_file():
            return replace(DistillResult.from_json(json.loads(manifest.read_text())), reused=reused)

        # A selection is cheap, so it is written again whole when its folder is incomplete.
        temporary_dir = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}-", dir=folder))
        try:
            selected = select_samples(samples, threshold, drop_truncated=drop_truncated)
            extra = {"params": stored["params"], "model": stored["model"], "samples_file": str(samples_path)}
            result = write_distilled(
                temporary_dir, probes, selected, kernel=kernel, k=k, threshold=threshold, drop_truncated=drop_truncated, extra=extra,
            )
            document = json.loads(result.manifest_path.read_text()) | {"data_dir": str(data_dir), "manifest_path": str(manifest)}
            result.manifest_path.write_text(json.dumps(document, indent=2, ensure_ascii=False))
            if data_dir.exists():
                shutil.rmtree(data_dir)
            os.replace(temporary_dir, data_dir)
        except BaseException:
            shutil.rmtree(temporary_dir, ignore_errors=True)
            raise
    return replace(result, data_dir=data_dir, manifest_path=manifest, reused=reused)


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
    parser.add_argument(
        "--drop-truncated", action="store_true",
        help="reject samples that stopped at --max-tokens, whatever their score (default: keep them)",
    )
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling threshold in (0, 1] (default: 1)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N", help=f"maximum tokens per sample (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="base seed; each sample derives its own from it (default: 0)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples generated together (default: 16)")
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="write train.jsonl, valid.jsonl and distill.json to this folder, replacing them (default: the cache, where "
        "a repeated command reuses the samples, also for another --threshold)",
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
    source = "samples from the cache: " if result.reused else ""
    print(
        f"{source}kept {result.n_kept} of {result.n_samples} samples from {result.n_probes} probes "
        f"(keep rate {result.keep_rate:.2f}, mean kept score {mean_kept}, threshold {result.threshold:g}); "
        f"{result.n_truncated} samples reached --max-tokens, {result.n_kept_truncated} of them kept; "
        f"train.jsonl {result.n_train} examples, valid.jsonl {result.n_valid}",
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
            cache_dir=args.cache_dir, batch_size=args.batch_size, drop_truncated=args.drop_truncated,
        )

    from lem_fixtures.models import load_model
    from lem_fixtures.training import resolve_model_path

    loaded = load_model(str(resolve_model_path(args.model)))
    return distill(
        loaded, probes, kernel, args.k, args.threshold, params, args.out,
        batch_size=args.batch_size, drop_truncated=args.drop_truncated,
    )


if __name__ == "__main__":
    sys.exit(main())
