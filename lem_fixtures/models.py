"""The model registry (models.yaml), model resolution and loading through mlx-lm.

A model is named by a registry name ("gemma3-1b-it"), a local model directory, a GGUF file or a
Hugging Face repository id ("org/name"). Hub models are only read from the local Hugging Face
cache: this module never downloads.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lem_fixtures import convert
from lem_fixtures.errors import ModelError, ModelNotAvailableError

logger = logging.getLogger(__name__)

REGISTRY_PATH = Path(__file__).with_name("models.yaml")
DEFAULT_MODEL = "smollm2-135m-instruct"
PROBE_SETS = ("p20", "p100")
SCORERS = ("v1", "v2")
WEIGHTS_HASH_INDEX = ".lem-sha256.json"
# Files of a Hugging Face snapshot that mlx_lm.load reads (the patterns mlx-lm 0.32 downloads).
HUB_ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]
# Files whose content decides tokenization and prompt rendering, in hashing order.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "special_tokens_map.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- Registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishedRun:
    """One published A/B run of a model: its result file and, for v2 runs, the mean scores."""

    probe_set: str
    file: str
    probes: int
    scorer: str
    avg_lek: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry of models.yaml."""

    name: str
    family: str
    size: str
    trained: bool = False
    hub_id: str | None = None
    local_path: str | None = None
    embedded: bool = False
    package: str | None = None
    chat: bool = True
    published: dict[str, PublishedRun] = field(default_factory=dict, hash=False, compare=False)

    def published_v2(self, probe_set: str) -> dict[str, float]:
        """Return the published v2 `avg_lek` per condition for a probe set, or {} when there is none."""
        run = self.published.get(probe_set)
        if run is None or run.scorer != "v2":
            return {}
        return dict(run.avg_lek)


_SPEC_KEYS = {"name", "family", "size", "trained", "hub_id", "local_path", "embedded", "package", "chat", "published"}
_RUN_KEYS = {"file", "probes", "scorer", "avg_lek"}


def _registry_error(path: Path, where: str, message: str) -> ModelError:
    return ModelError(f"{path}: {where}: {message}; fix the registry file")


def _parse_run(path: Path, name: str, probe_set: str, raw: Any) -> PublishedRun:
    where = f"model {name!r}, published.{probe_set}"
    if probe_set not in PROBE_SETS:
        raise _registry_error(path, where, f"unknown probe set; expected one of {', '.join(PROBE_SETS)}")
    if not isinstance(raw, dict):
        raise _registry_error(path, where, "expected a mapping")
    unknown = set(raw) - _RUN_KEYS
    if unknown:
        raise _registry_error(path, where, f"unknown keys {sorted(unknown)}")
    scorer = raw.get("scorer")
    if scorer not in SCORERS:
        raise _registry_error(path, where, f"scorer {scorer!r} is invalid; expected one of {', '.join(SCORERS)}")
    avg_lek = raw.get("avg_lek") or {}
    if scorer == "v1" and avg_lek:
        raise _registry_error(path, where, "v1 runs must not list avg_lek, since v1 scores are not comparable")
    if not all(isinstance(value, (int, float)) for value in avg_lek.values()):
        raise _registry_error(path, where, "avg_lek values must be numbers")
    return PublishedRun(
        probe_set=probe_set,
        file=str(raw.get("file", "")),
        probes=int(raw.get("probes", 0)),
        scorer=scorer,
        avg_lek={str(key): float(value) for key, value in avg_lek.items()},
    )


def _parse_spec(path: Path, index: int, raw: Any) -> ModelSpec:
    if not isinstance(raw, dict) or "name" not in raw:
        raise _registry_error(path, f"models[{index}]", "expected a mapping with a 'name'")
    name = str(raw["name"])
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise _registry_error(path, f"model {name!r}", f"unknown keys {sorted(unknown)}")
    for key in ("family", "size"):
        if key not in raw:
            raise _registry_error(path, f"model {name!r}", f"missing key {key!r}")
    embedded = bool(raw.get("embedded", False))
    if embedded and name not in convert.EMBEDDED_MODELS:
        raise _registry_error(
            path, f"model {name!r}", f"embedded, but no embedded GGUF has this name ({', '.join(convert.EMBEDDED_MODELS)})"
        )
    published = {
        probe_set: _parse_run(path, name, probe_set, run) for probe_set, run in (raw.get("published") or {}).items()
    }
    return ModelSpec(
        name=name,
        family=str(raw["family"]),
        size=str(raw["size"]),
        trained=bool(raw.get("trained", False)),
        hub_id=raw.get("hub_id"),
        local_path=raw.get("local_path"),
        embedded=embedded,
        package=raw.get("package"),
        chat=bool(raw.get("chat", True)),
        published=published,
    )


