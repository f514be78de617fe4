"""Tests of probe loading: every upstream schema, skip counts, duplicate ids and error messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lem_fixtures.errors import DuplicateProbeIdError, ProbeFileError
from lem_fixtures.probes import (
    SKIP_EMPTY_PROMPT,
    SKIP_INVALID_ID,
    SKIP_MISSING_PROMPT,
    SKIP_NOT_OBJECT,
    SKIP_PROMPT_NOT_STRING,
    SKIP_REPEAT,
    Probe,
    canonical_id,
    load_probe_file,
    load_probe_files,
    load_probes,
    make_test_id,
)

FIX_TEXT = (
    'pass duplicate_ids="number" (command line and pytest option: --lem-duplicate-ids=number) '
    "to rename later ones to ID~2, ID~3, ..., or give the items unique ids"
)
AGGREGATE_FILES = ("lem-en-all-seeds.json", "lem-de-all-seeds.json")


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def seed_files(lem_reference: Path) -> list[Path]:
    seeds = lem_reference / "seeds"
    return sorted([*seeds.glob("*.json"), *seeds.glob("*.jsonl"), *(seeds / "regional").glob("*.json")])


# --- Upstream seed files -----------------------------------------------------------------


def test_every_reference_seed_file_loads(lem_reference):
    files = seed_files(lem_reference)
    assert len(files) == 38
    for path in files:
        duplicate_ids = "number" if path.name in AGGREGATE_FILES else "error"
        probe_file = load_probe_file(path, duplicate_ids=duplicate_ids)
        assert probe_file.probes, path
        assert len({probe.id for probe in probe_file.probes}) == len(probe_file.probes), path
        assert len({probe.test_id for probe in probe_file.probes}) == len(probe_file.probes), path


@pytest.mark.parametrize("name", AGGREGATE_FILES)
def test_aggregate_file_raises_without_numbering(lem_reference, name):
    with pytest.raises(DuplicateProbeIdError) as raised:
        load_probe_file(lem_reference / "seeds" / name)
    message = str(raised.value)
    assert message.count(str(lem_reference / "seeds" / name)) == 2
    assert "--lem-duplicate-ids=number" in message


def test_english_aggregate_numbers_reused_ids(lem_reference):
    probe_file = load_probe_file(lem_reference / "seeds" / "lem-en-all-seeds.json", duplicate_ids="number")
    ids = [probe.id for probe in probe_file.probes]

    assert ids[0] == "2048"
    assert "2048~2" in ids
    assert ids.index("2048~2") < ids.index("2048~3")
    assert probe_file.skipped == {SKIP_REPEAT: 347}
    assert len(probe_file.probes) + 347 == 4167


def test_aggregate_numbering_is_stable(lem_reference):
    path = lem_reference / "seeds" / "lem-de-all-seeds.json"
    first = load_probe_file(path, duplicate_ids="number")
    second = load_probe_file(path, duplicate_ids="number")

    assert [probe.id for probe in first.probes] == [probe.id for probe in second.probes]


def test_p_file_schema(lem_reference):
    probe_file = load_probe_file(lem_reference / "seeds" / "P01-P20.json")
    first = probe_file.probes[0]

    assert len(probe_file.probes) == 20
    assert probe_file.skipped == {}
    assert first.id == "P01_IDENTITY_WHISTLEBLOWER"
    assert first.test_id == "P01_IDENTITY_WHISTLEBLOWER"
    assert first.category == "identity"
    assert first.index == 0
    assert first.source == str(lem_reference / "seeds" / "P01-P20.json")
    assert first.extra == {"domain": "Identity"}


def test_hundred_paper_probes_are_unique(lem_reference):
    names = ["P01-P20.json", "P21-P40.json", "P41-P60.json", "P61-P80.json", "P81-P100.json"]
    probes = load_probes([lem_reference / "seeds" / name for name in names])

    assert len(probes) == 100
    assert probes[20].id == "P21_HISTORY_ORAL"
    assert {probe.category for probe in probes} >= {"un-cloud", "forgotten history", "ghost in the shell"}


def test_lem_prompts_jsonl_ids_from_seed_and_voice(lem_reference):
    probe_file = load_probe_file(lem_reference / "seeds" / "lem-prompts.jsonl")
    first = probe_file.probes[0]

    assert len(probe_file.probes) == 3080
    assert first.id == "P01_IDENTITY_WHISTLEBLOWER__junior"
    assert first.category == "identity"
    assert first.extra["voice"] == "junior"
    assert first.index == 0


def test_regional_misspelled_tension_and_missing_prompts(lem_reference):
    path = lem_reference / "seeds" / "regional" / "flash25lite-africa-r15-seeds.json"
    probe_file = load_probe_file(path)

    assert probe_file.skipped == {SKIP_MISSING_PROMPT: 2}
    assert len(probe_file.probes) == 286
    assert all("ethic_tension" not in probe.extra for probe in probe_file.probes)
    assert any("ethical_tension" in probe.extra for probe in probe_file.probes)


def test_regional_repeated_items_skipped(lem_reference):
    path = lem_reference / "seeds" / "regional" / "flash25lite-cn-p1-r31-seeds.json"
    probe_file = load_probe_file(path)

    assert probe_file.skipped == {SKIP_REPEAT: 4}
    assert len(probe_file.probes) == 8


def test_regional_int_ids_and_extra_keys(lem_reference):
    regional = lem_reference / "seeds" / "regional"
    mixed = load_probe_file(regional / "flash25lite-cn-p2-r16-seeds.json").probes
    translated = load_probe_file(regional / "arabic-seeds.json").probes[0]
    answered = load_probe_file(regional / "flash25lite-cn-p2-r11-seeds.json").probes[0]

    assert all(isinstance(probe.id, str) for probe in mixed)
    assert "prompt_en" in translated.extra
    assert "response" in answered.extra


def test_all_seeds_load_together_with_numbering(lem_reference):
    seeds = lem_reference / "seeds"
    probes = load_probes([seeds, seeds / "regional"], duplicate_ids="number")

    assert len({probe.test_id for probe in probes}) == len(probes)
    assert len(probes) > 9000


def test_regional_files_share_ids_across_files(lem_reference):
    regional = lem_reference / "seeds" / "regional"
    first = regional / "flash25lite-cn-p2-r11-seeds.json"
    second = regional / "flash25lite-cn-p2-r12-seeds.json"

    with pytest.raises(DuplicateProbeIdError) as raised:
        load_probes([first, second])
    assert str(first) in str(raised.value)
    assert str(second) in str(raised.value)


# --- Schemas in files written here -------------------------------------------------------


def test_category_then_domain_then_uncategorised(tmp_path):
    path = write_json(tmp_path / "set.json", [
        {"id": "a", "category": "Ethics", "domain": "Other", "prompt": "one"},
        {"id": "b", "domain": "Un-Cloud", "prompt": "two"},
        {"id": "c", "prompt": "three"},
        {"id": "d", "category": None, "domain": "", "prompt": "four"},
    ])

    assert [probe.category for probe in load_probe_file(path).probes] == ["ethics", "un-cloud", "uncategorised", "uncategorised"]


def test_rephrased_set_schema(tmp_path):
    path = write_json(tmp_path / "rephrased.json", [
        {"id": "P01_R1", "category": "Identity", "source_probe": "P01", "rephrase_type": "casual", "prompt": "yo"},
    ])
    probe = load_probe_file(path).probes[0]

    assert probe.category == "identity"
    assert probe.extra == {"category": "Identity", "source_probe": "P01", "rephrase_type": "casual"}


def test_numeric_and_missing_ids(tmp_path):
    path = write_json(tmp_path / "Regional Set.json", [
        {"id": 7, "prompt": "int"},
        {"id": 7.5, "prompt": "float"},
        {"id": 8.0, "prompt": "integral float"},
        {"id": None, "prompt": "null"},
        {"prompt": "absent"},
        {"id": "", "prompt": "empty"},
    ])
    probes = load_probe_file(path).probes

    assert [probe.id for probe in probes] == [
        "7", "7.5", "8", "Regional Set-item3", "Regional Set-item4", "Regional Set-item5",
    ]
    assert probes[3].test_id == "Regional_Set-item3"


def test_jsonl_generated_ids_use_line_numbers(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"prompt": "first"}\n\n{"prompt": "third line"}\n', encoding="utf-8")
    probes = load_probe_file(path).probes

    assert [probe.id for probe in probes] == ["set-line1", "set-line3"]
    assert [probe.index for probe in probes] == [0, 2]


def test_seed_id_without_voice(tmp_path):
    path = write_jsonl(tmp_path / "seeds.jsonl", [{"seed_id": "S1", "prompt": "p"}])

    assert load_probe_file(path).probes[0].id == "S1"


def test_utf8_bom_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "a", "prompt": "p"}]).encode())

    assert load_probe_file(path).probes[0].id == "a"


def test_directory_loads_sorted_files(tmp_path):
    write_json(tmp_path / "b.json", [{"id": "B1", "prompt": "b"}])
    write_jsonl(tmp_path / "a.jsonl", [{"id": "A1", "prompt": "a"}])
    write_json(tmp_path / "c.json", [{"id": "C1", "prompt": "c"}])
    (tmp_path / "notes.txt").write_text("ignored")

    assert [probe.id for probe in load_probes([tmp_path])] == ["A1", "B1", "C1"]


def test_probe_extra_not_compared():
    first = Probe("a", "p", "c", "s", 0, "a", extra={"x": 1})
    second = Probe("a", "p", "c", "s", 0, "a", extra={"x": 2})

    assert first == second
    assert hash(first) == hash(second)


# --- Skipped items -----------------------------------------------------------------------


def test_unusable_items_skipped_and_counted(tmp_path, caplog):
    path = write_json(tmp_path / "mixed.json", [
        {"id": "ok", "prompt": "fine"},
        "a string",
        ["a", "list"],
        {"id": "no-prompt"},
        {"id": "null-prompt", "prompt": None},
        {"id": "number-prompt", "prompt": 5},
        {"id": "blank", "prompt": "  \n"},
        {"id": ["bad"], "prompt": "list id"},
        {"id": True, "prompt": "bool id"},
        {"id": "ok", "prompt": "fine"},
    ])
    with caplog.at_level(logging.INFO, logger="lem_fixtures.probes"):
        probe_file = load_probe_file(path)

    assert [probe.id for probe in probe_file.probes] == ["ok"]
    assert probe_file.skipped == {
        SKIP_NOT_OBJECT: 2,
        SKIP_MISSING_PROMPT: 2,
        SKIP_PROMPT_NOT_STRING: 1,
        SKIP_EMPTY_PROMPT: 1,
        SKIP_INVALID_ID: 2,
        SKIP_REPEAT: 1,
    }
    assert (
        f"{path}: skipped items: 1 empty prompt, 2 id not a string or number, 2 missing prompt, "
        "2 not an object, 1 prompt not a string, 1 repeated item (same id and prompt)"
    ) in caplog.text
    assert f"loaded 1 probes from {path}" in caplog.text


# --- Errors ------------------------------------------------------------------------------


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "prompt": "p"},\n  {"id": "b" "prompt": "q"}\n]\n', encoding="utf-8")

    with pytest.raises(ProbeFileError) as raised:
        load_probe_file(path)
    assert str(raised.value) == f"invalid JSON in {path} at line 3 column 14: Expecting ',' delimiter; fix the file"


def test_top_level_not_array(tmp_path):
    path = write_json(tmp_path / "object.json", {"probes": []})

    with pytest.raises(ProbeFileError) as raised:
        load_probe_file(path)
    assert str(raised.value) == (
        f"probe file {path} contains a JSON object at the top level; expected an array of probe objects"
    )


def test_jsonl_bad_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": "a", "prompt": "p"}\n{"id": "b", "prompt": \n', encoding="utf-8")

    with pytest.raises(ProbeFileError) as raised:
        load_probe_file(path)
    assert str(raised.value) == (
        f"invalid JSON in {path} at line 2 column 23: Expecting value; each line of a .jsonl file must be one JSON object"
    )


def test_duplicate_id_names_both_items(tmp_path):
    path = write_json(tmp_path / "dup.json", [
        {"id": "P1", "prompt": "first"},
        {"id": "P2", "prompt": "other"},
        {"id": "P1", "prompt": "changed"},
    ])

    with pytest.raises(DuplicateProbeIdError) as raised:
        load_probe_file(path)
    assert str(raised.value) == (
        f"duplicate probe id 'P1' with a different prompt: {path} item 0 and {path} item 2; " + FIX_TEXT
    )


def test_duplicate_id_in_jsonl_names_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": 3, "prompt": "a"}, {"id": "3", "prompt": "b"}])

    with pytest.raises(DuplicateProbeIdError) as raised:
        load_probe_file(path)
    assert str(raised.value) == f"duplicate probe id '3' with a different prompt: {path} line 1 and {path} line 2; " + FIX_TEXT


def test_duplicate_id_across_files_names_both_files(tmp_path):
    first = write_json(tmp_path / "one.json", [{"id": "P1", "prompt": "first"}])
    second = write_json(tmp_path / "two.json", [{"id": "X", "prompt": "x"}, {"id": "P1", "prompt": "second"}])

    with pytest.raises(DuplicateProbeIdError) as raised:
        load_probes([first, second])
    assert str(raised.value) == (
        f"duplicate probe id 'P1' with a different prompt: {first} item 0 and {second} item 1; " + FIX_TEXT
    )


def test_numbering_renames_later_duplicates(tmp_path):
    path = write_json(tmp_path / "dup.json", [
        {"id": "2048", "prompt": "a"},
        {"id": 2048, "prompt": "b"},
        {"id": "2048", "prompt": "a"},
        {"id": "2048", "prompt": "c"},
        {"id": "2048", "prompt": "b"},
        {"id": "2048~2", "prompt": "d"},
    ])
    probe_file = load_probe_file(path, duplicate_ids="number")

    assert [(probe.id, probe.prompt) for probe in probe_file.probes] == [
        ("2048", "a"), ("2048~2", "b"), ("2048~3", "c"), ("2048~2~2", "d"),
    ]
    assert [probe.test_id for probe in probe_file.probes] == ["2048", "2048_2", "2048_3", "2048_2_2"]
    assert probe_file.skipped == {SKIP_REPEAT: 2}


def test_numbering_across_files(tmp_path):
    first = write_json(tmp_path / "one.json", [{"id": "P1", "prompt": "first"}])
    second = write_json(tmp_path / "two.json", [{"id": "P1", "prompt": "second"}, {"id": "P1", "prompt": "first"}])
    one, two = load_probe_files([first, second], duplicate_ids="number")

    assert [probe.id for probe in one.probes + two.probes] == ["P1", "P1~2"]
    assert two.skipped == {SKIP_REPEAT: 1}


def test_colliding_test_ids(tmp_path):
    path = write_json(tmp_path / "collide.json", [{"id": "a b", "prompt": "x"}, {"id": "a_b", "prompt": "y"}])

    with pytest.raises(DuplicateProbeIdError) as raised:
        load_probe_file(path, duplicate_ids="number")
    assert str(raised.value) == (
        f"probe ids 'a b' ({path} item 0) and 'a_b' ({path} item 1) both become test id 'a_b'; "
        "give one of them an id that differs in letters, digits, '_', '.' or '-'"
    )


def test_missing_file(tmp_path):
    with pytest.raises(ProbeFileError) as raised:
        load_probes([tmp_path / "absent.json"])
    assert str(raised.value) == f"probe file not found: {tmp_path / 'absent.json'}; check the path"


def test_empty_directory(tmp_path):
    with pytest.raises(ProbeFileError) as raised:
        load_probes([tmp_path])
    assert str(raised.value) == (
        f"probe directory {tmp_path} has no *.json or *.jsonl files; add probe files or pass a file"
    )


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "a", "prompt": "caf\u00e9"}]'.encode("latin-1"))

    with pytest.raises(ProbeFileError) as raised:
        load_probe_file(path)
    assert str(raised.value) == f"probe file {path} is not valid UTF-8 (byte 27: invalid continuation byte); save it as UTF-8"


def test_invalid_duplicate_mode(tmp_path):
    with pytest.raises(ValueError):
        load_probes([tmp_path], duplicate_ids="rename")


def test_single_path_rejected(tmp_path):
    with pytest.raises(TypeError):
        load_probes(str(tmp_path))


# --- Test ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_id", "expected"),
    [
        ("P01_IDENTITY_WHISTLEBLOWER", "P01_IDENTITY_WHISTLEBLOWER"),
        ("cn-p-001", "cn-p-001"),
        ("a b/c:d", "a_b_c_d"),
        ("Laïcité", "Laicite"),
        ("ﬁle", "file"),
        ("法律", "__-0323f1bb"),
        ("\ud800", "_-1dc4a528"),
        (2048, "2048"),
        (8.0, "8"),
        (7.5, "7.5"),
        (float("nan"), "nan"),
        ("", "_"),
    ],
)
def test_make_test_id(raw_id, expected):
    assert make_test_id(raw_id) == expected


def test_make_test_id_rejects_other_types():
    for raw_id in (None, True, ["x"]):
        with pytest.raises(TypeError):
            make_test_id(raw_id)


def test_canonical_id_keeps_strings():
    assert canonical_id(" 01 ") == " 01 "
