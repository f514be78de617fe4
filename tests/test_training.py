"""LoRA training: config and data validation, training on tiny models and SmolLM2, the adapter cache, `lem train`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lem_fixtures.backend import import_mlx
from lem_fixtures.errors import BackendError, LemError, TrainingDataError
from lem_fixtures.training import (
    DEFAULT_CONFIG,
    Phase,
    TrainingConfigError,
    adapter_cache_key,
    ensure_adapter,
    load_training_config,
    main,
    resolve_phase_data,
    train_lora,
    training_effects,
)
from lem_fixtures.training_data import validate_training_data

from tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
SMOKE_CONFIG = REPO / "training" / "smoke.yaml"
PROJECT_DATA = REPO / "training" / "data"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat(user: str, assistant: str, system: str | None = None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"messages": messages})


def problem_lines(error: TrainingDataError, filename: str) -> list[int]:
    return sorted(problem.line for problem in error.problems if problem.path.name == filename and problem.line is not None)


# ---------------------------------------------------------------------------------------------
# Config


def test_lora_yaml_has_paper_defaults():
    config = load_training_config(DEFAULT_CONFIG)

    assert config.iters == 200
    assert config.batch_size == 2
    assert config.learning_rate == 1e-5
    assert config.mask_prompt is True
    assert config.max_seq_length == 2048
    assert (config.rank, config.scale, config.dropout) == (8, 20.0, 0.0)
    assert config.num_layers == 16
    assert config.seed == 0
    assert config.phases == (Phase("lek", REPO / "training" / "data"),)


def test_smoke_yaml_is_small():
    config = load_training_config(SMOKE_CONFIG)

    assert config.iters == 10
    assert config.num_layers == 4
    assert config.batch_size == 2
    assert config.learning_rate == 1e-4
    assert config.phases[0].data == PROJECT_DATA


BASE_CONFIG = """\
iters: 10
batch_size: 2
learning_rate: 1.0e-4
mask_prompt: true
max_seq_length: 512
seed: 0
num_layers: 4
lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}
"""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("itres: 10\n", "unknown key 'itres' in the config"),
        ("lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0, alpha: 16}\n", "unknown key 'alpha' in lora_parameters"),
        ("phases: [{name: a, data: d, lr: 1}]\n", "unknown key 'lr' in phases[0]"),
        ("iters: ten\n", "key 'iters' must be a positive integer, got str 'ten'"),
        ("batch_size: true\n", "key 'batch_size' must be a positive integer, got bool True"),
        ("iters: 0\n", "key 'iters' must be a positive integer"),
        ("learning_rate: -1.0\n", "key 'learning_rate' must be a positive number"),
        ("mask_prompt: yes please\n", "key 'mask_prompt' must be true or false"),
        ("num_layers: -2\n", "key 'num_layers' must be a positive integer, or -1 for all layers"),
        ("lora_parameters: {rank: 8, scale: 20.0, dropout: 1.5}\n", "key 'lora_parameters.dropout' must be a number in [0, 1)"),
        ("lora_parameters: {rank: 8, scale: 20.0}\n", "missing key 'dropout' in lora_parameters"),
        ("phases: lek\n", "key 'phases' must be a list"),
        ("phases: []\n", "'phases' is empty"),
        ("phases: [{data: d}]\n", "missing key 'name' in phases[0]"),
        ("phases: [{name: a, data: d}, {name: a, data: e}]\n", "phases[1].name 'a' is used twice"),
        ("phases: [{name: a, iters: many}]\n", "key 'phases[0].iters' must be a positive integer"),
    ],
)
def test_config_rejects_bad_key_or_value(tmp_path, change, expected):
    key = change.split(":")[0]
    lines = [line for line in BASE_CONFIG.splitlines(keepends=True) if not line.startswith(key + ":")]
    path = tmp_path / "bad.yaml"
    path.write_text("".join(lines) + change)

    with pytest.raises(TrainingConfigError) as caught:
        load_training_config(path)

    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


def test_config_rejects_missing_key(tmp_path):
    path = tmp_path / "short.yaml"
    path.write_text(BASE_CONFIG.replace("seed: 0\n", ""))

    with pytest.raises(TrainingConfigError, match=r"missing key 'seed' in the config"):
        load_training_config(path)


def test_config_rejects_invalid_yaml_and_missing_file(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("iters: [1, 2\n")

    with pytest.raises(TrainingConfigError, match="invalid YAML"):
        load_training_config(broken)
    with pytest.raises(TrainingConfigError, match="not found"):
        load_training_config(tmp_path / "absent.yaml")
    assert issubclass(TrainingConfigError, LemError)


def test_config_reads_exponent_without_dot(tmp_path):
    path = tmp_path / "exponent.yaml"
    path.write_text(BASE_CONFIG.replace("learning_rate: 1.0e-4", "learning_rate: 1e-5"))

    assert load_training_config(path).learning_rate == 1e-5


def test_phase_data_resolution(tmp_path):
    path = tmp_path / "phases.yaml"
    path.write_text(BASE_CONFIG + "phases: [{name: one, data: first}, {name: two, data: second, iters: 3}]\n")
    config = load_training_config(path)

    pairs = resolve_phase_data(config, None)

    assert [(phase.name, directory) for phase, directory in pairs] == [("one", tmp_path / "first"), ("two", tmp_path / "second")]
    assert config.canonical()["phases"] == [{"name": "one", "iters": 10}, {"name": "two", "iters": 3}]
    with pytest.raises(TrainingConfigError, match="every phase names its own data, so the data directory .* would not be used"):
        resolve_phase_data(config, tmp_path / "other")

    open_phase = tmp_path / "open.yaml"
    open_phase.write_text(BASE_CONFIG + "phases: [{name: one, data: first}, {name: two}]\n")
    pairs = resolve_phase_data(load_training_config(open_phase), tmp_path / "other")
    assert [(phase.name, directory) for phase, directory in pairs] == [("one", tmp_path / "first"), ("two", tmp_path / "other")]

    single = load_training_config(SMOKE_CONFIG)
    assert resolve_phase_data(single, tmp_path / "other")[0][1] == tmp_path / "other"


# ---------------------------------------------------------------------------------------------
# Data validation without a tokenizer


def test_project_data_validates():
    data = validate_training_data(PROJECT_DATA, batch_size=2)

    assert len(data.train.examples) == 24
    assert len(data.valid.examples) == 6
    for split in (data.train, data.valid):
        for example in split.examples:
            words = len(example["messages"][-1]["content"].split())
            assert 60 <= words <= 150


def test_structure_problems_list_every_line(tmp_path):
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            chat("q1", "a1"),                                                                   # 1 ok
            '{"messages": [{"role": "user", "content": "q"}',                                  # 2 invalid JSON
            json.dumps({"text": "plain"}),                                                      # 3 missing messages
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}),  # 4 user twice
            chat("q5", "a5", system="be kind"),                                                 # 5 ok: system first
            "",                                                                                 # 6 blank
            json.dumps([1, 2]),                                                                 # 7 not an object
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),        # 8 no assistant turn
            json.dumps({"messages": [{"role": "assistant", "content": "a"}]}),                 # 9 starts with assistant
            json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),  # 10 empty
            json.dumps({"messages": "hello"}),                                                  # 11 not a list
        ],
    )

    with pytest.raises(TrainingDataError) as caught:
        validate_training_data(tmp_path)

    error = caught.value
    assert problem_lines(error, "train.jsonl") == [2, 3, 4, 6, 7, 8, 9, 10, 11]
    message = str(error)
    assert "9 problem(s)" in message
    assert f"{tmp_path / 'train.jsonl'}:2: invalid JSON" in message
    assert 'train.jsonl:3: missing "messages" (keys: text)' in message
    assert "train.jsonl:4: message 1 has role 'user' where 'assistant' is expected" in message
    assert "train.jsonl:6: blank line" in message
    assert "train.jsonl:8: the last message is not from the assistant" in message
    assert "train.jsonl:9: message 0 has role 'assistant' where 'user' is expected" in message
    assert "train.jsonl:10: message 1 (assistant) has empty content" in message


def test_problem_list_is_capped(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ["not json"] * 30)

    with pytest.raises(TrainingDataError) as caught:
        validate_training_data(tmp_path, max_problems=5)

    message = str(caught.value)
    assert "30 problem(s)" in message
    assert "train.jsonl:5: invalid JSON" in message
    assert "train.jsonl:6:" not in message
    assert "... and 25 more" in message


def test_fewer_examples_than_batch_size(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("q", "a")])
    write_jsonl(tmp_path / "valid.jsonl", [chat("q", "a"), chat("q", "a")])

    with pytest.raises(TrainingDataError) as caught:
        validate_training_data(tmp_path, batch_size=2)

    message = str(caught.value)
    assert "the train split has 1 valid example(s), fewer than batch_size 2" in message
    assert "validation split" not in message


def test_missing_train_split_suggests_valid(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [chat("q", "a")])

    with pytest.raises(TrainingDataError, match="lem train --train-split valid`, or --lem-training-split=valid under pytest"):
        validate_training_data(tmp_path)
    data = validate_training_data(tmp_path, train_split="valid")
    assert data.valid_split is None
    with pytest.raises(TrainingDataError, match="test.jsonl not found; the directory has valid.jsonl, so choose one of those"):
        validate_training_data(tmp_path, train_split="test")


def test_reference_training_dir_validates(lem_reference):
    directory = lem_reference / "training"
    if not (directory / "valid.jsonl").is_file():
        pytest.skip(f"{directory} has no valid.jsonl")

    with pytest.raises(TrainingDataError, match="--train-split valid"):
        validate_training_data(directory)
    data = validate_training_data(directory, train_split="valid", batch_size=2)

    assert len(data.train.examples) == 229
    assert data.train.lines == list(range(1, 230))
    assert data.valid_split == "test"
    assert len(data.valid.examples) == 231


def test_data_hash_follows_contents_and_roles(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat("q", "a"), chat("q2", "a2")])
    write_jsonl(tmp_path / "valid.jsonl", [chat("v", "w"), chat("v2", "w2")])
    before = validate_training_data(tmp_path).sha256()

    assert validate_training_data(tmp_path).sha256() == before
    assert validate_training_data(tmp_path, train_split="valid").sha256() != before
    write_jsonl(tmp_path / "train.jsonl", [chat("q", "a"), chat("q2", "changed")])
    assert validate_training_data(tmp_path).sha256() != before


# ---------------------------------------------------------------------------------------------
# Data validation with a model's tokenizer


def require_mlx() -> None:
    """Skip unless mlx works; OpenBLAS is preloaded first, because importing mlx_lm imports mlx."""
    try:
        import_mlx()
    except BackendError as error:
        pytest.skip(str(error))
    pytest.importorskip("mlx_lm")


def load_tokenizer(model_dir: Path):
    require_mlx()
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    return mlx_load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    require_mlx()
    root = tmp_path_factory.mktemp("tiny")
    return {
        "chatml": build_tiny_model(root / "chatml", num_layers=4).path,
        "no-system": build_tiny_model(root / "no-system", chat_template="no-system").path,
        "none": build_tiny_model(root / "none", chat_template="none").path,
    }


def test_template_rejecting_a_role_names_the_line(tmp_path, tiny_dirs):
    write_jsonl(
        tmp_path / "train.jsonl",
        [chat("hello", "world"), chat("hello", "world", system="be kind"), chat("why", "kind")],
    )

    with pytest.raises(TrainingDataError) as caught:
        validate_training_data(tmp_path, load_tokenizer(tiny_dirs["no-system"]))

    assert problem_lines(caught.value, "train.jsonl") == [2]
    assert "train.jsonl:2: the model's chat template rejects the example (roles: system, user, assistant)" in str(caught.value)
    assert "System role not supported" in str(caught.value)


def test_model_without_chat_template(tmp_path, tiny_dirs):
    write_jsonl(tmp_path / "train.jsonl", [chat("hello", "world")])

    with pytest.raises(TrainingDataError, match="has no chat template"):
        validate_training_data(tmp_path, load_tokenizer(tiny_dirs["none"]))


def test_prompt_filling_max_length_is_rejected(tmp_path, tiny_dirs):
    long_prompt = " ".join(["hello"] * 40)
    write_jsonl(
        tmp_path / "train.jsonl",
        [chat("hello", "world"), chat(long_prompt, "world"), chat("why", long_prompt)],
    )
    tokenizer = load_tokenizer(tiny_dirs["chatml"])

    with pytest.raises(TrainingDataError) as caught:
        validate_training_data(tmp_path, tokenizer, max_seq_length=20, mask_prompt=True)

    assert problem_lines(caught.value, "train.jsonl") == [2]
    assert "max_seq_length is 20, so prompt masking leaves no token to train on" in str(caught.value)

    # Without prompt masking the long prompt trains; long examples are only counted as truncated.
    data = validate_training_data(tmp_path, tokenizer, max_seq_length=20, mask_prompt=False)
    assert data.truncated == 2


def test_project_data_renders_with_tiny_template(tiny_dirs):
    data = validate_training_data(PROJECT_DATA, load_tokenizer(tiny_dirs["chatml"]), batch_size=2, max_seq_length=512)

    assert data.truncated == 0


# ---------------------------------------------------------------------------------------------
# Training on a tiny model


def tiny_config(**changes) -> object:
    config = load_training_config(SMOKE_CONFIG)
    return dataclasses.replace(config, **({"iters": 3, "steps_per_report": 1} | changes))


def last_logits(model_dir: Path, adapter_dir: Path | None, text: str = "hello world"):
    import mlx.core as mx
    from mlx_lm.utils import load

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    logits = model(mx.array([tokenizer.encode(text)]))[0, -1]
    mx.eval(logits)
    return logits


def test_train_lora_writes_loadable_adapter(tmp_path, tiny_dirs):
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.utils import load

    model_dir = tiny_dirs["chatml"]
    adapter_dir = tmp_path / "adapter"

    run = train_lora(model_dir, None, tiny_config(), adapter_dir)

    assert (adapter_dir / "adapters.safetensors").is_file()
    assert (adapter_dir / "phases" / "01-smoke" / "adapters.safetensors").is_file()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    assert config["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0}
    log = json.loads((adapter_dir / "training_log.json").read_text())
    assert log["phases"][0]["iters"] == 3
    assert run.phases[0].train_examples == 24
    assert run.phases[0].valid_examples == 6
    assert [iteration for iteration, _ in run.phases[0].train_losses] == [1, 2, 3]
    assert run.phases[0].seconds_per_iteration > 0

    # LoRA B starts at zero, so a changed output shows the trained weights are loaded.
    base = last_logits(model_dir, None)
    tuned = last_logits(model_dir, adapter_dir)
    assert not mx.allclose(base, tuned).item()

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert isinstance(generate(model, tokenizer, prompt=prompt, max_tokens=4), str)


def test_quantized_model_trains_as_qlora(tmp_path, tiny_dirs, caplog):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.utils import load, quantize_model, save

    model, tokenizer, config = load(str(tiny_dirs["chatml"]), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    quantized_dir = tmp_path / "q4"
    save(quantized_dir, str(tiny_dirs["chatml"]), model, tokenizer, config)
    caplog.set_level(logging.WARNING, logger="lem_fixtures.training")

    run = train_lora(quantized_dir, None, tiny_config(), tmp_path / "adapter")

    assert any("trains QLoRA" in record.getMessage() for record in caplog.records)
    assert run.phases[0].train_losses
    tuned, _ = load(str(quantized_dir), adapter_path=str(tmp_path / "adapter"))
    lora_layers = [module for _, module in tuned.named_modules() if isinstance(module, LoRALinear)]
    # LoRA wraps the frozen 4-bit layers, and the trained weights change the output.
    assert lora_layers and all(isinstance(layer.linear, nn.QuantizedLinear) for layer in lora_layers)
    assert not mx.allclose(last_logits(quantized_dir, None), last_logits(quantized_dir, tmp_path / "adapter")).item()


def test_phases_resume_previous_adapter(tmp_path, tiny_dirs):
    config_path = tmp_path / "two.yaml"
    config_path.write_text(
        BASE_CONFIG.replace("iters: 10", "iters: 2")
        + f"steps_per_report: 1\nphases: [{{name: first, data: {PROJECT_DATA}}}, {{name: second, data: {PROJECT_DATA}}}]\n"
    )

    run = train_lora(tiny_dirs["chatml"], None, load_training_config(config_path), tmp_path / "adapter")

    assert [phase.name for phase in run.phases] == ["first", "second"]
    assert (tmp_path / "adapter" / "phases" / "02-second" / "adapters.safetensors").is_file()
    # The first validation loss runs before any update. A second phase that started from fresh
    # LoRA weights would repeat the first phase's value exactly.
    assert run.phases[1].val_losses[0][1] != run.phases[0].val_losses[0][1]
    assert run.phases[1].val_losses[0][1] < run.phases[0].val_losses[0][1]


def test_too_many_layers_is_rejected(tmp_path, tiny_dirs):
    config = tiny_config(num_layers=8)

    with pytest.raises(TrainingConfigError, match="num_layers is 8 but .* has 2 layers"):
        train_lora(tiny_dirs["no-system"], None, config, tmp_path / "adapter")


def test_invalid_data_stops_before_training(tmp_path, tiny_dirs):
    write_jsonl(tmp_path / "data" / "train.jsonl", [chat("hello", "world")])

    with pytest.raises(TrainingDataError, match="fewer than batch_size 2"):
        train_lora(tiny_dirs["chatml"], tmp_path / "data", tiny_config(), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------
# Adapter cache


@pytest.fixture
def tiny_config_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(BASE_CONFIG.replace("iters: 10", "iters: 2") + "val_batches: 1\n")
    return path


def test_ensure_adapter_reuses_cache(tmp_path, tiny_dirs, tiny_config_file, caplog):
    caplog.set_level(logging.INFO, logger="lem_fixtures.training")
    cache = tmp_path / "cache"

    first = ensure_adapter(tiny_dirs["chatml"], PROJECT_DATA, tiny_config_file, cache_dir=cache)
    second = ensure_adapter(tiny_dirs["chatml"], PROJECT_DATA, tiny_config_file, cache_dir=cache)

    assert first.trained is True
    assert second.trained is False
    assert first.path == second.path == cache / "adapters" / first.key
    assert (first.path / "adapters.safetensors").is_file()
    assert second.manifest["key"] == first.key
    messages = [record.getMessage() for record in caplog.records]
    assert sum(message.startswith("trained adapter") for message in messages) == 1
    assert sum(message.startswith("reused cached adapter") for message in messages) == 1
    assert [path.name for path in (cache / "adapters").iterdir() if path.is_dir()] == [first.key]


def test_cache_key_changes_with_inputs(tmp_path, tiny_dirs, tiny_config_file):
    config = load_training_config(tiny_config_file)
    pairs = resolve_phase_data(config, PROJECT_DATA)
    key, document = adapter_cache_key(tiny_dirs["chatml"], pairs, config, "train")

    assert adapter_cache_key(tiny_dirs["chatml"], pairs, config, "train")[0] == key
    assert adapter_cache_key(tiny_dirs["chatml"], pairs, dataclasses.replace(config, seed=1), "train")[0] != key
    assert adapter_cache_key(tiny_dirs["no-system"], pairs, config, "train")[0] != key
    assert adapter_cache_key(tiny_dirs["chatml"], pairs, config, "valid")[0] != key
    assert document["config"]["lora_parameters"]["rank"] == 8

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "valid.jsonl"):
        (data / name).write_bytes((PROJECT_DATA / name).read_bytes())
    assert adapter_cache_key(tiny_dirs["chatml"], resolve_phase_data(config, data), config, "train")[0] == key
    with (data / "train.jsonl").open("a") as handle:
        handle.write(chat("one more", "example") + "\n")
    assert adapter_cache_key(tiny_dirs["chatml"], resolve_phase_data(config, data), config, "train")[0] != key


ENSURE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lem_fixtures.training import ensure_adapter
    result = ensure_adapter(sys.argv[1], sys.argv[2], sys.argv[3], cache_dir=sys.argv[4])
    print(json.dumps({"trained": result.trained, "path": str(result.path)}))
    """
)


