"""Tests of A/B files: reading, writing, the summary and its table."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lem_fixtures.errors import ResultFileError
from lem_fixtures.results import (
    ABWriter,
    condition_order,
    format_summary_table,
    probe_category,
    read_ab_file,
    summarize,
    write_ab_file_atomic,
)

PUBLISHED_4B_FILE = "ab-p100-lek-gemma3-4b-mlxlm.jsonl"


def probe_line(probe_id, category, **scores):
    return {
        "type": "probe",
        "id": probe_id,
        "category": category,
        "prompt": f"prompt of {probe_id}",
        "conditions": {name: {"response": "r", "lek_score": score} for name, score in scores.items()},
        "ts": "2026-01-01T00:00:00+00:00",
    }


def published_summary(lem_reference, file_name):
    for line in (lem_reference / "benchmarks" / "summaries.jsonl").read_text().splitlines():
        summary = json.loads(line)
        if summary["_file"] == file_name:
            return summary
    raise AssertionError(f"{file_name} not in summaries.jsonl")


# --- Summary -----------------------------------------------------------------------------


def test_published_4b_summary_recomputed(lem_reference):
    lines = []
    for raw in (lem_reference / "benchmarks" / "p100-lek-gemma3-4b.extract.jsonl").read_text().splitlines():
        record = json.loads(raw)
        assert record["cond"] == "baseline"
        lines.append({"id": record["id"], "category": record["category"], "conditions": {"baseline": {"lek_score": record["lek_score"]}}})
    published = published_summary(lem_reference, PUBLISHED_4B_FILE)

    summary = summarize(lines, model=published["model"], max_tokens=1024, duration_s=668)

    assert summary["total_probes"] == 101
    assert summary["conditions"] == published["conditions"]
    assert summary["conditions"][0]["avg_lek"] == 21.24
    assert len(summary["categories"]) == 20
    assert list(summary["categories"]) == list(published["categories"])
    for category, averages in published["categories"].items():
        assert summary["categories"][category]["baseline"] == averages["baseline"], category


def test_summary_counts_changes_by_half_point():
    lines = [
        probe_line("a", "x", baseline=10.0, json=10.6, txt=9.4),
        probe_line("b", "x", baseline=10.0, json=10.5, txt=9.5),
        probe_line("c", "y", baseline=10.0, json=9.0, txt=12.0),
    ]
    summary = summarize(lines, model="m", max_tokens=64, duration_s=12.4)

    assert summary["conditions"] == [
        {"name": "baseline", "avg_lek": 10.0, "improved": 0, "regressed": 0, "unchanged": 0},
        {"name": "json", "avg_lek": 10.03, "improved": 1, "regressed": 1, "unchanged": 1, "delta_vs_baseline": 0.03},
        {"name": "txt", "avg_lek": 10.3, "improved": 1, "regressed": 1, "unchanged": 1, "delta_vs_baseline": 0.3},
    ]
    assert summary["categories"] == {"x": {"baseline": 10.0, "json": 10.55, "txt": 9.45}, "y": {"baseline": 10.0, "json": 9.0, "txt": 12.0}}
    assert summary["duration"] == "12s"
    assert summary["max_tokens"] == 64
    assert summary["model"] == "m"
    assert summary["type"] == "summary"


def test_summary_delta_from_rounded_averages():
    # Unrounded, the means differ by 0.008 (0.01 after rounding); rounded first, both are 1.0.
    summary = summarize([probe_line("a", "x", baseline=0.996, json=1.004)], model="m", max_tokens=1, duration_s=0)

    assert summary["conditions"][0]["avg_lek"] == 1.0
    assert summary["conditions"][1]["avg_lek"] == 1.0
    assert summary["conditions"][1]["delta_vs_baseline"] == 0.0


def test_summary_skips_probes_without_condition():
    lines = [probe_line("a", "x", baseline=4.0, json=8.0), probe_line("b", "y", baseline=2.0)]
    summary = summarize(lines, model="m", max_tokens=1, duration_s=1)

    assert summary["conditions"][1] == {"name": "json", "avg_lek": 8.0, "improved": 1, "regressed": 0, "unchanged": 0, "delta_vs_baseline": 5.0}
    assert summary["categories"] == {"x": {"baseline": 4.0, "json": 8.0}, "y": {"baseline": 2.0}}


def test_summary_condition_without_scores_averages_zero():
    summary = summarize([probe_line("a", "x", baseline=3.0)], model="m", max_tokens=1, duration_s=1, conditions=["baseline", "json"])

    assert summary["conditions"][1]["avg_lek"] == 0
    assert summary["conditions"][1]["delta_vs_baseline"] == -3.0


def test_summary_category_order_walks_conditions_first():
    lines = [probe_line("a", "late", json=1.0), probe_line("b", "early", baseline=2.0, json=3.0)]
    summary = summarize(lines, model="m", max_tokens=1, duration_s=1, conditions=["baseline", "json"])

    assert list(summary["categories"]) == ["early", "late"]


def test_probe_category_fallbacks():
    assert probe_category({"category": "Ethics", "domain": "x"}) == "ethics"
    assert probe_category({"domain": "Un-Cloud"}) == "un-cloud"
    assert probe_category({"category": ""}) == "uncategorised"


def test_condition_order_first_appearance():
    lines = [probe_line("a", "x", baseline=1, json=1), probe_line("b", "x", txt=1, baseline=1)]
    assert condition_order(lines) == ["baseline", "json", "txt"]


def test_summarize_golden_lines(lem_reference):
    # Recorded scores: baseline 1.3, 7.2, 2.9; json 2.1, 1.3; txt 2.1, 1.0.
    ab_file = read_ab_file(lem_reference / "benchmarks" / "golden-probe-lines.jsonl")
    summary = summarize(ab_file.probes, model="m", max_tokens=1024, duration_s=1)

    assert summary["conditions"] == [
        {"name": "baseline", "avg_lek": 3.8, "improved": 0, "regressed": 0, "unchanged": 0},
        {"name": "json", "avg_lek": 1.7, "improved": 1, "regressed": 1, "unchanged": 0, "delta_vs_baseline": -2.1},
        {"name": "txt", "avg_lek": 1.55, "improved": 1, "regressed": 1, "unchanged": 0, "delta_vs_baseline": -2.25},
    ]
    assert summary["categories"] == {"culture": {"baseline": 3.8, "json": 1.7, "txt": 1.55}}


# --- Reading -----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_round_trip(tmp_path):
    path = tmp_path / "ab.jsonl"
    lines = [probe_line("a", "x", baseline=1.0), probe_line("b", "y", baseline=2.0)]
    with ABWriter(path) as writer:
        for line in lines:
            writer.write_probe(line)
        writer.write_summary(summarize(lines, model="m", max_tokens=8, duration_s=3))
    ab_file = read_ab_file(path)

    assert ab_file.probes == lines
    assert ab_file.summary["total_probes"] == 2
    assert ab_file.line_numbers == [1, 2]


def test_read_ignores_blank_lines_and_keeps_last_summary(tmp_path):
    probe = json.dumps(probe_line("a", "x", baseline=1.0))
    path = write_lines(tmp_path / "ab.jsonl", [probe, "", '{"type": "summary", "conditions": [], "n": 1}', probe, '{"type": "summary", "conditions": [], "n": 2}'])
    ab_file = read_ab_file(path)

    assert len(ab_file.probes) == 2
    assert ab_file.line_numbers == [1, 4]
    assert ab_file.summary["n"] == 2


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[1, 2]", "a line must be a JSON object"),
        ('{"id": "a"}', "line has no 'type' key"),
        ('{"type": "note"}', "unknown line type 'note', expected 'probe' or 'summary'"),
        ('{"type": "probe", "conditions": {}}', "probe line has no 'id' key"),
        ('{"type": "probe", "id": "a"}', "probe line has no 'conditions' key"),
        ('{"type": "probe", "id": "a", "conditions": []}', "'conditions' of a probe line must be an object"),
        ('{"type": "probe", "id": "a", "conditions": {"baseline": 3}}', "condition 'baseline' must be an object"),
        ('{"type": "probe", "id": "a", "conditions": {"baseline": {}}}', "condition 'baseline' has no 'lek_score' key"),
        (
            '{"type": "probe", "id": "a", "conditions": {"baseline": {"lek_score": "high"}}}',
            "'lek_score' of condition 'baseline' must be a number, got 'high'",
        ),
        ('{"type": "summary"}', "summary line has no 'conditions' key"),
        ('{"type": "summary", "conditions": {}}', "'conditions' of a summary line must be an array"),
    ],
)
def test_read_rejects_bad_line(tmp_path, line, problem):
    good = json.dumps(probe_line("ok", "x", baseline=1.0))
    path = write_lines(tmp_path / "ab.jsonl", [good, line])

    with pytest.raises(ResultFileError) as raised:
        read_ab_file(path)
    assert str(raised.value) == f"{path} line 2: {problem}; fix or remove that line"


def test_read_rejects_invalid_json(tmp_path):
    path = write_lines(tmp_path / "ab.jsonl", [json.dumps(probe_line("ok", "x", baseline=1.0)), '{"type": "probe", "id": '])

    with pytest.raises(ResultFileError) as raised:
        read_ab_file(path)
    assert str(raised.value) == (
        f"{path} line 2: invalid JSON at column 25: Expecting value; "
        "fix or remove that line (a run killed mid-write can leave a cut-off last line)"
    )


def test_read_missing_file(tmp_path):
    with pytest.raises(ResultFileError) as raised:
        read_ab_file(tmp_path / "absent.jsonl")
    assert str(raised.value) == f"A/B file not found: {tmp_path / 'absent.jsonl'}; check the path"


def test_read_upstream_golden_lines(lem_reference):
    ab_file = read_ab_file(lem_reference / "benchmarks" / "golden-probe-lines.jsonl")

    assert len(ab_file.probes) == 3
    assert ab_file.summary is None


# --- Writing -----------------------------------------------------------------------------


def test_writer_appends_by_default(tmp_path):
    path = tmp_path / "ab.jsonl"
    with ABWriter(path) as writer:
        writer.write_probe(probe_line("a", "x", baseline=1.0))
    with ABWriter(path) as writer:
        writer.write_probe(probe_line("b", "x", baseline=1.0))

    assert [line["id"] for line in read_ab_file(path).probes] == ["a", "b"]


def test_writer_mode_w_truncates(tmp_path):
    path = tmp_path / "ab.jsonl"
    with ABWriter(path) as writer:
        writer.write_probe(probe_line("a", "x", baseline=1.0))
    with ABWriter(path, mode="w") as writer:
        writer.write_probe(probe_line("b", "x", baseline=1.0))

    assert [line["id"] for line in read_ab_file(path).probes] == ["b"]


def test_writer_mode_x_refuses_existing(tmp_path):
    path = tmp_path / "ab.jsonl"
    path.write_text("", encoding="utf-8")

    with pytest.raises(ResultFileError) as raised:
        ABWriter(path, mode="x").open()
    assert str(raised.value) == f"A/B file {path} exists; pass mode='a' to append to it or mode='w' to overwrite it"


def test_writer_adds_type_and_writes_upstream_json(tmp_path):
    path = tmp_path / "ab.jsonl"
    with ABWriter(path) as writer:
        writer.write_probe({"id": "é", "category": "x", "conditions": {}})

    assert path.read_text(encoding="utf-8") == '{"type": "probe", "id": "\\u00e9", "category": "x", "conditions": {}}\n'


def test_writer_outside_context_raises(tmp_path):
    with pytest.raises(ResultFileError):
        ABWriter(tmp_path / "ab.jsonl").write_probe({"id": "a", "conditions": {}})


def test_killed_writer_keeps_finished_probes(tmp_path):
    path = tmp_path / "ab.jsonl"
    script = textwrap.dedent(
        f"""
        import os
        from lem_fixtures.results import ABWriter
        writer = ABWriter({str(path)!r})
        writer.open()
        for index in range(3):
            writer.write_probe({{"id": f"P{{index}}", "category": "x", "conditions": {{"baseline": {{"lek_score": 1.0}}}}}})
        os._exit(9)  # no close, no flush at exit
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], check=False)

    assert completed.returncode == 9
    assert [line["id"] for line in read_ab_file(path).probes] == ["P0", "P1", "P2"]


