"""Speed of the v2 scorer on 100,000 synthetic responses of a few KB each.

Run with: pytest tests/benchmarks/test_bench_scoring.py -m benchmark_suite --dist no
"""

from __future__ import annotations

import random
import time

import pytest

from lem_fixtures.scoring import score_v2

RESPONSE_COUNT = 100_000
# 1,000 distinct texts, each scored 100 times: the scorer keeps no cache, so repeats cost
# the same as new texts, and the pool stays at about 3 MB instead of 300 MB.
POOL_SIZE = 1_000
TEXT_CHARS = (2_000, 5_000)

COMMON_WORDS = (
    "the of and to a in is that for it as with be on not this are by or can from an which "
    "system data users each model should would could will must may need trust design "
    "network storage key local privacy community access history record state server "
    "protocol value people time process approach risk choice power rights right"
).split()
SIGNAL_WORDS = (
    "however imagine consent dignity autonomy feel hope perspective stakeholder nuanced "
    "tension complexity metaphor specifically transparency sovereignty compassion"
).split()
PHRASES = ("I think", "for example", "on the other hand", "such as", "like a", "my view", "it depends")
PROPER_NOUNS = ("Alice", "Berlin", "Signal", "Mozilla", "Kenya", "Linux", "Tor", "Europe", "Nostr")
PUNCTUATION = (".", ".", ".", ",", ",", "?", ":", ";", "!", "...", " \u2014")


def synthetic_response(rng: random.Random) -> str:
    """Build prose with headings, lists, bold text, numbers, names and paragraph breaks."""
    target = rng.randint(*TEXT_CHARS)
    parts: list[str] = []
    length = 0
    while length < target:
        sentence_words = []
        for _ in range(rng.randint(6, 24)):
            roll = rng.random()
            if roll < 0.80:
                sentence_words.append(rng.choice(COMMON_WORDS))
            elif roll < 0.86:
                sentence_words.append(rng.choice(SIGNAL_WORDS))
            elif roll < 0.92:
                sentence_words.append(rng.choice(PROPER_NOUNS))
            elif roll < 0.96:
                sentence_words.append(str(rng.randint(1, 10_000)))
            else:
                sentence_words.append(rng.choice(PHRASES))
        sentence = " ".join(sentence_words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice(PUNCTUATION)
        layout = rng.random()
        if layout < 0.08:
            sentence = f"\n\n## {sentence}\n\n"
        elif layout < 0.18:
            sentence = f"\n* **{sentence_words[0]}:** {sentence}"
        elif layout < 0.26:
            sentence += "\n\n"
        else:
            sentence += " "
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)


@pytest.fixture(scope="module")
def response_pool() -> list[str]:
    rng = random.Random(20240219)
    return [synthetic_response(rng) for _ in range(POOL_SIZE)]


@pytest.mark.benchmark_suite
def test_score_100k_responses(benchmark, response_pool):
    def score_all() -> tuple[float, float]:
        wall_started = time.perf_counter()
        cpu_started = time.process_time()
        for _ in range(RESPONSE_COUNT // POOL_SIZE):
            for text in response_pool:
                score_v2(text)
        return time.perf_counter() - wall_started, time.process_time() - cpu_started

    wall_seconds, cpu_seconds = benchmark.pedantic(score_all, rounds=1, iterations=1)

    # CPU time is reported too because it is less disturbed by other load on a shared machine.
    mean_chars = sum(map(len, response_pool)) / len(response_pool)
    benchmark.extra_info["responses"] = RESPONSE_COUNT
    benchmark.extra_info["mean_chars"] = round(mean_chars)
    benchmark.extra_info["responses_per_second"] = round(RESPONSE_COUNT / wall_seconds)
    benchmark.extra_info["responses_per_cpu_second"] = round(RESPONSE_COUNT / cpu_seconds)
    benchmark.extra_info["megabytes_per_second"] = round(RESPONSE_COUNT * mean_chars / wall_seconds / 1e6, 2)


@pytest.mark.benchmark_suite
def test_score_one_response(benchmark, response_pool):
    text = response_pool[0]
    result = benchmark(score_v2, text)

    assert result["lek_score"] <= 49.0
    benchmark.extra_info["chars"] = len(text)