def test_concurrent_sessions_train_once(tmp_path, tiny_dirs, tiny_config_file):
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", ENSURE_SCRIPT, str(tiny_dirs["chatml"]), str(PROJECT_DATA), str(tiny_config_file), str(cache)]
    env = os.environ | {"PYTHONPATH": str(REPO)}

    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]

    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    results = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]
    assert sorted(result["trained"] for result in results) == [False, True]
    assert results[0]["path"] == results[1]["path"]

    # A later session finds the adapter without training.
    later = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert later.returncode == 0, later.stderr
    assert json.loads(later.stdout.strip().splitlines()[-1])["trained"] is False


# ---------------------------------------------------------------------------------------------
# `lem train`


def test_cli_trains_and_fuses(tmp_path, tiny_dirs, tiny_config_file, capsys):
    import mlx.core as mx

    adapter_dir = tmp_path / "adapter"
    fused_dir = tmp_path / "fused"

    code = main([
        "--model", str(tiny_dirs["chatml"]), "--data", str(PROJECT_DATA), "--config", str(tiny_config_file),
        "--adapter-path", str(adapter_dir), "--fuse", "--fused-path", str(fused_dir),
    ])

    assert code == 0
    assert capsys.readouterr().out.strip() == str(adapter_dir)
    assert (fused_dir / "config.json").is_file()
    with_adapter = last_logits(tiny_dirs["chatml"], adapter_dir)
    fused = last_logits(fused_dir, None)
    assert mx.allclose(with_adapter, fused, atol=1e-4).item()


