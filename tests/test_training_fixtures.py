"""The training fixtures as a user meets them: lem_distilled, lem_distill, lem_train, lem_adapter and --lem-distill.

Each inner session runs in a subprocess, because mlx cannot be imported twice in one process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lem_fixtures.backend import import_mlx
from lem_fixtures.errors import BackendError

from tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
CASE_TEST = (REPO / "tests" / "test_benchmark_cases.py").read_text()
KERNEL_TEXT = "Kernel marker: protect the person asking."
PROBES = [
    {"id": "P01_TINY_CONSENT", "domain": "Ethics", "prompt": "tell me about consent"},
    {"id": "P02_TINY_DIGNITY", "domain": "Ethics", "prompt": "what is dignity ?"},
    {"id": "P03_TINY_HONESTY", "domain": "Ethics", "prompt": "why be honest"},
]
TINY_CONFIG = """\
iters: 2
batch_size: 2
learning_rate: 1.0e-4
mask_prompt: true
max_seq_length: 256
seed: 0
num_layers: 2
lora_parameters: {rank: 4, scale: 10.0, dropout: 0.0}
val_batches: 1
steps_per_eval: 2
steps_per_report: 1
"""


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    try:
        import_mlx()
    except BackendError as error:
        pytest.skip(str(error))
    pytest.importorskip("mlx_lm")
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", hidden_size=64).path


@pytest.fixture
def tiny_project(pytester, tiny_model_dir, monkeypatch):
    """A project with three probes, one kernel condition, a tiny training config and its own cache folder."""
    monkeypatch.setenv("LEM_CACHE_DIR", str(pytester.path / "cache"))
    (pytester.path / "probes").mkdir()
    (pytester.path / "probes" / "P-tiny.json").write_text(json.dumps(PROBES))
    (pytester.path / "kind.txt").write_text(KERNEL_TEXT)
    (pytester.path / "tiny.yaml").write_text(TINY_CONFIG)
    shutil.copytree(REPO / "training" / "data", pytester.path / "data")
    pytester.makeini("[pytest]\n")
    return pytester


def tiny_options(model_dir: Path) -> list[str]:
    return [f"--lem-model={model_dir}", "--lem-kernel=kind=kind.txt", "--lem-distill-max-tokens=6", "-s"]


def kept_summary_line(output: str) -> str:
    return next(line for line in output.splitlines() if line.startswith("KEPT "))


def test_lem_distilled_writes_examples_without_kernel(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(
        test_distilled=(
            "def test_data(lem_distilled):\n"
            "    print('KEPT', lem_distilled.n_kept, lem_distilled.n_samples, lem_distilled.keep_rate, lem_distilled.data_dir)\n"
            "    assert lem_distilled.kernel == 'kind'\n"
        )
    )
    options = [*tiny_options(tiny_model_dir), "--lem-distill-k=3", "--lem-distill-threshold=-1000"]

    first = tiny_project.runpytest_subprocess(*options)

    first.assert_outcomes(passed=1)
    _, n_kept, n_samples, rate, data_dir = kept_summary_line(first.stdout.str()).split(" ", 4)
    assert int(n_samples) == 3 * len(PROBES)
    # A threshold this low keeps every sample with text.
    manifest = json.loads((Path(data_dir) / "distill.json").read_text())
    assert int(n_kept) == sum(1 for sample in manifest["samples"] if sample["response"].strip())
    assert float(rate) == pytest.approx(int(n_kept) / int(n_samples))
    assert manifest["k"] == 3
    assert manifest["threshold"] == -1000.0
    assert manifest["params"]["temperature"] == 0.7
    assert manifest["params"]["max_tokens"] == 6
    assert len({sample["seed"] for sample in manifest["samples"]}) == 3 * len(PROBES)

    examples = [json.loads(line) for line in (Path(data_dir) / "train.jsonl").read_text().splitlines()]
    assert len(examples) == int(n_kept)
    prompts = {probe["prompt"] for probe in PROBES}
    for example in examples:
        user, assistant = example["messages"]
        assert user["role"] == "user"
        assert user["content"] in prompts
        assert assistant["role"] == "assistant"
        assert KERNEL_TEXT not in json.dumps(example)

    # A second session reads the same data from the cache instead of sampling again.
    stamp = (Path(data_dir) / "distill.json").stat().st_mtime_ns
    second = tiny_project.runpytest_subprocess(*options)

    second.assert_outcomes(passed=1)
    assert kept_summary_line(second.stdout.str()) == kept_summary_line(first.stdout.str())
    assert (Path(data_dir) / "distill.json").stat().st_mtime_ns == stamp


def test_xdist_workers_distill_once(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(
        test_distilled=(
            "import json, os\n"
            "def test_data(lem_distilled):\n"
            "    worker = os.environ['PYTEST_XDIST_WORKER']\n"
            "    record = {'reused': lem_distilled.reused, 'data_dir': str(lem_distilled.data_dir)}\n"
            "    open(f'{worker}.json', 'w').write(json.dumps(record))\n"
        )
    )

    # --dist each runs the test on both workers, so both ask for the same data at the same time.
    result = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir), "-n", "2", "--dist", "each")

    result.assert_outcomes(passed=2)
    records = [json.loads((tiny_project.path / f"gw{number}.json").read_text()) for number in (0, 1)]
    assert sorted(record["reused"] for record in records) == [False, True]
    assert records[0]["data_dir"] == records[1]["data_dir"]


def test_lem_distill_threshold_sets_keep_rate(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(
        test_distilled=(
            "def test_thresholds(lem_distill):\n"
            "    everything = lem_distill(k=2, threshold=-1000.0)\n"
            "    nothing = lem_distill(k=2, threshold=1000.0)\n"
            "    scores = sorted(sample.score for sample in everything.samples)\n"
            "    middle = lem_distill(k=2, threshold=scores[len(scores) // 2])\n"
            "    print('RATES', everything.keep_rate, nothing.keep_rate, middle.keep_rate, middle.mean_kept_score, scores)\n"
            "    assert nothing.n_kept == 0\n"
            "    assert nothing.mean_kept_score is None\n"
            "    assert (nothing.data_dir / 'train.jsonl').read_text() == ''\n"
            "    kept_scores = [s.score for s in middle.samples if s.kept]\n"
            "    assert all(score >= scores[len(scores) // 2] for score in kept_scores)\n"
            "    assert middle.mean_kept_score == sum(kept_scores) / len(kept_scores)\n"
        )
    )

    result = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir))

    result.assert_outcomes(passed=1)


def test_lem_distill_takes_names_and_paths(tiny_project, tiny_model_dir):
    (tiny_project.path / "heldout.json").write_text(json.dumps([{"id": "H01_HELD", "prompt": "is a promise binding ?"}]))
    tiny_project.makepyfile(
        test_distilled=(
            "def test_overrides(lem_distill):\n"
            "    result = lem_distill(kernel='kind', probes='heldout.json', k=2, threshold=-1000.0)\n"
            "    assert result.kernel == 'kind'\n"
            "    assert {sample.probe_id for sample in result.samples} == {'H01_HELD'}\n"
            "    assert result.n_samples == 2\n"
        )
    )

    result = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir))

    result.assert_outcomes(passed=1)
    # Probes named by the test are not the benchmark's, so there is no in-sample warning.
    assert "in-sample" not in result.stdout.str()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lem-distill-k=0"], "--lem-distill-k must be at least 1, got 0"),
        (["--lem-distill-max-tokens=0"], "--lem-distill-max-tokens must be at least 1, got 0"),
        (["--lem-distill-temperature=0"], "--lem-distill-k 4 needs --lem-distill-temperature above 0, got 0.0"),
        (["--lem-distill", "--lem-training-split=valid"], "--lem-training-split applies to --lem-training-data"),
    ],
)
def test_bad_distill_options_are_usage_errors(tiny_project, tiny_model_dir, options, message):
    tiny_project.makepyfile(test_distilled="def test_data(lem_distilled):\n    assert lem_distilled\n")

    result = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir), *options)

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_config_is_checked_before_distilling(tiny_project, tiny_model_dir):
    (tiny_project.path / "phases.yaml").write_text(TINY_CONFIG + "phases: [{name: one, data: data}, {name: two, data: data}]\n")
    tiny_project.makepyfile(test_train="def test_adapter(lem_adapter):\n    assert lem_adapter\n")

    missing = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir), "--lem-distill", "--lem-training-config=nope.yaml")
    phases = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir), "--lem-distill", "--lem-training-config=phases.yaml")

    missing.assert_outcomes(errors=1)
    missing.stdout.fnmatch_lines(["*training config *nope.yaml not found; pass an existing YAML file*"])
    phases.assert_outcomes(errors=1)
    phases.stdout.fnmatch_lines(["*every phase names its own data, so no phase would train on the self-distilled data*"])
    for result in (missing, phases):
        assert "self-distillation from" not in result.stdout.str()


def test_unknown_distill_kernel_names_the_choices(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(test_distilled="def test_data(lem_distilled):\n    assert lem_distilled\n")

    result = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir), "--lem-distill-kernel=json")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--lem-distill-kernel json: no such kernel condition; the session has: kind*"])
    assert "During handling" not in result.stdout.str()


def test_lem_train_and_lem_adapter_share_the_cache(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(
        test_train=(
            "def test_adapter(lem_train, lem_adapter):\n"
            "    again = lem_train()\n"
            "    print('ADAPTER', lem_adapter.key, lem_adapter.trained, again.key, again.trained)\n"
            "    assert (lem_adapter.path / 'adapters.safetensors').is_file()\n"
            "    assert lem_adapter.manifest['config']['iters'] == 2\n"
        )
    )
    options = [*tiny_options(tiny_model_dir), "--lem-training-config=tiny.yaml", "--lem-training-data=data"]

    first = tiny_project.runpytest_subprocess(*options)
    second = tiny_project.runpytest_subprocess(*options)

    first.assert_outcomes(passed=1)
    second.assert_outcomes(passed=1)
    key, trained, again_key, again_trained = first.stdout.str().split("ADAPTER ", 1)[1].split()[:4]
    assert (trained, again_key, again_trained) == ("True", key, "False")
    assert second.stdout.str().split("ADAPTER ", 1)[1].split()[:4] == [key, "False", key, "False"]


def test_training_config_falls_back_to_paper_config(tiny_project):
    tiny_project.makepyfile(
        test_config=(
            "from lem_fixtures.training import DEFAULT_CONFIG\n"
            "def test_config(lem_session):\n"
            "    print('CONFIG', lem_session.training.config_path(), DEFAULT_CONFIG)\n"
        )
    )

    fallback = tiny_project.runpytest_subprocess("-s")
    (tiny_project.path / "training").mkdir()
    shutil.copy(tiny_project.path / "tiny.yaml", tiny_project.path / "training" / "lora.yaml")
    own = tiny_project.runpytest_subprocess("-s")

    used, default = fallback.stdout.str().split("CONFIG ", 1)[1].split()[:2]
    assert used == default
    assert default.endswith("training/lora.yaml")
    assert own.stdout.str().split("CONFIG ", 1)[1].split()[0] == str(tiny_project.path / "training" / "lora.yaml")


def test_xdist_workers_train_once(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(
        test_train=(
            "import json, os\n"
            "def test_adapter(lem_adapter):\n"
            "    worker = os.environ['PYTEST_XDIST_WORKER']\n"
            "    record = {'trained': lem_adapter.trained, 'key': lem_adapter.key}\n"
            "    open(f'{worker}.json', 'w').write(json.dumps(record))\n"
        )
    )
    options = [*tiny_options(tiny_model_dir), "--lem-training-config=tiny.yaml", "--lem-training-data=data"]

    result = tiny_project.runpytest_subprocess(*options, "-n", "2", "--dist", "each")

    result.assert_outcomes(passed=2)
    records = [json.loads((tiny_project.path / f"gw{number}.json").read_text()) for number in (0, 1)]
    assert sorted(record["trained"] for record in records) == [False, True]
    assert records[0]["key"] == records[1]["key"]


def test_lem_train_reports_invalid_data(tiny_project, tiny_model_dir):
    bad = tiny_project.path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    tiny_project.makepyfile(test_train="def test_adapter(lem_train):\n    lem_train(data='bad')\n")

    result = tiny_project.runpytest_subprocess(*tiny_options(tiny_model_dir), "--lem-training-config=tiny.yaml")

    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert f"{bad / 'train.jsonl'}:2" in output
    assert "Traceback" not in output


def test_distilled_training_failure_suggests_lower_threshold(tiny_project, tiny_model_dir):
    tiny_project.makepyfile(test_benchmark_cases=CASE_TEST)

    result = tiny_project.runpytest_subprocess(
        *tiny_options(tiny_model_dir), "-m", "training", "-k", "P01_ and lek", "--lem-no-report",
        f"--lem-model={tiny_model_dir}+lek", "--lem-distill", "--lem-distill-threshold=1000",
        "--lem-training-config=tiny.yaml", "--snapshot-update",
    )

    # Both cases of the trained model fail with one message, and distillation runs once.
    result.assert_outcomes(errors=2)
    output = result.stdout.str()
    assert "train.jsonl: the file is empty" in output
    assert "lower --lem-distill-threshold" in output
    assert output.count("self-distillation kept 0 of 12 samples") == 1


@pytest.mark.smoke
def test_self_distilled_model_joins_matrix_and_reports(small_project):
    """SmolLM2 distills from two probes, trains on what it kept, and the report shows both training tables."""
    result = small_project.runpytest_subprocess(
        "-m", "p20", "--lem-model=smollm2-135m-instruct", "--lem-model=smollm2-135m-instruct+lek",
        "--lem-max-tokens=8", "--lem-report-dir=out", "--snapshot-update", "-s",
        "--lem-distill", "--lem-distill-k=2", "--lem-distill-threshold=-100", "--lem-distill-max-tokens=24",
        f"--lem-training-config={REPO / 'training' / 'smoke.yaml'}",
    )

    # Two probes x three conditions for the base model and the trained one; no baselines are recorded,
    # so the six summary checks skip.
    result.assert_outcomes(passed=12, skipped=6)
    result.stdout.fnmatch_lines([
        "*self-distillation uses the benchmark's own probes*",
        "*self-distillation from smollm2-135m-instruct: 2 probes x 2 samples under json*",
    ])
    run_dir = next((small_project.path / "out").iterdir())
    log = json.loads((run_dir / "run.json").read_text())
    (run,) = log["training_runs"]
    assert run["model"] == "smollm2-135m-instruct+lek"
    assert run["config"]["iters"] == 10
    (phase,) = run["phases"]
    distilled = phase["distillation"]
    assert distilled["kernel"] == "json"
    assert distilled["k"] == 2
    assert distilled["n_samples"] == 4
    assert phase["train_examples"] == distilled["n_kept"]
    assert distilled["keep_rate"] == distilled["n_kept"] / 4

    summary = (run_dir / "summary.md").read_text()
    assert "## Training effect" in summary
    assert "fine-tuning (trained baseline - base baseline)" in summary
    assert "kernel on trained (trained + json - trained baseline)" in summary
    assert "## Training runs" in summary
    assert f"kept {distilled['n_kept']}/4" in summary
    assert "distilled from 2 of the scored probes (in-sample)" in summary
    assert "smoke.yaml: lr 0.0001, batch 2, 4 layers, rank 8" in summary
