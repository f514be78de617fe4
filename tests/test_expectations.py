"""Recorded baselines: file round trip, the per-case gate and the paired-bootstrap summary gate."""

import pytest

from lem_fixtures import expectations
from lem_fixtures.errors import ExpectationError


def make_expectation(scores, **kwargs):
    return expectations.Expectation(model="m", scores=scores, **kwargs)


def test_save_load_round_trip(tmp_path):
    original = make_expectation({"P02_B": {"baseline": 3.5, "json": 4.0}, "P01_A": {"baseline": 1.25}})
    original.recorded = {"params": {"max_tokens": 8}}

    path = expectations.save_expectation(tmp_path, original)
    loaded = expectations.load_expectation(tmp_path, "m")

    assert path == tmp_path / "m.yaml"
    assert loaded.scores == original.scores
    assert loaded.recorded == {"params": {"max_tokens": 8}}
    assert loaded.means() == {"baseline": 2.38, "json": 4.0}


def test_saved_file_is_sorted_for_diffs(tmp_path):
    expectation = make_expectation({"P02_B": {"txt": 1.0, "baseline": 2.0}, "P01_A": {"baseline": 1.0}})

    text = expectations.save_expectation(tmp_path, expectation).read_text()
    probes = text[text.index("probes:"):]

    assert probes.index("P01_A") < probes.index("P02_B")
    assert probes.index("baseline: 2.0") < probes.index("txt: 1.0")


def test_model_name_with_slash_gets_safe_file(tmp_path):
    path = expectations.expectation_path(tmp_path, "mlx-community/gemma-3-1b-it-4bit")

    assert path.name == "mlx-community_gemma-3-1b-it-4bit.yaml"


def test_missing_file_returns_none(tmp_path):
    assert expectations.load_expectation(tmp_path, "absent") is None


def test_invalid_yaml_names_file(tmp_path):
    (tmp_path / "m.yaml").write_text("probes: [unclosed\n")

    with pytest.raises(ExpectationError, match=r"m\.yaml: invalid YAML"):
        expectations.load_expectation(tmp_path, "m")


def test_non_numeric_score_names_key(tmp_path):
    (tmp_path / "m.yaml").write_text("probes:\n  P01_A:\n    baseline: high\n")

    with pytest.raises(ExpectationError, match=r"probes\.P01_A\.baseline is 'high', expected a number"):
        expectations.load_expectation(tmp_path, "m")


def test_case_gate_message_names_everything(tmp_path):
    expectation = make_expectation({"P07_X": {"json": 12.0}}, path=tmp_path / "m.yaml")

    message = expectations.check_case(expectation, "P07_X", "json", 8.5)

    assert "P07_X" in message
    assert "[json]" in message
    assert "scored 8.50" in message
    assert "recorded baseline 12.00" in message
    assert "m.yaml" in message


def test_case_gate_within_tolerance_passes():
    expectation = make_expectation({"P07_X": {"json": 12.0}}, case_tolerance=2.0)

    assert expectations.check_case(expectation, "P07_X", "json", 10.0) is None
    assert expectations.check_case(expectation, "P07_X", "json", 9.99) is not None


def test_summary_gate_ignores_one_noisy_probe():
    recorded = {f"P{i:02d}": {"baseline": 10.0} for i in range(20)}
    expectation = make_expectation(recorded)
    scores = {f"P{i:02d}": 10.0 for i in range(20)}
    scores["P05"] = -10.0

    check = expectations.check_summary(expectation, "baseline", scores)

    assert check.mean_delta == pytest.approx(-1.0)
    assert check.high >= -expectation.allowed_drop
    assert not check.failed


def test_summary_gate_fails_on_broad_drop():
    recorded = {f"P{i:02d}": {"baseline": 10.0 + i % 3} for i in range(20)}
    expectation = make_expectation(recorded)
    scores = {probe: conditions["baseline"] - 2.0 - (i % 2) * 0.5 for i, (probe, conditions) in enumerate(recorded.items())}

    check = expectations.check_summary(expectation, "baseline", scores)

    assert check.failed
    assert "FAILED" in check.message()
    assert check.high < -0.5


def test_summary_gate_without_overlap_is_empty():
    expectation = make_expectation({"P01": {"baseline": 1.0}})

    check = expectations.check_summary(expectation, "json", {"P01": 5.0})

    assert check.n == 0
    assert not check.failed


def test_comparable_rejects_other_parameters():
    expectation = make_expectation({}, recorded={"params": {"max_tokens": 64}})

    assert expectations.comparable(expectation, {"params": {"max_tokens": 64}}) is None
    assert "max_tokens" in expectations.comparable(expectation, {"params": {"max_tokens": 128}})


def test_merge_keeps_old_probes():
    old = make_expectation({"P01": {"baseline": 1.0}})

    merged = expectations.merge_scores(old, "m", {"P02": {"baseline": 2.0}}, {"params": {}})

    assert merged.scores == {"P01": {"baseline": 1.0}, "P02": {"baseline": 2.0}}
    assert "at" in merged.recorded


def test_published_means_gate_on_mean():
    expectation = expectations.published_expectation("gemma3-4b-it", {"baseline": 21.12}, "models.yaml")

    low = expectations.check_summary(expectation, "baseline", {"P01": 19.0, "P02": 20.0})
    close = expectations.check_summary(expectation, "baseline", {"P01": 21.0, "P02": 21.0})

    assert low.failed
    assert low.mean_delta == pytest.approx(-1.62)
    assert not close.failed


def test_expectation_from_ab_lines():
    lines = [{"id": "P01", "conditions": {"baseline": {"lek_score": 3.0}, "json": {"lek_score": 4.5}}}]

    expectation = expectations.expectation_from_ab_lines("m", lines, "ab.jsonl")

    assert expectation.score("P01", "json") == 4.5
    assert expectation.path == "ab.jsonl"