def test_cli_uses_cache_and_train_split(tmp_path, tiny_dirs, tiny_config_file, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "valid.jsonl").write_bytes((PROJECT_DATA / "train.jsonl").read_bytes())
    argv = ["--model", str(tiny_dirs["chatml"]), "--data", str(data), "--config", str(tiny_config_file), "--cache-dir", str(tmp_path / "cache")]

    assert main(argv) == 1
    assert "`lem train --train-split valid`" in capsys.readouterr().err

    assert main(argv + ["--train-split", "valid"]) == 0
    captured = capsys.readouterr()
    assert "trained" in captured.err
    adapter_dir = Path(captured.out.strip())
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["train_split"] == "valid"

    assert main(argv + ["--train-split", "valid"]) == 0
    captured = capsys.readouterr()
    assert "reused from the cache" in captured.err
    assert Path(captured.out.strip()) == adapter_dir


def test_cli_reports_config_error(tmp_path, tiny_dirs, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(BASE_CONFIG + "rank: 8\n")

    code = main(["--model", str(tiny_dirs["chatml"]), "--config", str(config), "--adapter-path", str(tmp_path / "a")])

    assert code == 1
    assert f"lem: error: {config}: unknown key 'rank' in the config" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Training effects table


BASE_SCORES = {"P1": {"baseline": 1.0}, "P2": {"baseline": 2.0}, "P3": {"baseline": 3.0}, "P4": {"baseline": 4.0}}
TRAINED_SCORES = {
    "P1": {"baseline": 2.0, "json": 5.0, "txt": 2.5},
    "P2": {"baseline": 4.0, "json": 4.0, "txt": 4.5},
    "P3": {"baseline": 3.0, "json": 6.0, "txt": 3.5},
    "P5": {"baseline": 1.0},
}


def test_training_effects_fine_tuning_row():
    from lem_fixtures.statistics import paired_bootstrap_ci

    row = training_effects(BASE_SCORES, TRAINED_SCORES, [])[0]

    # P1..P3 pair up (deltas 1, 2, 0); P4 has no trained score and P5 no base score.
    assert row["effect"] == "fine-tuning"
    assert row["condition"] == "baseline"
    assert row["n"] == 3
    assert row["missing"] == 2
    assert row["before"] == 2.0
    assert row["after"] == 3.0
    assert row["delta"] == 1.0
    ci = paired_bootstrap_ci([1.0, 2.0, 0.0])
    assert (row["ci_low"], row["ci_high"]) == (ci.low, ci.high)
    assert 0.0 <= row["ci_low"] <= 1.0 <= row["ci_high"] <= 2.0


def test_training_effects_kernel_rows():
    from lem_fixtures.kernels import Kernel

    kernel = Kernel(name="txt", path=Path("kernel/lek-kernel.txt"), text="t", sha256="0")
    rows = training_effects(BASE_SCORES, TRAINED_SCORES, ["json", kernel, "absent"])

    assert [row["condition"] for row in rows] == ["baseline", "json", "txt", "absent"]
    json_row, txt_row, absent_row = rows[1:]
    assert json_row["effect"] == "kernel on trained"
    assert json_row["comparison"] == "trained + json - trained baseline"
    assert (json_row["n"], json_row["missing"]) == (3, 1)
    assert json_row["before"] == 3.0
    assert json_row["after"] == 5.0
    assert json_row["delta"] == 2.0
    # Every delta of txt is 0.5, so every resample has mean 0.5.
    assert (txt_row["delta"], txt_row["ci_low"], txt_row["ci_high"]) == (0.5, 0.5, 0.5)
    assert (absent_row["n"], absent_row["missing"]) == (0, 4)
    assert absent_row["delta"] is None
    assert absent_row["ci_low"] is None


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (float32, converted from the GGUF that a package ships)


@pytest.fixture(scope="module")
def smollm2_dir():
    require_mlx()
    try:
        from lem_fixtures.models import resolve_model

        return Path(resolve_model("smollm2-135m-instruct"))
    except ImportError:
        pass
    try:
        from lem_fixtures.convert import embedded_model_dir

        return embedded_model_dir("smollm2-135m-instruct")
    except (ImportError, LemError) as error:
        pytest.skip(f"SmolLM2-135M-Instruct is not available: {error}")


def test_reference_data_renders_with_smollm2(lem_reference, smollm2_dir):
    directory = lem_reference / "training"
    if not (directory / "valid.jsonl").is_file():
        pytest.skip(f"{directory} has no valid.jsonl")

    data = validate_training_data(directory, load_tokenizer(smollm2_dir), train_split="valid", batch_size=2, max_seq_length=2048)

    assert len(data.train.examples) == 229


@pytest.mark.slow
def test_smoke_training_on_smollm2(tmp_path, smollm2_dir):
    import mlx.core as mx
    from mlx_lm import generate
    from mlx_lm.utils import load

    # The smoke config with 4 iterations and one validation batch keeps this test near 30 s
    # (SmolLM2 float32 takes about 2 s per iteration on 2 x86 cores with these examples).
    config = dataclasses.replace(load_training_config(SMOKE_CONFIG), iters=4, val_batches=1)
    adapter_dir = tmp_path / "adapter"

    run = train_lora(smollm2_dir, None, config, adapter_dir)

    phase = run.phases[0]
    assert phase.iters == 4
    assert phase.train_examples == 24
    assert all(loss > 0 for _, loss in phase.train_losses)
    prompt_text = "Is it ever right to lie?"
    assert not mx.allclose(last_logits(smollm2_dir, None, prompt_text), last_logits(smollm2_dir, adapter_dir, prompt_text)).item()
    model, tokenizer = load(str(smollm2_dir), adapter_path=str(adapter_dir))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], add_generation_prompt=True)
    assert generate(model, tokenizer, prompt=prompt, max_tokens=12).strip()