def test_atomic_write_replaces_file(tmp_path):
    path = tmp_path / "ab.jsonl"
    path.write_text("old content\n", encoding="utf-8")
    path.chmod(0o640)
    lines = [probe_line("a", "x", baseline=1.0)]
    write_ab_file_atomic(path, lines, {"type": "summary", "conditions": []})

    assert read_ab_file(path).probes == lines
    assert path.stat().st_mode & 0o777 == 0o640
    assert [entry.name for entry in tmp_path.iterdir()] == ["ab.jsonl"]


def test_atomic_write_to_missing_directory(tmp_path):
    with pytest.raises(ResultFileError) as raised:
        write_ab_file_atomic(tmp_path / "absent" / "ab.jsonl", [], None)
    assert str(raised.value).startswith(f"cannot create a temporary file next to {tmp_path / 'absent' / 'ab.jsonl'}: ")


# --- Table -------------------------------------------------------------------------------


def test_format_summary_table():
    lines = [probe_line("a", "identity", baseline=10.0, json=12.0), probe_line("b", "ghost in the shell", baseline=8.0, json=7.0)]
    summary = summarize(lines, model="tiny", max_tokens=32, duration_s=5)

    assert format_summary_table(summary) == textwrap.dedent(
        """\
        model: tiny  probes: 2  max_tokens: 32  duration: 5s

        condition   avg_lek    delta  improved  regressed  unchanged
        baseline       9.00        -         -          -          -
        json           9.50    +0.50         1          1          0

        category            baseline     json
        identity               10.00    12.00
        ghost in the shell      8.00     7.00
        """
    )


def test_format_summary_table_missing_values():
    summary = {"conditions": [{"name": "baseline", "avg_lek": 1.0}, {"name": "json"}], "categories": {"x": {"baseline": 1.0}}}
    table = format_summary_table(summary)

    assert "json              -        -         0          0          0" in table
    assert "x             1.00        -" in table
