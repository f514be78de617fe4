"""Tests of lem_fixtures.models: the registry, model resolution (local, GGUF, Hub cache) and loading."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lem_fixtures import backend, convert, models
from lem_fixtures.errors import BackendError, ModelError, ModelNotAvailableError

pytestmark = pytest.mark.xdist_group("embedded-models")

KEBAB_NAME = re.compile(r"^[a-z0-9][a-z0-9.]*(-[a-z0-9.]+)*$")


def mlx_core():
    """Return mlx.core through backend.import_mlx, which preloads OpenBLAS first; skip without mlx."""
    try:
        return backend.import_mlx()
    except BackendError as error:
        pytest.skip(str(error))


# --- Registry --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry() -> dict[str, models.ModelSpec]:
    return models.load_registry()


def test_registry_lists_paper_and_embedded_models(registry):
    paper = [spec for spec in registry.values() if not spec.embedded]
    embedded = sorted(name for name, spec in registry.items() if spec.embedded)

    assert len(paper) == 29
    assert sum(spec.trained for spec in paper) == 9
    assert embedded == ["gemma3-270m", "smollm2-135m-instruct"]
    assert models.DEFAULT_MODEL in registry


def test_registry_names_are_kebab_case(registry):
    for name in registry:
        assert KEBAB_NAME.match(name), name


def test_registry_hub_ids_are_unique(registry):
    hub_ids = [spec.hub_id for spec in registry.values() if spec.hub_id]

    assert len(hub_ids) == len(set(hub_ids))


def test_registry_headline_figures(registry):
    lek_1b = registry["lek-gemma3-1b-layered"]

    assert lek_1b.trained is True
    assert lek_1b.hub_id == "lthn/LEK-Gemma3-1B-layered"
    assert lek_1b.published_v2("p100") == {"baseline": 21.74, "json": 21.46, "txt": 18.50}
    assert registry["gemma3-4b-it"].published_v2("p100")["baseline"] == 21.12
    assert registry["gemma3-12b-it"].published_v2("p100")["baseline"] == 20.47
    assert registry["gemma3-27b-it"].published_v2("p100")["baseline"] == 20.16


def test_registry_v1_runs_have_no_scores(registry):
    runs = [run for spec in registry.values() for run in spec.published.values()]

    assert sum(run.scorer == "v2" for run in runs) == 12
    assert sum(run.scorer == "v1" for run in runs) == 23
    for run in runs:
        assert bool(run.avg_lek) == (run.scorer == "v2"), run.file
        assert run.scorer == "v1" or "baseline" in run.avg_lek, run.file


def test_embedded_gemma_prompts_as_plain_text(registry):
    assert registry["gemma3-270m"].chat is False
    assert registry["smollm2-135m-instruct"].chat is True


def is_v2_summary(summary: dict) -> bool:
    """v1 stored whole-number probe scores, so its category averages are multiples of 1/2 or 1/3."""
    averages = [value for category in summary["categories"].values() for value in category.values()]
    return any(abs(value * 6 - round(value * 6)) > 0.021 for value in averages)


def test_registry_matches_published_summaries(registry, lem_reference):
    lines = (lem_reference / "benchmarks" / "summaries.jsonl").read_text(encoding="utf-8").splitlines()
    summaries = {summary["_file"]: summary for summary in map(json.loads, lines)}
    runs = {run.file: (spec, run) for spec in registry.values() for run in spec.published.values()}

    assert set(runs) == set(summaries)
    for file, summary in summaries.items():
        spec, run = runs[file]
        assert run.probes == summary["total_probes"], file
        assert run.scorer == ("v2" if is_v2_summary(summary) else "v1"), file
        assert summary["model"] in (spec.hub_id, spec.local_path), file
        if run.scorer == "v2":
            published = {condition["name"]: condition["avg_lek"] for condition in summary["conditions"]}
            assert run.avg_lek == published, file


def write_registry(path: Path, entry: str) -> Path:
    path.write_text(f"default: x\nmodels:\n{entry}", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("  - {name: a, family: f, size: 1B, colour: red}\n", "unknown keys ['colour']"),
        ("  - {name: a, size: 1B}\n", "missing key 'family'"),
        ("  - {name: a, family: f, size: 1B}\n  - {name: a, family: f, size: 2B}\n", "duplicate name 'a'"),
        (
            "  - {name: a, family: f, size: 1B, published: {p20: {file: x, probes: 20, scorer: v1, avg_lek: {baseline: 8}}}}\n",
            "v1 runs must not list avg_lek",
        ),
        ("  - {name: a, family: f, size: 1B, published: {p50: {file: x, probes: 50, scorer: v2}}}\n", "unknown probe set"),
        ("  - {name: a, family: f, size: 1B, embedded: true}\n", "no embedded GGUF has this name"),
    ],
)
def test_invalid_registry_raises_model_error(tmp_path, entry, message):
    path = write_registry(tmp_path / f"registry-{abs(hash(entry))}.yaml", entry)

    with pytest.raises(ModelError) as raised:
        models.load_registry(path)

    assert str(path) in str(raised.value)
    assert message in str(raised.value)


# --- Resolution ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return convert.embedded_model_dir("smollm2-135m-instruct")


def test_resolve_embedded_name(smollm_dir):
    assert models.resolve_model("smollm2-135m-instruct") == smollm_dir


def test_resolve_local_directory(smollm_dir):
    assert models.resolve_model(str(smollm_dir)) == smollm_dir


def test_resolve_gguf_file_converts(smollm_dir):
    gguf_path = convert.embedded_gguf_path("smollm2-135m-instruct")

    assert models.resolve_model(gguf_path) == smollm_dir


def test_resolve_directory_without_config_raises(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve_model(tmp_path)


def test_resolve_missing_path_raises(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        models.resolve_model(tmp_path / "absent")


def test_resolve_unknown_name_suggests_matches():
    with pytest.raises(ModelError) as raised:
        models.resolve_model("gemma3-1b")

    message = str(raised.value)
    assert "unknown model 'gemma3-1b'" in message
    assert "did you mean: gemma3-1b-it" in message
    assert not isinstance(raised.value, ModelNotAvailableError)


def test_resolve_entry_without_hub_id_names_local_path():
    with pytest.raises(ModelNotAvailableError) as raised:
        models.resolve_model("gpt-oss-20b")

    assert "/Volumes/Data/lem/models/gpt-oss-20b-mlx" in str(raised.value)


RESOLVE_IN_CHILD = """
import json, sys
from lem_fixtures import models
from lem_fixtures.errors import ModelError
try:
    print(json.dumps({"path": str(models.resolve_model(sys.argv[1]))}))
