"""Tests of the v2 scorer against recorded upstream dicts, its quirks, and a plain oracle."""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lem_fixtures import scoring
from lem_fixtures.scoring import HEURISTIC_KEYS, lek_score_from_counts, score_v2
from reference import plain_score_v2

SCORE_KEYS = [*HEURISTIC_KEYS, "lek_score"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assert_same_dict(got: dict, expected: dict) -> None:
    assert list(got) == SCORE_KEYS
    for key in SCORE_KEYS:
        assert got[key] == expected[key], f"{key}: got {got[key]!r}, recorded {expected[key]!r}"


# --- Recorded upstream dicts -------------------------------------------------------------


def test_golden_probe_lines_reproduced(lem_reference):
    lines = read_jsonl(lem_reference / "benchmarks" / "golden-probe-lines.jsonl")
    checked = 0
    for line in lines:
        for condition, entry in line["conditions"].items():
            got = score_v2(entry["response"])
            assert_same_dict(got, entry["heuristic"])
            assert got["lek_score"] == entry["lek_score"], (line["id"], condition)
            checked += 1
    assert checked == 7


def test_golden_responses_reproduced(lem_reference):
    records = read_jsonl(lem_reference / "benchmarks" / "golden-responses.jsonl")
    assert records
    for record in records:
        got = score_v2(record["response"])
        assert_same_dict(got, record["heuristic"])
        assert got["lek_score"] == record["lek_score"]


def test_training_valid_messages_reproduced(lem_reference):
    examples = read_jsonl(lem_reference / "training" / "valid.jsonl")
    expected = read_jsonl(lem_reference / "benchmarks" / "v2-expected-training-valid.jsonl")
    assert len(expected) == 458
    mismatches = []
    for record in expected:
        text = examples[record["line"] - 1]["messages"][record["message"]]["content"]
        got = score_v2(text)
        assert list(got) == SCORE_KEYS
        differing = {key: (got[key], record["heuristic"][key]) for key in SCORE_KEYS if got[key] != record["heuristic"][key]}
        if differing:
            mismatches.append((record["line"], record["message"], differing))
    assert mismatches == []


@pytest.mark.parametrize("name", ["v2-recorded-dicts.jsonl", "p100-lek-gemma3-4b.extract.jsonl"])
def test_recorded_counts_give_recorded_score(lem_reference, name):
    records = read_jsonl(lem_reference / "benchmarks" / name)
    assert records
    for record in records:
        heuristic = record["heuristic"]
        assert lek_score_from_counts(heuristic) == heuristic["lek_score"], record["id"]
        assert heuristic["lek_score"] == record["lek_score"], record["id"]


# --- Keys, types and the score formula ---------------------------------------------------


def test_keys_in_spec_order():
    assert list(score_v2("Hello there, this is a plain answer.")) == SCORE_KEYS


def test_counts_are_ints_except_degeneration():
    result = score_v2("word " * 30)
    for key in HEURISTIC_KEYS:
        if key != "degeneration":
            assert type(result[key]) is int, key
    assert result["degeneration"] == 1
    assert isinstance(result["lek_score"], float)


def test_score_formula_applies_caps_and_penalties():
    counts = dict.fromkeys(HEURISTIC_KEYS, 0)
    counts.update(compliance_markers=3, formulaic_preamble=1, degeneration=0.5, empty_broken=1)
    counts.update(first_person=100, creative_form=100, engagement_depth=100, emotional_register=100)
    counts.update(nuance=100, specificity=100, axiom_resonance=100, perspective_taking=100)
    counts.update(metaphor=100, questioning=100)

    assert lek_score_from_counts(counts) == -15 - 2 - 10 - 20 + 49.0


def test_score_formula_requires_every_count():
    with pytest.raises(KeyError):
        lek_score_from_counts({"compliance_markers": 0})


# --- Quirks that are part of the metric --------------------------------------------------


def test_pad_output_scores_minus_19():
    assert score_v2("<pad>")["lek_score"] == -19.0


def test_empty_text_scores_minus_19():
    result = score_v2("")
    assert result["empty_broken"] == 1
    assert result["engagement_depth"] == 1
    assert result["lek_score"] == -19.0


def test_empty_broken_threshold_is_20_stripped_chars():
    assert score_v2("  " + "x" * 19 + "\n")["empty_broken"] == 1
    assert score_v2("x" * 20)["empty_broken"] == 0


def test_preamble_only_at_index_zero_without_boundary():
    assert score_v2("Surely this works out fine in the end.")["formulaic_preamble"] == 1
    assert score_v2("OF COURSE it does, and here is why.")["formulaic_preamble"] == 1
    assert score_v2(" Certainly, a leading space stops the match.")["formulaic_preamble"] == 0
    assert score_v2("Well. Certainly not at the start of the text.")["formulaic_preamble"] == 0


def test_curly_apostrophe_never_matches():
    assert score_v2("I can’t help with that request at all.")["compliance_markers"] == 0
    assert score_v2("I can't help with that request at all.")["compliance_markers"] == 1


def test_stems_count_only_as_whole_words():
    result = score_v2("Accountability and transparency matter; stakeholders need analogy and metaphors.")
    assert result["axiom_resonance"] == 0
    assert result["perspective_taking"] == 0
    assert result["metaphor"] == 0
    assert score_v2("We need accountab and transparen here, said nobody.")["axiom_resonance"] == 2


def test_eg_needs_word_character_after_period():
    assert score_v2("some options, e.g. this one")["specificity"] == 0
    assert score_v2("some options, e.g.this one")["specificity"] == 1


def test_imagine_counts_as_emotion_and_metaphor():
    result = score_v2("Now imagine a quiet room with nobody in it.")
    assert result["emotional_register"] == 1
    assert result["metaphor"] == 1


def test_gap_phrases_need_spaces_around_gap():
    assert score_v2("It uses both the raw input and the output.")["nuance"] == 1
    assert score_v2("It uses *both* the raw input and the output.")["nuance"] == 0
    assert score_v2("Think of it as a journal you keep.")["metaphor"] == 0
    assert score_v2("Think of this tool as a journal you keep.")["metaphor"] == 1


def test_gap_phrase_swallows_second_phrase():
    # "right to .{3,20}" is greedy and takes "consent" with it: one hit, not two.
    assert score_v2("You keep the right to consent.")["axiom_resonance"] == 1
    assert score_v2("You keep the consent.")["axiom_resonance"] == 1


def test_first_person_needs_word_after_space():
    assert score_v2("I think my plan helps me grow.")["first_person"] == 3
    assert score_v2("It is I . Or my .")["first_person"] == 0


def test_proper_nouns_skip_first_char_and_sentence_starts():
    assert score_v2("Paris")["specificity"] == 0
    # The search starts at text[1:], so the boundary check ignores the "x" before "Paris".
    assert score_v2("xParis")["specificity"] == 1
    assert score_v2("xxParis")["specificity"] == 0
    assert score_v2(" Paris")["specificity"] == 1
    assert score_v2("We went. Paris was next, then Rome.")["specificity"] == 1


def test_creative_form_counts_markup():
    assert score_v2("a\n\nb")["creative_form"] == 1
    assert score_v2("wait... what — **bold** > quote ### head | pipe")["creative_form"] == 6


def test_degeneration_levels():
    assert score_v2("one two three four five six seven eight nine ten")["degeneration"] == 0
    assert score_v2("a a a a a a a a a a b")["degeneration"] == 1
    assert score_v2("a b c d a b c d a b c")["degeneration"] == 0.5
    assert score_v2("Same same same same same same same same same same Same")["degeneration"] == 1


def test_questioning_capped_at_three():
    result = score_v2("Why? How? What? Who? When? Where? Really? Truly?")
    assert result["questioning"] == 8


# --- Fast patterns versus the plain oracle -----------------------------------------------

# Tokens that hit every signal and the edges of the rewritten patterns: boundaries, case,
# markup, sentence starts, and the characters where lower() and re.IGNORECASE disagree.
TOKENS = [
    "I ", "I'm ", "I've ", "my ", "me ", "I", "My", "ME", "i ", "Im", "I'", "xI ", "_I ", "éI ",
    "cannot", "I cannot", "I CAN'T", "not able to", "As an AI", "as a language model", "I'm not able",
    "feel", "FEEL", "felt", "heart", "hearts", "imagine ", "Imagine", "awe", "awesome", "joy", "enjoy",
    "however", "both ", " and ", "both x and", "while ", " also", "trade-off", "tradeoff", "not just",
    "more than", "for example", "e.g.", "e.g.x", "consider ", " where", "like when", "such as",
    "sovereign", "sovereignty", "right to ", "self-determin", "accountab", "human flourish",
    "from ", " perspective", "stakeholder", "the community", "like a ", "as if ", "think of ", " as ",
    "metaphor", "analog", "similar to how", "Paris", "London", ". ", ".", "Ab", "ABC", "Élan", "Zürich",
    "2024", "1,000.5", "3.", "x1", "٣", "\n", "\n\n", "\n\n\n", "...", "....", "\u2014", "*", "**", "***",
    "_", "__", "*_x", "> ", ">", "# ", "####  ", "| ", "?", " ", "\t", "'", "-", "\u0130", "\u0131",
    "\u017f", "\u212a", "ſuch as", "İ cannot", "ı ", "K", "\u00df", "\ufb01", "日本", "😀", "\x00", "\ud800",
]

token_texts = st.lists(st.sampled_from(TOKENS) | st.text(max_size=5), max_size=60).map("".join)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=token_texts)
@example(text="")
@example(text="Of course! I cannot do that, however I'm able to help.\n\nImagine a river.")
def test_matches_plain_oracle_on_token_text(text):
    assert score_v2(text) == plain_score_v2(text)


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None), max_size=400))
def test_matches_plain_oracle_on_arbitrary_text(text):
    assert score_v2(text) == plain_score_v2(text)