def load_registry(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """Read a model registry file (default: the package's models.yaml) into {name: ModelSpec}."""
    return dict(_load_registry_cached(Path(path) if path is not None else REGISTRY_PATH))


@functools.lru_cache(maxsize=4)
def _load_registry_cached(path: Path) -> dict[str, ModelSpec]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ModelError(f"cannot read the model registry {path}: {error}") from error
    except yaml.YAMLError as error:
        raise ModelError(f"{path}: invalid YAML ({error}); fix the registry file") from error
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise _registry_error(path, "top level", "expected a mapping with a 'models' list")

    registry: dict[str, ModelSpec] = {}
    for index, raw in enumerate(data["models"]):
        spec = _parse_spec(path, index, raw)
        if spec.name in registry:
            raise _registry_error(path, f"models[{index}]", f"duplicate name {spec.name!r}")
        registry[spec.name] = spec
    return registry


def get_model_spec(name: str) -> ModelSpec | None:
    """Return the registry entry named `name`, or None."""
    return load_registry().get(name)


# --- Resolution ------------------------------------------------------------------------------


def download_command(hub_id: str) -> str:
    """Return the shell command that puts a Hub model into the local Hugging Face cache."""
    return f"hf download {hub_id}"


def _not_available(hub_id: str, reason: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"model {hub_id} is {reason} and this suite never downloads; fetch it with "
        f"`{download_command(hub_id)}` (huggingface_hub older than 1.0: `huggingface-cli download {hub_id}`), "
        f"or pass a local model directory"
    )


def hub_snapshot(hub_id: str) -> Path:
    """Return the cached snapshot directory of a Hub repository, reading only the local cache.

    Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE. Raises ModelNotAvailableError, with the
    download command, when the snapshot is missing or incomplete.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(hub_id, local_files_only=True, allow_patterns=HUB_ALLOW_PATTERNS)
    except IncompleteSnapshotError:
        raise _not_available(hub_id, "only partly in the local Hugging Face cache") from None
    except LocalEntryNotFoundError:
        raise _not_available(hub_id, "not in the local Hugging Face cache") from None
    path = Path(snapshot)
    _check_model_dir(path, f"the cached snapshot of {hub_id}")
    return path


def _check_model_dir(path: Path, description: str) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{description} ({path}) has no config.json, so it is not an mlx-lm model directory; "
            f"pass a directory that contains config.json, *.safetensors and the tokenizer files"
        )


def _unknown_model(name: str) -> ModelError:
    registry = load_registry()
    candidates = list(registry) + [spec.hub_id for spec in registry.values() if spec.hub_id]
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    hint = f"did you mean: {', '.join(matches)}? " if matches else ""
    return ModelError(
        f"unknown model {name!r}: not a registry name, an existing path or a Hugging Face id (org/name); "
        f"{hint}run `lem info` for the registry's {len(registry)} names"
    )


def resolve_model(name_or_path: str | Path) -> Path:
    """Return the model directory for a registry name, local directory, GGUF file or Hub id.

    Embedded models and GGUF files are converted into the LEM cache on first use. Hub ids, and
    registry entries with a hub_id, come from the local Hugging Face cache only.
    Raises ModelNotAvailableError when a Hub model is not cached, and ModelError otherwise.
    """
    name = str(name_or_path)
    spec = load_registry().get(name)
    if spec is not None:
        return _resolve_spec(spec)

    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_dir(path, "the model directory")
        return path
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return convert.convert_gguf(path)
        raise ModelError(f"{path} is a file, not a model directory or a .gguf file; pass a model directory")
    if HUB_ID_PATTERN.match(name):
        return hub_snapshot(name)
    if "/" in name or name.startswith((".", "~")):
        raise ModelError(f"model directory not found: {name}; check the path")
    raise _unknown_model(name)


def _resolve_spec(spec: ModelSpec) -> Path:
    if spec.embedded:
        return convert.embedded_model_dir(spec.name)
    if spec.hub_id is not None:
        return hub_snapshot(spec.hub_id)
    where = f" (the published run loaded {spec.local_path})" if spec.local_path else ""
    raise ModelNotAvailableError(
        f"model {spec.name!r} has no known Hugging Face id{where}; pass the path of a local copy instead of its name"
    )


# --- Hashes ----------------------------------------------------------------------------------


def weights_sha256(model_dir: Path) -> str:
    """Return the SHA-256 of a model's weights.

    For a single model*.safetensors file it is that file's digest (as `sha256sum` prints it);
    for several, the digest of their "name digest" lines in name order. Digests are cached in
    .lem-sha256.json in the model directory, keyed by file size and modification time.
    """
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir} has no model*.safetensors file; reconvert or re-download the model")
    index = model_dir / WEIGHTS_HASH_INDEX
    digests = [(file.name, convert.file_sha256(file, index)) for file in files]
    if len(digests) == 1:
        return digests[0][1]
    return _hash_lines(f"{name} {digest}" for name, digest in digests)


def _hash_lines(lines) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode("utf-8")).hexdigest()


def _hash_named_files(directory: Path, names: tuple[str, ...]) -> str | None:
    """Return the digest of the "name digest" lines of those files in `names` that exist, or None."""
    present = [directory / name for name in names if (directory / name).is_file()]
    if not present:
        return None
    return _hash_lines(f"{path.name} {convert.file_sha256(path)}" for path in present)


def tokenizer_sha256(model_dir: Path) -> str:
    """Return the digest of the tokenizer files (tokenizer.json, tokenizer_config.json with the chat template, ...)."""
    digest = _hash_named_files(model_dir, TOKENIZER_FILES)
    if digest is None:
        raise ModelError(f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); re-download the model")
    return digest


def check_safetensors(path: Path) -> None:
    """Check a safetensors file's header and size; raise ModelError naming the file when it is corrupt."""
    size = path.stat().st_size

    def corrupt(detail: str) -> ModelError:
        return ModelError(
            f"{path}: corrupt or truncated safetensors file ({detail}); reconvert the model "
            f"(delete its directory from the LEM cache) or re-download it"
        )

    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise corrupt(f"header length {header_length} exceeds the file size {size}")
        try:
            header = json.loads(file.read(header_length))
        except (UnicodeDecodeError, ValueError) as error:
            raise corrupt(f"invalid JSON header: {error}") from error
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_size = size - 8 - header_length
    for tensor_name, entry in header.items():
        if tensor_name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2) or offsets[1] > data_size:
            raise corrupt(f"tensor {tensor_name!r} lies outside the {data_size} data bytes")


