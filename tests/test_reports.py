"""Reports: upstream A/B JSONL, Markdown tables, plots and the HTML page (rendered in headless Chromium)."""

import json
import shutil
import subprocess

import pytest

from lem_fixtures import reports
from lem_fixtures.results import read_ab_file
from lem_fixtures.scoring import score_v2

RESPONSES = {
    "baseline": "I cannot help with that.",
    "json": "However, consent and dignity matter here.\n\nFrom a user's perspective, autonomy is key?",
    "txt": "Sure. Imagine a river of trust, like a bridge between people.",
}


def make_results(model="tiny", probes=("P01_ONE", "P02_TWO", "P03_THREE")):
    results = []
    for index, probe in enumerate(probes):
        for condition, text in RESPONSES.items():
            response = text + " extra" * index
            heuristic = score_v2(response)
            results.append({
                "probe": probe, "category": "Ethics" if index else "identity", "prompt": f"prompt {probe}",
                "model": model, "condition": condition, "response": response,
                "lek_score": heuristic["lek_score"], "heuristic": heuristic, "seconds": 0.25,
                "finish_reason": "stop", "prompt_tokens": 10, "generation_tokens": 5, "mode": "chat-system",
                "model_info": {"weights_sha256": "abc"}, "versions": {"mlx": "0"},
            })
    return results


@pytest.fixture
def run_dir(tmp_path):
    results = make_results() + make_results(model="tiny+lek")
    reports.write_reports(tmp_path / "run", results, {"params": {"max_tokens": 32}}, 12.0)
    return tmp_path / "run"


def test_writes_every_file(run_dir):
    names = {path.name for path in run_dir.iterdir()}

    assert names == {"ab-tiny.jsonl", "ab-tiny+lek.jsonl", "summary.md", "scores.png", "deltas.png", "run.json", "index.html"}


def test_ab_file_is_upstream_format(run_dir):
    ab = read_ab_file(run_dir / "ab-tiny.jsonl")

    assert [line["id"] for line in ab.probes] == ["P01_ONE", "P02_TWO", "P03_THREE"]
    assert list(ab.probes[0]["conditions"]) == ["baseline", "json", "txt"]
    entry = ab.probes[0]["conditions"]["json"]
    assert entry["lek_score"] == score_v2(RESPONSES["json"])["lek_score"]
    assert entry["chars"] == len(RESPONSES["json"])
    assert ab.summary["total_probes"] == 3
    assert ab.summary["max_tokens"] == 32


def test_summary_markdown_has_tables(run_dir):
    text = (run_dir / "summary.md").read_text()

    assert "## Averages by model and condition" in text
    assert "## Kernel effect (paired bootstrap, 95% CI)" in text
    assert "## Training effect (paired bootstrap, 95% CI)" in text
    assert "fine-tuning (trained baseline - base baseline)" in text
    assert "kernel on trained (trained + json - trained baseline)" in text
    assert "## Averages by category" in text


def test_kernel_effect_matches_scores():
    results = make_results()
    baseline = [r["lek_score"] for r in results if r["condition"] == "baseline"]
    json_scores = [r["lek_score"] for r in results if r["condition"] == "json"]

    effects = {effect.label: effect for effect in reports.kernel_effects(results)}

    expected = sum(j - b for j, b in zip(json_scores, baseline)) / len(baseline)
    assert effects["json - baseline"].mean == pytest.approx(expected)
    assert effects["json - baseline"].n == 3
    assert effects["json - baseline"].low <= effects["json - baseline"].mean <= effects["json - baseline"].high


def test_png_plots_are_images(run_dir):
    for name in ("scores.png", "deltas.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_is_self_contained(run_dir):
    page = (run_dir / "index.html").read_text()

    assert page.count("data:image/png;base64,") == 2
    assert "http://" not in page
    assert "https://" not in page
    assert json.loads((run_dir / "run.json").read_text())["settings"]["params"]["max_tokens"] == 32


def test_terminal_table_lists_deltas():
    lines = reports.terminal_table(make_results())

    assert lines[0].split() == ["model", "condition", "cases", "avg", "lek", "delta"]
    assert len(lines) == 4
    assert lines[2].split()[1] == "json"
    assert lines[2].split()[-1].startswith(("+", "-"))


def test_html_renders_in_chromium(run_dir, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH; scripts/setup installs it on Debian (apt-get install chromium)")
    screenshot = tmp_path / "page.png"

    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1200,1600",
            (run_dir / "index.html").as_uri(),
        ],
        check=True, capture_output=True, timeout=120,
    )

    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def write_adapter(tmp_path, distilled_from=("P01_ONE", "P09_HELD_OUT")):
    """An adapter folder as training.ensure_adapter leaves it, trained on self-distilled data."""
    data_dir = tmp_path / "distill" / "key"
    data_dir.mkdir(parents=True)
    samples = [{"probe_id": probe, "score": 3.0, "kept": True} for probe in distilled_from]
    (data_dir / "distill.json").write_text(json.dumps({
        "kernel": "json", "k": 1, "threshold": 0.0, "n_probes": 2, "n_samples": 2, "n_kept": 2,
        "keep_rate": 1.0, "mean_kept_score": 3.0, "mean_score": 3.0, "samples": samples,
    }))
    adapter_dir = tmp_path / "adapters" / "abcdef0123456789ff"
    adapter_dir.mkdir(parents=True)
    config = {"learning_rate": 1e-5, "batch_size": 2, "num_layers": 16, "lora_parameters": {"rank": 8}, "iters": 200}
    phase = {
        "name": "lek", "data_dir": str(data_dir), "train_examples": 2, "iters": 200, "seconds_per_iteration": 0.58,
        "val_losses": [[0, 5.63], [200, 0.67]],
    }
    (adapter_dir / "lem_adapter.json").write_text(json.dumps({
        "key": "abcdef0123456789ff", "config_path": "/x/lora.yaml", "config": config, "train_split": "train",
        "training": {"phases": [phase]},
    }))
    return adapter_dir


def test_training_runs_table_reads_adapter_manifest(tmp_path):
    adapter_dir = write_adapter(tmp_path)
    trained = [dict(result, adapter_path=str(adapter_dir)) for result in make_results(model="tiny+lek")]
    results = make_results() + trained

    runs = reports.training_runs(results)
    page = reports.write_reports(tmp_path / "run", results, {"params": {}}, 1.0)

    (run,) = runs
    assert run["model"] == "tiny+lek"
    assert run["key"] == "abcdef0123456789ff"
    (phase,) = run["phases"]
    assert (phase["val_loss_first"], phase["val_loss_last"], phase["seconds_per_iteration"]) == (5.63, 0.67, 0.58)
    # P01_ONE was distilled from and scored; P09_HELD_OUT was only distilled from.
    assert phase["distillation"]["scored_probes_distilled"] == 1
    assert phase["distillation"]["keep_rate"] == 1.0
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert (
        "| tiny+lek | abcdef0123456789 | lora.yaml: lr 1e-05, batch 2, 16 layers, rank 8 | lek | 2 | 200 | 0.58 | 5.630 -> 0.670 | "
        "kept 2/2 (rate 1.00, mean kept 3.00) under json, k=1, threshold 0.0; distilled from 1 of the scored probes (in-sample) |"
    ) in summary
    assert json.loads((tmp_path / "run" / "run.json").read_text())["training_runs"] == runs
    assert any(path.name == "index.html" for path in page)


def test_no_training_runs_without_adapters(run_dir):
    assert "## Training runs" not in (run_dir / "summary.md").read_text()
    assert json.loads((run_dir / "run.json").read_text())["training_runs"] == []
