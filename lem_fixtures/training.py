"""LoRA training on LEM data with mlx-lm's tuner: configs, cached adapters, fusing, `lem train` and effect tables.

A training config is a YAML file (see training/lora.yaml) whose keys follow `mlx_lm lora`'s
names. Training runs in-process with `mlx_lm.tuner`. Phases train in sequence on one set of LoRA
layers, and each phase starts from the adapter weights the previous phase saved. `ensure_adapter`
trains once per (base model files, data files, config) and stores the adapter under
<cache dir>/adapters/<key>/, so pytest-xdist workers and later sessions reuse it.

Train on float32 weights on CPU: a float16/bfloat16 model trains far slower there. A quantized
model trains as QLoRA (LoRA layers over the frozen quantized weights), which works but is slow.
For SmolLM2-135M with its GGUF Q4_1 blocks kept, one iteration took about 13.5 s, against 0.58 s
in float32 (batch 2 of short chat examples, 2-core x86 CPU, mlx 0.32.4, mlx-lm 0.32.2).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lem_fixtures import paths
from lem_fixtures.errors import LemError, TrainingConfigError
from lem_fixtures.training_data import SPLITS, TrainingData, validate_training_data

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "training" / "lora.yaml"
DEFAULT_DATA = PROJECT_ROOT / "training" / "data"
# Bump when the adapter directory layout or the training procedure changes, so old cache entries are not reused.
CACHE_FORMAT = 1
ADAPTER_FILE = "adapters.safetensors"
MANIFEST_FILE = "lem_adapter.json"
LOG_FILE = "training_log.json"
BASELINE = "baseline"


@dataclass(frozen=True)
class Phase:
    """One training stage: its data directory (None means the caller's data_dir) and an optional iteration count."""

    name: str
    data: Path | None = None
    iters: int | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """LoRA settings. Names and meanings follow `mlx_lm lora` (mlx-lm 0.32)."""

    iters: int
    batch_size: int
    learning_rate: float
    mask_prompt: bool
    max_seq_length: int
    seed: int
    num_layers: int
    rank: int
    scale: float
    dropout: float
    phases: tuple[Phase, ...] = (Phase("main"),)
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    grad_checkpoint: bool = False
    source: Path | None = None

    def lora_parameters(self) -> dict[str, float]:
        return {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}

    def canonical(self) -> dict[str, Any]:
        """Return every setting that changes the trained weights, as plain JSON values.

        Phase data paths are left out because the cache key hashes the data file contents instead.
        """
        return {
            "iters": self.iters,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "mask_prompt": self.mask_prompt,
            "max_seq_length": self.max_seq_length,
            "seed": self.seed,
            "num_layers": self.num_layers,
            "lora_parameters": self.lora_parameters(),
            "phases": [{"name": phase.name, "iters": phase.iters or self.iters} for phase in self.phases],
            "val_batches": self.val_batches,
            "steps_per_eval": self.steps_per_eval,
            "grad_checkpoint": self.grad_checkpoint,
        }


# key: (type, required). Types: "int", "pos_int", "layers", "float", "pos_float", "fraction", "bool".
CONFIG_KEYS: dict[str, tuple[str, bool]] = {
    "iters": ("pos_int", True),
    "batch_size": ("pos_int", True),
    "learning_rate": ("pos_float", True),
    "mask_prompt": ("bool", True),
    "max_seq_length": ("pos_int", True),
    "seed": ("int", True),
    "num_layers": ("layers", True),
    "lora_parameters": ("mapping", True),
    "phases": ("list", False),
    "val_batches": ("batches", False),
    "steps_per_report": ("pos_int", False),
    "steps_per_eval": ("pos_int", False),
    "grad_checkpoint": ("bool", False),
}
LORA_KEYS: dict[str, str] = {"rank": "pos_int", "scale": "pos_float", "dropout": "fraction"}
PHASE_KEYS: dict[str, tuple[str, bool]] = {"name": ("str", True), "data": ("str", False), "iters": ("pos_int", False)}
TYPE_WORDS = {
    "int": "an integer",
    "pos_int": "a positive integer",
    "layers": "a positive integer, or -1 for all layers",
    "batches": "a positive integer, or -1 for the whole split",
    "float": "a number",
    "pos_float": "a positive number",
    "fraction": "a number in [0, 1)",
    "bool": "true or false",
    "str": "a non-empty string",
    "mapping": "a mapping",
    "list": "a list",
}


def _check_value(path: Path, key: str, value: Any, kind: str) -> Any:
    """Return `value` converted to its config type, or raise TrainingConfigError naming file and key."""
    def fail() -> TrainingConfigError:
        return TrainingConfigError(
            f"{path}: key {key!r} must be {TYPE_WORDS[kind]}, got {type(value).__name__} {value!r}; fix the value in the file"
        )

    if kind in ("int", "pos_int", "layers", "batches"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        if kind == "pos_int" and value < 1:
            raise fail()
        if kind in ("layers", "batches") and value < 1 and value != -1:
            raise fail()
        return value
    if kind in ("float", "pos_float", "fraction"):
        if isinstance(value, str):
            # PyYAML reads exponent floats without a dot, such as 1e-5, as strings (YAML 1.1).
            try:
                value = float(value)
            except ValueError:
                raise fail() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail()
        if kind == "pos_float" and value <= 0:
            raise fail()
        if kind == "fraction" and not 0 <= value < 1:
            raise fail()
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail()
        return value
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise fail()
        return value
    if kind == "mapping":
        if not isinstance(value, dict):
            raise fail()
        return value
    if kind == "list":
        if not isinstance(value, list):
            raise fail()
        return value
    raise AssertionError(f"unknown config type {kind}")


def _check_keys(path: Path, where: str, mapping: Mapping[str, Any], known: Sequence[str], required: Sequence[str]) -> None:
    for key in mapping:
        if key not in known:
            raise TrainingConfigError(
                f"{path}: unknown key {key!r} in {where}; known keys: {', '.join(known)}"
            )
    for key in required:
        if key not in mapping:
            raise TrainingConfigError(f"{path}: missing key {key!r} in {where}; add it to the file")


def load_training_config(path: str | Path) -> TrainingConfig:
    """Read and validate a training config YAML file.

    Raises TrainingConfigError naming the file and key for a missing file, invalid YAML, an
    unknown or missing key, or a value of the wrong type. A phase's relative `data` path is
    resolved against the config file's directory.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingConfigError(f"training config {path} not found; pass an existing YAML file") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TrainingConfigError(f"{path}: invalid YAML ({error}); fix the syntax") from None
    if not isinstance(document, dict):
        raise TrainingConfigError(f"{path}: the file must contain a mapping of settings, got {type(document).__name__}")

    required = [key for key, (_, needed) in CONFIG_KEYS.items() if needed]
    _check_keys(path, "the config", document, list(CONFIG_KEYS), required)
    values = {key: _check_value(path, key, document[key], CONFIG_KEYS[key][0]) for key in document}

    lora = values.pop("lora_parameters")
    _check_keys(path, "lora_parameters", lora, list(LORA_KEYS), list(LORA_KEYS))
    for key, kind in LORA_KEYS.items():
        values[key] = _check_value(path, f"lora_parameters.{key}", lora[key], kind)

    raw_phases = values.pop("phases", None)
    if raw_phases is not None:
        values["phases"] = _load_phases(path, raw_phases)
    return TrainingConfig(**values, source=path)


def _load_phases(path: Path, raw_phases: list[Any]) -> tuple[Phase, ...]:
    if not raw_phases:
        raise TrainingConfigError(f"{path}: 'phases' is empty; list at least one {{name, data}} entry or remove the key")
    phases = []
    names = set()
    for index, raw in enumerate(raw_phases):
        where = f"phases[{index}]"
        if not isinstance(raw, dict):
            raise TrainingConfigError(f"{path}: {where} must be a mapping with 'name' and 'data', got {type(raw).__name__}")
        _check_keys(path, where, raw, list(PHASE_KEYS), [key for key, (_, needed) in PHASE_KEYS.items() if needed])
        checked = {key: _check_value(path, f"{where}.{key}", raw[key], PHASE_KEYS[key][0]) for key in raw}
        if checked["name"] in names:
            raise TrainingConfigError(f"{path}: {where}.name {checked['name']!r} is used twice; give each phase its own name")
        names.add(checked["name"])
        data = checked.get("data")
        data_path = None if data is None else (path.parent / Path(data).expanduser())
        phases.append(Phase(name=checked["name"], data=data_path, iters=checked.get("iters")))
    return tuple(phases)


def resolve_phase_data(config: TrainingConfig, data_dir: str | Path | None) -> list[tuple[Phase, Path]]:
    """Pair each phase with its data directory.

    `data_dir` replaces the data of a single-phase config, and is the data of every phase that
    names none. A config whose several phases all name their data rejects `data_dir`, because no
    phase would train on it.
    """
    where = config.source or "the training config"
    if data_dir is not None and len(config.phases) == 1:
        return [(config.phases[0], Path(data_dir))]
    if data_dir is not None and all(phase.data is not None for phase in config.phases):
        raise TrainingConfigError(
            f"{where}: every phase names its own data, so the data directory {data_dir} would not be used; "
            "omit the data directory, or remove 'data' from the phase that should train on it"
        )

    pairs = []
    for phase in config.phases:
        if phase.data is not None:
            pairs.append((phase, phase.data))
        elif data_dir is not None:
            pairs.append((phase, Path(data_dir)))
        else:
            raise TrainingConfigError(f"{where}: phase {phase.name!r} names no data; add 'data' to the phase or pass a data directory")
    return pairs


@dataclass
class PhaseRun:
    """What one phase did: data, iterations, time, losses and memory."""

    name: str
    data_dir: str
    train_examples: int
    valid_examples: int
    iters: int
    seconds: float
    seconds_per_iteration: float
    peak_memory_gb: float
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class TrainingRun:
    """The result of `train_lora`: where the adapter is and what each phase did."""

    adapter_dir: Path
    phases: list[PhaseRun]
    trainable_parameters: int
    max_rss_mb: float

    def to_json(self) -> dict[str, Any]:
        return {
            "trainable_parameters": self.trainable_parameters,
            "max_rss_mb": self.max_rss_mb,
            "phases": [vars(phase) for phase in self.phases],
        }


class _LossRecorder:
    """A training callback (the two methods mlx-lm's TrainingCallback defines) that keeps every report."""

    def __init__(self) -> None:
        self.train_losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.val_seconds = 0.0
        self.peak_memory_gb = 0.0

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        self.train_losses.append((int(info["iteration"]), float(info["train_loss"])))
        self.peak_memory_gb = max(self.peak_memory_gb, float(info.get("peak_memory", 0.0)))
        logger.info("iteration %d: train loss %.3f", info["iteration"], info["train_loss"])

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        self.val_losses.append((int(info["iteration"]), float(info["val_loss"])))
        self.val_seconds += float(info.get("val_time", 0.0))
        logger.info("iteration %d: validation loss %.3f", info["iteration"], info["val_loss"])


def resolve_model_path(model: str | Path) -> Path:
    """Return the mlx-lm model directory for a directory path or a registry name (through lem_fixtures.models)."""
    candidate = Path(model).expanduser()
    if candidate.is_dir():
        return candidate
    from lem_fixtures.models import resolve_model

    return Path(resolve_model(str(model)))


def model_files_sha256(model_path: str | Path) -> str:
    """Hash what decides the trained weights: the weight files, the tokenizer files and config.json.

    Uses lem_fixtures.models' digests, which are cached in the model directory, so a large model
    is read once per change rather than once per session.
    """
    from lem_fixtures.convert import file_sha256
    from lem_fixtures.models import tokenizer_sha256, weights_sha256

    directory = Path(model_path)
    parts = [
        f"weights {weights_sha256(directory)}",
        f"tokenizer {tokenizer_sha256(directory)}",
        f"config {file_sha256(directory / 'config.json')}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _mlx_lm_version() -> str | None:
    try:
        return importlib.metadata.version("mlx-lm")
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_model_for_training(model: Any, model_config: Mapping[str, Any], config: TrainingConfig, model_path: Path) -> None:
    layers = len(model.layers)
    if config.num_layers > layers:
        where = config.source or "the training config"
        raise TrainingConfigError(
            f"{where}: num_layers is {config.num_layers} but {model_path} has {layers} layers; "
            f"set num_layers to at most {layers}, or -1 for all"
        )
    if "quantization" in model_config:
        logger.warning(
            "%s is quantized, so this trains QLoRA; on an x86 CPU it runs about 20 times slower per iteration "
            "than LoRA on float32 weights",
            model_path,
        )
        return

    import mlx.core as mx
    from mlx.utils import tree_flatten

    half = {value.dtype for _, value in tree_flatten(model.parameters())} & {mx.float16, mx.bfloat16}
    if half:
        names = ", ".join(sorted(str(dtype) for dtype in half))
        logger.warning("%s has %s weights; on CPU, training in float32 is much faster", model_path, names)


def _write_adapter_config(adapter_dir: Path, config: TrainingConfig, model_path: Path, extra: dict[str, Any]) -> None:
    """Write adapter_config.json with the keys `mlx_lm.load(adapter_path=...)` reads, plus provenance."""
    document = {
        "fine_tune_type": "lora",
        "num_layers": config.num_layers,
        "lora_parameters": config.lora_parameters(),
        "model": str(model_path),
        "lem_config": config.canonical(),
        **extra,
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(document, indent=2, sort_keys=True))


def train_lora(
    model_path: str | Path,
    data_dir: str | Path | None,
    config: TrainingConfig,
    adapter_dir: str | Path,
    *,
    train_split: str = "train",
) -> TrainingRun:
    """Train a LoRA adapter on `model_path` and write it to `adapter_dir`; return what each phase did.

    Every phase's data is validated before the first iteration (TrainingDataError lists all
    problems). Phases run in order on the same LoRA layers; before each later phase the previous
    phase's saved adapter is loaded, as `mlx_lm lora --resume-adapter-file` does. `adapter_dir`
    gets adapters.safetensors and adapter_config.json (loadable with `mlx_lm.load(model,
    adapter_path=...)`), phases/NN-name/adapters.safetensors for each phase, and training_log.json.
    """
    from lem_fixtures.backend import import_mlx

    mx = import_mlx()
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model_path = Path(model_path)
    adapter_dir = Path(adapter_dir)
    pairs = resolve_phase_data(config, data_dir)

    logger.info("loading %s for LoRA training", model_path)
    model, tokenizer, model_config = load(str(model_path), return_config=True)
    _check_model_for_training(model, model_config, config, model_path)

    datasets: list[TrainingData] = [
        validate_training_data(
            phase_dir,
            tokenizer,
            train_split=train_split,
            batch_size=config.batch_size,
            max_seq_length=config.max_seq_length,
            mask_prompt=config.mask_prompt,
        )
        for _, phase_dir in pairs
    ]

    mx.random.seed(config.seed)
    model.freeze()
    linear_to_lora_layers(model, config.num_layers, config.lora_parameters())
    trainable = sum(value.size for _, value in tree_flatten(model.trainable_parameters()))
    logger.info("LoRA rank %d on the last %s layers: %d trainable parameters", config.rank, config.num_layers, trainable)

    adapter_dir.mkdir(parents=True, exist_ok=True)
    runs: list[PhaseRun] = []
    previous: Path | None = None
    for number, ((phase, phase_dir), data) in enumerate(zip(pairs, datasets), start=1):
        phase_adapter_dir = adapter_dir / "phases" / f"{number:02d}-{phase.name}"
        phase_adapter_dir.mkdir(parents=True, exist_ok=True)
        if previous is not None:
            model.load_weights(str(previous), strict=False)

        iters = phase.iters or config.iters
        mx.random.seed(config.seed)
        np.random.seed(config.seed)
        args = TrainingArgs(
            batch_size=config.batch_size,
            iters=iters,
            val_batches=config.val_batches,
            steps_per_report=min(config.steps_per_report, iters),
            steps_per_eval=config.steps_per_eval,
            steps_per_save=iters + 1,  # no intermediate checkpoints; train() always saves at the end
            adapter_file=str(phase_adapter_dir / ADAPTER_FILE),
            max_seq_length=config.max_seq_length,
            grad_checkpoint=config.grad_checkpoint,
        )
        train_set = ChatDataset(data.train.examples, tokenizer, mask_prompt=config.mask_prompt)
        valid_examples = data.valid.examples if data.valid is not None else []
        valid_set = ChatDataset(valid_examples, tokenizer, mask_prompt=config.mask_prompt)

        recorder = _LossRecorder()
        mx.reset_peak_memory()
        logger.info(
            "phase %s: %d iterations on %d examples from %s (%s split)",
            phase.name, iters, len(data.train.examples), phase_dir, data.train_split,
        )
        started = time.perf_counter()
        train(
            model=model,
            optimizer=optim.Adam(learning_rate=config.learning_rate),
            train_dataset=CacheDataset(train_set),
            val_dataset=CacheDataset(valid_set),
            args=args,
            training_callback=recorder,
        )
        seconds = time.perf_counter() - started
        run = PhaseRun(
            name=phase.name,
            data_dir=str(phase_dir),
            train_examples=len(data.train.examples),
            valid_examples=len(valid_examples),
            iters=iters,
            seconds=round(seconds, 3),
            seconds_per_iteration=round((seconds - recorder.val_seconds) / iters, 4),
            peak_memory_gb=round(mx.get_peak_memory() / 1e9, 3),
            train_losses=recorder.train_losses,
            val_losses=recorder.val_losses,
        )
        runs.append(run)
        logger.info(
            "phase %s done: %.1f s, %.3f s per iteration (validation excluded), peak memory %.2f GB",
            phase.name, run.seconds, run.seconds_per_iteration, run.peak_memory_gb,
        )
        previous = phase_adapter_dir / ADAPTER_FILE

    shutil.copyfile(previous, adapter_dir / ADAPTER_FILE)
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    result = TrainingRun(adapter_dir=adapter_dir, phases=runs, trainable_parameters=trainable, max_rss_mb=round(max_rss, 1))
    _write_adapter_config(
        adapter_dir, config, model_path,
        {"train_split": train_split, "phase_data": [str(path) for _, path in pairs], "mlx_lm_version": _mlx_lm_version()},
    )
    (adapter_dir / LOG_FILE).write_text(json.dumps(result.to_json(), indent=2))
    return result


@dataclass(frozen=True)
class CachedAdapter:
    """An adapter from the cache: its directory, cache key, and whether this call trained it."""

    path: Path
    key: str
    trained: bool
    manifest: dict[str, Any]


def adapter_cache_key(model_path: Path, pairs: list[tuple[Phase, Path]], config: TrainingConfig, train_split: str) -> tuple[str, dict[str, Any]]:
    """Return the cache key and the document it hashes: model files, data file contents per phase, canonical config."""
    phase_data = []
    for phase, directory in pairs:
        data = validate_training_data(directory, train_split=train_split)
        phase_data.append({"phase": phase.name, "data_sha256": data.sha256()})
    document = {
        "cache_format": CACHE_FORMAT,
        "model_sha256": model_files_sha256(model_path),
        "data": phase_data,
        "config": config.canonical(),
        "train_split": train_split,
        "mlx_lm_version": _mlx_lm_version(),
    }
    encoded = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest(), document


def ensure_adapter(
    model: str | Path,
    data_dir: str | Path | None = None,
    config_path: str | Path = DEFAULT_CONFIG,
    *,
    train_split: str = "train",
    cache_dir: str | Path | None = None,
) -> CachedAdapter:
    """Return the cached adapter for (model, data, config), training it first if no process has.

    The key hashes the model's weight, config and tokenizer files, the data files of every phase
    and the canonical config. A file lock on <cache>/adapters/<key>.lock makes exactly one process
    train while others wait and then reuse the result. Training writes into a temporary directory
    that is renamed into place, so a killed run leaves no half-written adapter. The log records
    "trained adapter" or "reused cached adapter" with the key.
    """
    from filelock import FileLock, Timeout

    model_path = resolve_model_path(model)
    config = load_training_config(config_path)
    pairs = resolve_phase_data(config, data_dir)
    key, key_document = adapter_cache_key(model_path, pairs, config, train_split)

    root = Path(cache_dir) if cache_dir is not None else paths.cache_dir()
    adapters = root / "adapters"
    adapters.mkdir(parents=True, exist_ok=True)
    final = adapters / key
    manifest_path = final / MANIFEST_FILE

    if manifest_path.is_file():
        logger.info("reused cached adapter %s at %s", key[:16], final)
        return CachedAdapter(final, key, False, json.loads(manifest_path.read_text()))

    lock = FileLock(str(adapters / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process to train adapter %s (lock %s)", key[:16], lock.lock_file)
        lock.acquire()
    try:
        if manifest_path.is_file():
            logger.info("reused cached adapter %s at %s (trained by another process)", key[:16], final)
            return CachedAdapter(final, key, False, json.loads(manifest_path.read_text()))
        if final.exists():
            logger.warning("removing incomplete adapter directory %s", final)
            shutil.rmtree(final)

        temporary = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=adapters))
        try:
            run = train_lora(model_path, data_dir, config, temporary, train_split=train_split)
            manifest = {
                "key": key,
                "model": str(model),
                "model_path": str(model_path),
                "config_path": str(config.source),
                **key_document,
                "training": run.to_json(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            os.replace(temporary, final)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    finally:
        lock.release()
    logger.info("trained adapter %s at %s", key[:16], final)
    return CachedAdapter(final, key, True, manifest)


def fuse_adapter(model_path: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fuse a LoRA adapter into the base weights and save an mlx-lm model directory, as `mlx_lm fuse` does."""
    from lem_fixtures.backend import import_mlx

    import_mlx()
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import load, save

    model, tokenizer, model_config = load(str(model_path), adapter_path=str(adapter_dir), return_config=True)
    fused = [(name, module.fuse(dequantize=False)) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    out_dir = Path(out_dir)
    save(out_dir, str(model_path), model, tokenizer, model_config, donate_model=False)
    logger.info("wrote fused model to %s", out_dir)
    return out_dir


def _condition_name(kernel: Any) -> str:
    return kernel if isinstance(kernel, str) else kernel.name


def _paired_row(effect: str, condition: str, comparison: str, pairs: list[tuple[float, float]], missing: int) -> dict[str, Any]:
    from lem_fixtures.statistics import paired_bootstrap_ci

    deltas = [after - before for before, after in pairs]
    row: dict[str, Any] = {"effect": effect, "condition": condition, "comparison": comparison, "n": len(deltas), "missing": missing}
    if not deltas:
        return row | {"before": None, "after": None, "delta": None, "ci_low": None, "ci_high": None}
    ci = paired_bootstrap_ci(deltas)
    return row | {
        "before": sum(before for before, _ in pairs) / len(pairs),
        "after": sum(after for _, after in pairs) / len(pairs),
        "delta": ci.mean,
        "ci_low": ci.low,
        "ci_high": ci.high,
    }


def training_effects(
    base_scores: Mapping[str, Mapping[str, float]],
    trained_scores: Mapping[str, Mapping[str, float]],
    kernels: Sequence[Any],
) -> list[dict[str, Any]]:
    """Compute the training table rows from per-probe scores {probe_id: {condition: lek_score}}.

    Rows: fine-tuning (trained baseline minus base baseline), then for each kernel (a name or a
    Kernel) the kernel on the trained model (trained + kernel minus trained baseline). Each row
    pairs the probes that have both scores and gives n, the number of probes missing either
    score, the two means, the mean delta and its paired bootstrap 95% CI
    (statistics.paired_bootstrap_ci with its default resamples and seed).
    """
    rows = []
    probe_ids = sorted(set(base_scores) | set(trained_scores))

    pairs, missing = [], 0
    for probe_id in probe_ids:
        before = base_scores.get(probe_id, {}).get(BASELINE)
        after = trained_scores.get(probe_id, {}).get(BASELINE)
        if before is None or after is None:
            missing += 1
        else:
            pairs.append((float(before), float(after)))
    rows.append(_paired_row("fine-tuning", BASELINE, "trained baseline - base baseline", pairs, missing))

    for kernel in kernels:
        name = _condition_name(kernel)
        pairs, missing = [], 0
        for probe_id in sorted(trained_scores):
            scores = trained_scores[probe_id]
            if scores.get(BASELINE) is None or scores.get(name) is None:
                missing += 1
            else:
                pairs.append((float(scores[BASELINE]), float(scores[name])))
        rows.append(_paired_row("kernel on trained", name, f"trained + {name} - trained baseline", pairs, missing))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lem train",
        description="Train a LoRA adapter on LEM training data with mlx-lm, the same way the pytest fixtures do.",
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="model registry name or mlx-lm model directory")
    parser.add_argument(
        "--data", default=None, metavar="DIR",
        help="directory with train.jsonl (and valid.jsonl, test.jsonl); replaces the data of a single-phase config "
        "(default: the data each phase of the config names)",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE", help=f"training config YAML (default: {DEFAULT_CONFIG})")
    parser.add_argument(
        "--adapter-path", default=None, metavar="DIR",
        help="write the adapter to this directory, training even if the cache has it (default: the adapter cache)",
    )
    parser.add_argument(
        "--train-split", default="train", choices=SPLITS,
        help="split to train on; 'valid' trains on valid.jsonl and validates on test.jsonl (default: train)",
    )
    parser.add_argument("--fuse", action="store_true", help="also write a model with the adapter fused into the weights")
    parser.add_argument("--fused-path", default=None, metavar="DIR", help="directory for the fused model (default: <adapter dir>/fused)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR", help="cache root (default: $LEM_CACHE_DIR, else $XDG_CACHE_HOME/lem, else ~/.cache/lem)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # mlx-lm prints training progress to stdout; send it to stderr so that stdout is only the adapter path.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            adapter_dir = _run_cli(args)
        except LemError as error:
            print(f"lem: error: {error}", file=sys.stderr)
            return 1
    print(adapter_dir)
    return 0


def _run_cli(args: argparse.Namespace) -> Path:
    if args.adapter_path is not None:
        model_path = resolve_model_path(args.model)
        config = load_training_config(args.config)
        adapter_dir = train_lora(model_path, args.data, config, args.adapter_path, train_split=args.train_split).adapter_dir
    else:
        cached = ensure_adapter(args.model, args.data, args.config, train_split=args.train_split, cache_dir=args.cache_dir)
        model_path = resolve_model_path(args.model)
        adapter_dir = cached.path
        status = "trained" if cached.trained else "reused from the cache"
        print(f"adapter {cached.key[:16]} {status}", file=sys.stderr)
    if args.fuse:
        fused_path = Path(args.fused_path) if args.fused_path else Path(adapter_dir) / "fused"
        fuse_adapter(model_path, adapter_dir, fused_path)
        print(f"fused model: {fused_path}", file=sys.stderr)
    return Path(adapter_dir)


if __name__ == "__main__":
    sys.exit(main())