# --- Loading ---------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model and tokenizer loaded with mlx_lm.load, with digests that identify what was loaded.

    `tokenizer` is mlx-lm's TokenizerWrapper. `config` is the parsed config.json. `spec` is the
    registry entry when the model was named by one.
    """

    name: str
    path: Path
    model: Any
    tokenizer: Any
    weights_sha256: str
    tokenizer_sha256: str
    adapter_sha256: str | None
    config: dict[str, Any]
    spec: ModelSpec | None = None
    adapter_path: Path | None = None
    load_seconds: float = 0.0

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template: the registry's choice, else whether there is one."""
        if self.spec is not None:
            return self.spec.chat
        return bool(getattr(self.tokenizer, "chat_template", None))


def _check_adapter(adapter_path: Path) -> str:
    if not adapter_path.is_dir():
        raise ModelError(f"adapter directory not found: {adapter_path}; pass the directory that `mlx_lm lora` wrote")
    missing = [name for name in ADAPTER_FILES if not (adapter_path / name).is_file()]
    if missing:
        raise ModelError(
            f"adapter directory {adapter_path} has no {', '.join(missing)}; pass the directory that `mlx_lm lora` wrote"
        )
    check_safetensors(adapter_path / "adapters.safetensors")
    return _hash_named_files(adapter_path, ADAPTER_FILES) or ""


def load_model(name_or_path: str | Path, adapter_path: str | Path | None = None) -> LoadedModel:
    """Resolve a model (see `resolve_model`), load it with mlx_lm.load and return it with its digests.

    `adapter_path` is a LoRA adapter directory (adapter_config.json and adapters.safetensors).
    Raises ModelError for a corrupt weight or adapter file, naming the file.
    """
    from lem_fixtures.backend import import_mlx

    import_mlx()
    name = str(name_or_path)
    spec = load_registry().get(name)
    path = resolve_model(name_or_path)
    started = time.perf_counter()

    weight_files = sorted(path.glob("model*.safetensors"))
    if not weight_files:
        raise ModelError(f"{path} has no model*.safetensors file; reconvert or re-download the model")
    for weight_file in weight_files:
        check_safetensors(weight_file)
    adapter_dir = Path(adapter_path).expanduser() if adapter_path is not None else None
    adapter_digest = _check_adapter(adapter_dir) if adapter_dir is not None else None

    from mlx_lm import load

    try:
        model, tokenizer, config = load(
            str(path), adapter_path=str(adapter_dir) if adapter_dir else None, return_config=True
        )
    except (RuntimeError, ValueError, OSError) as error:
        raise ModelError(f"failed to load the model in {path} with mlx_lm.load: {error}") from error

    loaded = LoadedModel(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        weights_sha256=weights_sha256(path),
        tokenizer_sha256=tokenizer_sha256(path),
        adapter_sha256=adapter_digest,
        config=config,
        spec=spec,
        adapter_path=adapter_dir,
        load_seconds=time.perf_counter() - started,
    )
    logger.info("loaded %s from %s in %.1f s", name, path, loaded.load_seconds)
    return loaded
