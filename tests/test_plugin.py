"""The pytest plugin as a user meets it: collection, markers, -k, xdist, upstream checkouts and the score gate."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER_TEST = "def test_probe(lem_case):\n    assert lem_case.probe.prompt\n"


def own_options():
    return [
        "--lem-probes", str(REPO / "probes"),
        "--lem-kernel", f"json={REPO / 'kernel' / 'axioms.json'}",
        "--lem-kernel", f"txt={REPO / 'kernel' / 'lek-kernel.txt'}",
    ]


def collected_ids(result):
    return [line for line in result.outlines if "::" in line]


def test_p100_collects_101_by_3(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "p100", "--collect-only", "-q", *own_options())

    ids = collected_ids(result)
    assert len(ids) == 101 * 3
    assert any(re.search(r"test_probe\[P01_[A-Z0-9_]+-smollm2-135m-instruct-json\]", line) for line in ids)


def test_p20_collects_first_20(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "p20", "--collect-only", "-q", *own_options())

    ids = collected_ids(result)
    probes = {line.split("[")[1].split("-")[0] for line in ids}
    assert len(ids) == 20 * 3
    assert len(probes) == 20
    assert not any(line.split("[")[1].startswith("P21_") for line in ids)


def test_k_selects_condition(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "p100", "-k", "json and not txt", "--collect-only", "-q", *own_options())

    ids = collected_ids(result)
    assert len(ids) == 101
    assert all(line.endswith("-json]") for line in ids)


def test_k_selects_probe(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "p100", "-k", "P07", "--collect-only", "-q", *own_options())

    ids = collected_ids(result)
    assert len(ids) == 3
    assert all("[P07_" in line for line in ids)


def test_k_selects_model(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    selected = pytester.runpytest("-m", "p20", "-k", "smollm2", "--collect-only", "-q", *own_options())
    other = pytester.runpytest("-m", "p20", "-k", "gemma", "--collect-only", "-q", *own_options())

    assert len(collected_ids(selected)) == 60
    assert len(collected_ids(other)) == 0


def test_plain_run_deselects_cases(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST, test_other="def test_fast():\n    assert True\n")

    result = pytester.runpytest(*own_options())

    result.assert_outcomes(passed=1, deselected=1)


def test_collection_same_under_xdist(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-n", "2", "-m", "p20", "-p", "xdist", *own_options())

    result.assert_outcomes(passed=60)


def test_unknown_kernel_path_is_usage_error(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "p20", "--collect-only", "--lem-probes", str(REPO / "probes"), "--lem-kernel", "json=missing.json")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*kernel file not found*missing.json*"])


def test_upstream_checkout_uses_paper_probes(pytester, lem_reference):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "p100", "--collect-only", "-q", "--lem-upstream", str(lem_reference))

    ids = collected_ids(result)
    assert len(ids) == 101 * 3
    assert any("[P21_CULTURE_PLAYFULNESS-" in line for line in ids)
    assert ids[20 * 3].split("[")[1].startswith("P21_CULTURE_PLAYFULNESS")


def test_upstream_kernels_are_published_ones(pytester, lem_reference):
    pytester.makepyfile(
        test_cases=(
            "def test_probe(lem_case):\n"
            "    if lem_case.kernel is not None:\n"
            "        print('KERNEL', lem_case.condition, len(lem_case.kernel.text))\n"
            "    assert True\n"
        )
    )

    result = pytester.runpytest("-m", "p20", "-k", "P01_", "-s", "--lem-upstream", str(lem_reference))

    result.assert_outcomes(passed=3)
    sizes = dict(re.findall(r"KERNEL (\w+) (\d+)", result.stdout.str()))
    # The published json kernel was a 2.2 KB document; txt is the whole concatenated file.
    assert 2000 <= int(sizes["json"]) <= 2400
    assert int(sizes["txt"]) == len((lem_reference / "kernel" / "lek-1-kernel.txt").read_text())


@pytest.mark.smoke
def test_gate_fails_on_drop(small_project):
    options = ["-m", "p20", "--lem-max-tokens", "12"]

    recorded = small_project.runpytest_subprocess(*options, "--lem-record", "--snapshot-update")
    # While recording, the three summary checks have nothing to compare and skip.
    recorded.assert_outcomes(passed=6, skipped=3)
    baseline = small_project.path / "expectations" / "smollm2-135m-instruct.yaml"
    data = yaml.safe_load(baseline.read_text())
    old_score = data["probes"]["P02_TEST_KIND"]["json"]
    data["probes"]["P02_TEST_KIND"]["json"] = old_score + 10.0
    baseline.write_text(yaml.safe_dump(data, sort_keys=False))

    gated = small_project.runpytest_subprocess(*options)

    gated.assert_outcomes(passed=5 + 3, failed=1)
    output = gated.stdout.str()
    assert "P02_TEST_KIND [json]" in output
    assert f"scored {old_score:.2f}" in output
    assert f"recorded baseline {old_score + 10.0:.2f}" in output


@pytest.mark.smoke
def test_run_writes_reports(small_project):
    result = small_project.runpytest_subprocess(
        "-m", "p20", "--lem-max-tokens", "12", "--snapshot-update", "--lem-report-dir", "out"
    )

    # No baseline is recorded yet: the cases pass with a warning and the summary checks skip.
    result.assert_outcomes(passed=6, skipped=3)
    runs = list((small_project.path / "out").iterdir())
    assert len(runs) == 1
    names = {path.name for path in runs[0].iterdir()}
    assert {"ab-smollm2-135m-instruct.jsonl", "summary.md", "scores.png", "deltas.png", "index.html", "run.json"} <= names
    result.stdout.fnmatch_lines(["*LEM benchmark*", "*smollm2-135m-instruct*baseline*"])


def test_paper_model_not_downloaded_skips(pytester, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(pytester.path / "hf-empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytester.makepyfile(test_cases="def test_probe(lem_result):\n    assert lem_result\n")

    result = pytester.runpytest_subprocess("-m", "paper and p20", "-k", "P01_ and gemma3-1b-it-", "-rs", *own_options())

    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*download mlx-community/gemma-3-1b-it-4bit*"])


def test_paper_marker_collects_registry_models(pytester):
    pytester.makepyfile(test_cases=PLACEHOLDER_TEST)

    result = pytester.runpytest("-m", "paper and p20", "--collect-only", "-q", *own_options())

    ids = collected_ids(result)
    models = {line.split("-", 1)[1].rsplit("-", 1)[0] for line in ids}
    assert "gemma3-1b-it" in models
    assert "lek-gemma3-1b-layered" in models
    assert "smollm2-135m-instruct" not in models


@pytest.mark.smoke
def test_selection_keeps_batched_responses(small_project):
    options = ["-m", "p20", "--lem-max-tokens", "12", "--lem-batch-size", "4", "--lem-no-report"]
    small_project.runpytest_subprocess(*options, "--snapshot-update").assert_outcomes(passed=6, skipped=3)

    # Alone and without the cache, P02's cases regenerate their fixed batches and match the snapshots.
    alone = small_project.runpytest_subprocess(*options, "-k", "P02_", "--lem-no-cache", "-s")

    alone.assert_outcomes(passed=3)
    alone.stdout.fnmatch_lines(["*batch 1/2: 4 cases, 0 from the cache, 4 to generate*"])


@pytest.mark.smoke
def test_trained_model_joins_matrix(small_project):
    result = small_project.runpytest_subprocess(
        "-m", "training", "-k", "P01_ and lek", "--lem-max-tokens", "8", "--lem-no-report", "--snapshot-update",
        f"--lem-training-config={REPO / 'training' / 'smoke.yaml'}",
        f"--lem-training-data={REPO / 'training' / 'data'}",
    )

    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*smollm2-135m-instruct+lek*baseline*"])
