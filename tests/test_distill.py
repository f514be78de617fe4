"""Self-distillation on a tiny random model: sampling, keep-rate bookkeeping, written data and the cache."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lem_fixtures.backend import preload_openblas
from lem_fixtures.distill import DistillResult, DistillSample, distill, distilled_data, sample_seed, write_distilled
from lem_fixtures.generation import GenerationParams
from lem_fixtures.kernels import Kernel, text_sha256
from lem_fixtures.probes import Probe
from lem_fixtures.scoring import score_v2
from lem_fixtures.training_data import validate_training_data

from tiny_model import build_tiny_model

# Importing mlx_lm imports mlx, so OpenBLAS has to be preloaded before it.
preload_openblas()
pytest.importorskip("mlx_lm")

KERNEL = Kernel(name="kind", path=Path("kind.txt"), text="be kind and honest", sha256=text_sha256("be kind and honest"))
PROBES = [
    Probe(id=probe_id, prompt=prompt, category="test", source="inline", index=index, test_id=probe_id)
    for index, (probe_id, prompt) in enumerate(
        [("P01", "tell me about consent"), ("P02", "what is dignity ?"), ("P03", "why be honest")]
    )
]
PARAMS = GenerationParams(max_tokens=6, temperature=0.7, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lem_fixtures.backend import import_mlx

    import_mlx()
    import mlx_lm

    built = build_tiny_model(tmp_path_factory.mktemp("models") / "random", hidden_size=64)
    model, tokenizer, config = mlx_lm.load(str(built.path), return_config=True)
    return SimpleNamespace(name="tiny", path=built.path, model=model, tokenizer=tokenizer, config=config)


def alternating_score():
    """Score samples 10, -5, 10, -5, ... in generation order, whatever their text."""
    values = itertools.cycle([10.0, -5.0])
    return lambda text: next(values)


def test_keep_rate_bookkeeping(tmp_path, tiny):
    result = distill(tiny, PROBES, KERNEL, 2, 0.0, PARAMS, tmp_path, score=alternating_score())

    assert result.n_probes == 3
    assert result.n_samples == 6
    assert [sample.score for sample in result.samples] == [10.0, -5.0] * 3
    expected_kept = [sample.score >= 0.0 and bool(sample.response.strip()) for sample in result.samples]
    assert [sample.kept for sample in result.samples] == expected_kept
    assert result.n_kept == sum(expected_kept)
    assert result.keep_rate == result.n_kept / 6
    assert result.mean_score == 2.5
    if result.n_kept:
        assert result.mean_kept_score == 10.0


def test_written_examples_omit_kernel(tmp_path, tiny):
    result = distill(tiny, PROBES, KERNEL, 2, -1000.0, PARAMS, tmp_path, score=lambda text: 1.0)

    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    kept = [sample for sample in result.samples if sample.kept]
    assert len(lines) == result.n_kept == len(kept)
    prompts = {probe.id: probe.prompt for probe in PROBES}
    for line, sample in zip(lines, kept):
        messages = json.loads(line)["messages"]
        assert [message["role"] for message in messages] == ["user", "assistant"]
        assert messages[0]["content"] == prompts[sample.probe_id]
        assert messages[1]["content"] == sample.response
        assert KERNEL.text not in line
    validate_training_data(tmp_path)


def test_manifest_records_bookkeeping(tmp_path, tiny):
    result = distill(tiny, PROBES, KERNEL, 2, 0.0, PARAMS, tmp_path, score=alternating_score())

    manifest = json.loads((tmp_path / "distill.json").read_text())
    assert manifest["keep_rate"] == result.keep_rate
    assert manifest["mean_kept_score"] == result.mean_kept_score
    assert manifest["n_kept"] == result.n_kept
    assert manifest["kernel"] == "kind"
    assert manifest["kernel_sha256"] == KERNEL.sha256
    assert manifest["params"] == PARAMS.to_dict()
    assert [sample["seed"] for sample in manifest["samples"]] == [sample.seed for sample in result.samples]
    assert DistillResult.from_json(manifest) == result


def test_v2_scores_and_threshold(tmp_path, tiny):
    result = distill(tiny, PROBES, KERNEL, 2, 0.5, PARAMS, tmp_path)

    for sample in result.samples:
        assert sample.score == score_v2(sample.response)["lek_score"]
        expected = sample.score >= 0.5 and bool(sample.response.strip())
        assert sample.kept == expected
    # With these seeds the random model's samples fall on both sides of the threshold.
    assert 0 < result.n_kept < result.n_samples


def test_fixed_seeds_repeat_samples(tmp_path, tiny):
    first = distill(tiny, PROBES, KERNEL, 3, 0.0, PARAMS, tmp_path / "a", score=lambda text: 1.0)
    second = distill(tiny, PROBES, KERNEL, 3, 0.0, PARAMS, tmp_path / "b", score=lambda text: 1.0)

    assert [sample.response for sample in first.samples] == [sample.response for sample in second.samples]
    seeds = [sample.seed for sample in first.samples]
    assert len(set(seeds)) == len(seeds)
    assert seeds[0] == sample_seed(0, "P01", 0)
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()


def test_greedy_with_several_samples_is_rejected(tmp_path, tiny):
    with pytest.raises(ValueError, match="need temperature > 0"):
        distill(tiny, PROBES, KERNEL, 2, 0.0, GenerationParams(max_tokens=4), tmp_path)


def test_distilled_data_is_cached(tmp_path, tiny, caplog):
    pytest.importorskip("lem_fixtures.models")
    caplog.set_level("INFO", logger="lem_fixtures.distill")
    options = {"k": 2, "threshold": -1000.0, "params": PARAMS, "cache_dir": tmp_path}

    first = distilled_data(tiny.path, PROBES, KERNEL, **options)
    second = distilled_data(tiny.path, PROBES, KERNEL, **options)

    assert first.data_dir == second.data_dir
    assert first.data_dir.parent.parent == tmp_path / "distill"
    assert first.data_dir.name == "threshold_-1000.0"
    assert first.reused is False
    assert second.reused is True
    assert second.samples == first.samples
    assert json.loads(second.manifest_path.read_text())["data_dir"] == str(second.data_dir)
    assert sum("reused 6 cached samples" in record.getMessage() for record in caplog.records) == 1


def test_threshold_sweep_reuses_samples(tmp_path, tiny, monkeypatch):
    import lem_fixtures.models

    options = {"k": 2, "params": PARAMS, "cache_dir": tmp_path}
    everything = distilled_data(tiny.path, PROBES, KERNEL, threshold=-1000.0, **options)

    # Another threshold selects from the cached samples without loading the model.
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(lem_fixtures.models, "load_model", no_load)
    scores = sorted(sample.score for sample in everything.samples)
    stricter = distilled_data(tiny.path, PROBES, KERNEL, threshold=scores[-1], **options)
    finished = distilled_data(tiny.path, PROBES, KERNEL, threshold=-1000.0, drop_truncated=True, **options)

    assert stricter.reused is True
    assert stricter.data_dir.parent == everything.data_dir.parent
    assert stricter.data_dir != everything.data_dir
    assert [sample.response for sample in stricter.samples] == [sample.response for sample in everything.samples]
    assert all(sample.score >= scores[-1] for sample in stricter.samples if sample.kept)
    assert 0 < stricter.n_kept <= everything.n_kept
    assert finished.data_dir.name == "threshold_-1000.0_finished"
    assert finished.n_kept_truncated == 0
    assert finished.n_kept == everything.n_kept - everything.n_kept_truncated


def test_every_tenth_kept_example_is_held_out(tmp_path):
    probes = [Probe(id=f"P{index:02d}", prompt=f"question {index}", category="test", source="inline", index=index, test_id=f"P{index:02d}") for index in range(12)]
    samples = [
        DistillSample(probe.id, 0, index, 5.0, True, f"answer {index}", "length" if index % 3 == 0 else "stop")
        for index, probe in enumerate(probes)
    ]

    result = write_distilled(tmp_path, probes, samples, kernel=KERNEL, k=1, threshold=0.0)

    assert (result.n_train, result.n_valid) == (11, 1)
    valid = [json.loads(line) for line in (tmp_path / "valid.jsonl").read_text().splitlines()]
    assert valid[0]["messages"][0]["content"] == "question 9"
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 11
    assert result.n_truncated == 4
    assert result.n_kept_truncated == 4
    data = validate_training_data(tmp_path)
    assert data.valid_split == "valid"


def write_cli_inputs(tmp_path):
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps([{"id": probe.id, "prompt": probe.prompt} for probe in PROBES]))
    kernel = tmp_path / "kind.txt"
    kernel.write_text(KERNEL.text)
    return probes, kernel


def test_cli_writes_data_and_prints_folder(tmp_path, tiny, capsys):
    from lem_fixtures.distill import main

    probes, kernel = write_cli_inputs(tmp_path)
    out = tmp_path / "out"

    code = main([
        "--model", str(tiny.path), "--prompts", str(probes), "--kernel", f"kind={kernel}",
        "--k", "2", "--max-tokens", "4", "--threshold", "-1000", "--out", str(out),
    ])

    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip() == str(out)
    manifest = json.loads((out / "distill.json").read_text())
    assert manifest["kernel"] == "kind"
    assert manifest["k"] == 2
    assert manifest["n_samples"] == 6
    n_kept = manifest["n_kept"]
    assert f"kept {n_kept} of 6 samples from 3 probes" in captured.err
    assert len((out / "train.jsonl").read_text().splitlines()) == n_kept
    validate_training_data(out)


def test_cli_rejects_greedy_samples_and_missing_kernel(tmp_path, tiny, capsys):
    from lem_fixtures.distill import main

    probes, _ = write_cli_inputs(tmp_path)
    common = ["--model", str(tiny.path), "--prompts", str(probes), "--max-tokens", "4", "--out", str(tmp_path / "out")]

    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--kernel", "kind=kind.txt", "--temperature", "0"])
    assert exit_info.value.code == 2
    assert "--k 4 needs --temperature above 0" in capsys.readouterr().err

    assert main([*common, "--kernel", f"kind={tmp_path / 'missing.txt'}"]) == 1
    assert f"{tmp_path / 'missing.txt'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