except ModelError as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


def resolve_in_hf_home(hf_home: Path, name: str) -> dict:
    """Resolve a model in a fresh interpreter whose Hugging Face cache is `hf_home` (offline)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    completed = subprocess.run(
        [sys.executable, "-c", RESOLVE_IN_CHILD, name], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def make_hub_snapshot(hf_home: Path, repo_id: str, revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay out a cached Hub model as huggingface_hub does: refs/main names the snapshot revision."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return snapshot


def test_resolve_hub_id_from_offline_cache(tmp_path):
    snapshot = make_hub_snapshot(tmp_path, "test-org/tiny-model")

    result = resolve_in_hf_home(tmp_path, "test-org/tiny-model")

    assert result == {"path": str(snapshot)}


def test_resolve_registry_name_from_offline_cache(tmp_path):
    snapshot = make_hub_snapshot(tmp_path, "mlx-community/Qwen3-8B-4bit")

    result = resolve_in_hf_home(tmp_path, "qwen3-8b")

    assert result == {"path": str(snapshot)}


def test_resolve_uncached_hub_id_gives_download_command(tmp_path):
    result = resolve_in_hf_home(tmp_path, "test-org/absent-model")

    assert result["error"] == "ModelNotAvailableError"
    assert "hf download test-org/absent-model" in result["message"]
    assert "huggingface-cli download test-org/absent-model" in result["message"]


def test_resolve_uncached_registry_name_gives_download_command(tmp_path):
    result = resolve_in_hf_home(tmp_path, "lek-gemma3-1b-layered")

    assert result["error"] == "ModelNotAvailableError"
    assert "hf download lthn/LEK-Gemma3-1B-layered" in result["message"]


def test_resolve_hub_snapshot_without_config_raises(tmp_path):
    snapshot = make_hub_snapshot(tmp_path, "test-org/broken-model")
    (snapshot / "config.json").unlink()
    (snapshot / "README.md").write_text("no config")

    result = resolve_in_hf_home(tmp_path, "test-org/broken-model")

    assert result["error"] == "ModelError"
    assert "has no config.json" in result["message"]


# --- Loading ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_loaded():
    return models.load_model("smollm2-135m-instruct")


def test_load_model_fields(smollm_loaded, smollm_dir):
    weights_digest = hashlib.sha256((smollm_dir / "model.safetensors").read_bytes()).hexdigest()

    assert smollm_loaded.name == "smollm2-135m-instruct"
    assert smollm_loaded.path == smollm_dir
    assert smollm_loaded.weights_sha256 == weights_digest
    assert re.fullmatch(r"[0-9a-f]{64}", smollm_loaded.tokenizer_sha256)
    assert smollm_loaded.adapter_sha256 is None
    assert smollm_loaded.config["model_type"] == "llama"
    assert smollm_loaded.spec == models.get_model_spec("smollm2-135m-instruct")
    assert smollm_loaded.chat is True
    assert 2 in smollm_loaded.tokenizer.eos_token_ids


def test_weights_digest_cached_by_size_and_mtime(smollm_loaded, smollm_dir, monkeypatch):
    def fail_if_called(path):
        raise AssertionError(f"rehashed {path}")

    monkeypatch.setattr(convert, "_hash_file", fail_if_called)

    assert models.weights_sha256(smollm_dir) == smollm_loaded.weights_sha256
    assert (smollm_dir / models.WEIGHTS_HASH_INDEX).is_file()


def copy_model_dir(source: Path, target: Path, weights: bytes | None = None) -> Path:
    """Copy a model directory; the weights are linked unless replacement bytes are given."""
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(source / name, target / name)
    if weights is None:
        (target / "model.safetensors").symlink_to(source / "model.safetensors")
    else:
        (target / "model.safetensors").write_bytes(weights)
    return target


def test_tokenizer_digest_covers_chat_template(smollm_dir, smollm_loaded, tmp_path):
    copy = copy_model_dir(smollm_dir, tmp_path / "copy")
    same = models.tokenizer_sha256(copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] += "{# changed #}"
    config_path.write_text(json.dumps(config))

    changed = models.tokenizer_sha256(copy)

    assert same == smollm_loaded.tokenizer_sha256
    assert changed != same


def truncated_safetensors(source: Path) -> dict[str, bytes]:
    with source.open("rb") as file:
        head = file.read(1_000_000)
    return {
        "truncated": head,
        "too-short": head[:5],
        "header-length-too-large": (10**12).to_bytes(8, "little") + head[8:100],
        "invalid-json-header": head[:8] + b"x" * 100 + head[108:200_000],
    }


@pytest.mark.parametrize("variant", ["truncated", "too-short", "header-length-too-large", "invalid-json-header"])
def test_corrupt_safetensors_raises_model_error(smollm_dir, tmp_path, variant):
    weights = truncated_safetensors(smollm_dir / "model.safetensors")[variant]
    broken = copy_model_dir(smollm_dir, tmp_path / variant, weights=weights)

    with pytest.raises(ModelError) as raised:
        models.load_model(broken)

    message = str(raised.value)
    assert str(broken / "model.safetensors") in message
    assert "corrupt or truncated safetensors" in message


def test_missing_adapter_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="adapter directory not found"):
        models.load_model("smollm2-135m-instruct", adapter_path=tmp_path / "absent")


def write_lora_adapter(directory: Path, config: dict, lora_b_value: float) -> Path:
    """Write a rank-4 LoRA adapter on the last layer's q_proj, as `mlx_lm lora` lays it out."""
    mx = mlx_core()
    directory.mkdir()
    layer = config["num_hidden_layers"] - 1
    hidden = config["hidden_size"]
    rng = np.random.default_rng(0)
    prefix = f"model.layers.{layer}.self_attn.q_proj"
    weights = {
        f"{prefix}.lora_a": mx.array(rng.standard_normal((hidden, 4)).astype(np.float32) * 0.05),
        f"{prefix}.lora_b": mx.full((4, hidden), lora_b_value, dtype=mx.float32),
    }
    mx.save_safetensors(str(directory / "adapters.safetensors"), weights)
    adapter_config = {
        "fine_tune_type": "lora",
        "num_layers": 1,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
    }
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return directory


