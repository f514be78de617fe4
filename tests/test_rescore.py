"""Tests of `lem score`: re-scoring A/B files with v2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lem_fixtures import rescore
from lem_fixtures.results import read_ab_file
from lem_fixtures.scoring import score_v2


def make_file(path, lines, summary=None):
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if summary is not None:
        text += json.dumps(summary) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def probe(probe_id, category, **responses):
    return {
        "type": "probe",
        "id": probe_id,
        "category": category,
        "prompt": "p",
        "conditions": {
            name: {"response": text, "lek_score": 99.0, "heuristic": {"old": 1}, "chars": len(text), "time_s": 1.5}
            for name, text in responses.items()
        },
        "ts": "2026-01-01T00:00:00+00:00",
    }


OLD_SUMMARY = {
    "type": "summary",
    "model": "/models/old",
    "total_probes": 2,
    "conditions": [{"name": "baseline", "avg_lek": 99.0}, {"name": "txt", "avg_lek": 99.0}, {"name": "json", "avg_lek": 99.0}],
    "categories": {},
    "duration": "227s",
    "max_tokens": 1024,
    "ts": "2026-02-18T13:12:54.956419+00:00",
}


def test_rescore_rewrites_scores_and_summary(tmp_path, capsys):
    lines = [
        probe("P1", "Ethics", baseline="<pad>", json="I cannot help.", txt="However, consent matters here.\n\nReally?"),
        probe("P2", "identity", baseline="Imagine a river of trust and hope, flowing on.", json="x" * 30, txt="Sure."),
    ]
    path = make_file(tmp_path / "ab.jsonl", lines, OLD_SUMMARY)

    assert rescore.main(["--input", str(path)]) == 0

    ab_file = read_ab_file(path)
    for line, original in zip(ab_file.probes, lines):
        for name, entry in line["conditions"].items():
            expected = score_v2(original["conditions"][name]["response"])
            assert entry["heuristic"] == expected
            assert entry["lek_score"] == expected["lek_score"]
            assert entry["time_s"] == 1.5
    summary = ab_file.summary
    assert [entry["name"] for entry in summary["conditions"]] == ["baseline", "txt", "json"]
    assert summary["conditions"][0]["avg_lek"] == round((score_v2("<pad>")["lek_score"] + score_v2(lines[1]["conditions"]["baseline"]["response"])["lek_score"]) / 2, 2)
    for key in ("model", "duration", "max_tokens", "ts"):
        assert summary[key] == OLD_SUMMARY[key]
    assert list(summary["categories"]) == ["ethics", "identity"]

    output = capsys.readouterr().out
    assert output.startswith("model: /models/old  probes: 2  max_tokens: 1024  duration: 227s\n")
    assert "improved" in output
    assert "ethics" in output


def test_rescore_to_output_leaves_input(tmp_path, capsys):
    path = make_file(tmp_path / "ab.jsonl", [probe("P1", "x", baseline="Certainly! Here it is.")])
    before = path.read_bytes()
    output = tmp_path / "out.jsonl"

    assert rescore.main(["--input", str(path), "--output", str(output)]) == 0

    assert path.read_bytes() == before
    rescored = read_ab_file(output)
    assert rescored.probes[0]["conditions"]["baseline"]["heuristic"]["formulaic_preamble"] == 1
    assert rescored.summary["model"] is None
    assert rescored.summary["total_probes"] == 1


def test_rescore_upstream_golden_lines(lem_reference, tmp_path, capsys):
    path = tmp_path / "golden.jsonl"
    shutil.copyfile(lem_reference / "benchmarks" / "golden-probe-lines.jsonl", path)
    original = read_ab_file(path)

    assert rescore.main(["--input", str(path)]) == 0

    rescored = read_ab_file(path)
    assert rescored.probes == original.probes  # every recorded v2 dict is reproduced
    assert rescored.summary["conditions"][0]["avg_lek"] == 3.8


def test_rescore_missing_response(tmp_path, capsys):
    line = probe("P1", "x", baseline="text")
    del line["conditions"]["baseline"]["response"]
    path = make_file(tmp_path / "ab.jsonl", [line])

    assert rescore.main(["--input", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"lem: error: {path} line 1: condition 'baseline' of probe 'P1' has no 'response' text, so it cannot be re-scored\n"
    )


def test_rescore_empty_file(tmp_path, capsys):
    path = tmp_path / "ab.jsonl"
    path.write_text("", encoding="utf-8")

    assert rescore.main(["--input", str(path)]) == 1
    assert "has no probe lines, so there is nothing to re-score" in capsys.readouterr().err
    assert path.read_text() == ""


def test_rescore_recomputes_chars(tmp_path, capsys):
    line = probe("P1", "x", baseline="four")
    line["conditions"]["baseline"]["chars"] = 999
    path = make_file(tmp_path / "ab.jsonl", [line])

    assert rescore.main(["--input", str(path)]) == 0
    assert read_ab_file(path).probes[0]["conditions"]["baseline"]["chars"] == 4


def test_rescore_invalid_json(tmp_path, capsys):
    path = tmp_path / "ab.jsonl"
    path.write_text('{"type": "probe"\n', encoding="utf-8")

    assert rescore.main(["--input", str(path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"lem: error: {path} line 1: invalid JSON at column 17: Expecting ',' delimiter;")
    assert error.count("\n") == 1


def test_rescore_missing_input(tmp_path, capsys):
    assert rescore.main(["--input", str(tmp_path / "absent.jsonl")]) == 1
    assert capsys.readouterr().err == f"lem: error: A/B file not found: {tmp_path / 'absent.jsonl'}; check the path\n"


def test_rescore_requires_input(capsys):
    with pytest.raises(SystemExit) as raised:
        rescore.main([])
    assert raised.value.code == 2


def test_lem_score_command_line(tmp_path):
    path = make_file(tmp_path / "ab.jsonl", [probe("P1", "x", baseline="Hello there, a fine answer.")])
    completed = subprocess.run(
        [sys.executable, "-m", "lem_fixtures.cli", "score", "--input", str(path)], capture_output=True, text=True
    )

    assert completed.returncode == 0, completed.stderr
    assert "baseline" in completed.stdout