def test_matches_plain_oracle_on_training_texts(lem_reference):
    for example_line in read_jsonl(lem_reference / "training" / "test.jsonl"):
        for message in example_line["messages"]:
            text = message["content"]
            assert score_v2(text) == plain_score_v2(text)
            # The same text with a fold hazard takes the re.IGNORECASE path.
            assert score_v2(text + "\u017f") == plain_score_v2(text + "\u017f")


def test_fold_hazards_are_complete():
    """Recompute the characters for which lower() and re.IGNORECASE disagree on this Python."""
    word = re.compile(r"\w")
    ascii_in_patterns = re.compile(r"(?i)[a-z'.\- ]")
    hazards = []
    for code_point in range(128, 0x110000):
        character = chr(code_point)
        lowered = character.lower()
        changes_badly = lowered != character and (
            len(lowered) != 1
            or lowered.isascii()
            or bool(word.match(character)) != bool(word.match(lowered))
        )
        if changes_badly or ascii_in_patterns.match(character):
            hazards.append(character)
    assert tuple(hazards) == scoring._FOLD_HAZARDS


# --- Never raises ------------------------------------------------------------------------

EDGE_TEXTS = {
    "empty": "",
    "one_megabyte": ("Imagine the right to consent, however... I think? " * 21000)[: 1 << 20],
    "nul": "\x00",
    "emoji": "😀🙏🏽 feel the joy 🎉",
    "cjk": "我认为这是一个复杂的问题。然而，我们需要考虑。",
    "lone_surrogate": "\ud800",
    "surrogate_in_text": "I feel \udfff fine, however \ud800.",
    "only_whitespace": " \t\n\r\x0b\x0c\u2028\u3000",
    "control_chars": "".join(chr(code) for code in range(32)),
    "fold_hazards": "\u0130\u0131\u017f\u212a I cannot",
}


def assert_well_formed(result: dict) -> None:
    assert list(result) == SCORE_KEYS
    for key, value in result.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value), key
    assert result["lek_score"] <= 49.0


@pytest.mark.parametrize("text", EDGE_TEXTS.values(), ids=EDGE_TEXTS.keys())
def test_edge_texts_score_without_error(text):
    assert_well_formed(score_v2(text))


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None)) | st.text(alphabet=string.printable))
def test_any_text_scores_without_error(text):
    assert_well_formed(score_v2(text))


def test_import_needs_no_mlx():
    import subprocess
    import sys

    code = "import sys, lem_fixtures.scoring, lem_fixtures.probes, lem_fixtures.kernels, lem_fixtures.results, " \
        "lem_fixtures.statistics, lem_fixtures.rescore; print('mlx' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"