def last_logits(loaded, text: str):
    mx = mlx_core()
    tokens = mx.array([loaded.tokenizer.encode(text)])
    return np.array(loaded.model(tokens)[0, -1])


def test_load_model_with_adapter(smollm_loaded, tmp_path):
    zero = write_lora_adapter(tmp_path / "zero", smollm_loaded.config, lora_b_value=0.0)
    nonzero = write_lora_adapter(tmp_path / "nonzero", smollm_loaded.config, lora_b_value=0.05)
    text = "The capital of France is"

    with_zero = models.load_model("smollm2-135m-instruct", adapter_path=zero)
    zero_logits = last_logits(with_zero, text)
    del with_zero
    with_nonzero = models.load_model("smollm2-135m-instruct", adapter_path=nonzero)

    base_logits = last_logits(smollm_loaded, text)
    np.testing.assert_allclose(zero_logits, base_logits, rtol=0, atol=1e-4)
    assert np.abs(last_logits(with_nonzero, text) - base_logits).max() > 1e-2
    assert with_nonzero.adapter_path == nonzero
    assert re.fullmatch(r"[0-9a-f]{64}", with_nonzero.adapter_sha256)
    assert with_nonzero.adapter_sha256 != models._check_adapter(zero)
    assert with_nonzero.weights_sha256 == smollm_loaded.weights_sha256
