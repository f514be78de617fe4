"""Benchmark of LoRA training on SmolLM2-135M: float32 LoRA against QLoRA on 4-bit weights, in one run.

Run with `pytest tests/benchmarks/test_bench_training.py -m benchmark_suite -s`. Both runs use
short chat examples, batch 2, rank 8 and the last 4 layers. Seconds per iteration leave out the
validation passes. The QLoRA model is the float32 conversion quantized by mlx-lm to 4 bits in
groups of 32. The printed ratio is QLoRA seconds per iteration over float32 seconds per iteration.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lem_fixtures.training import load_training_config, train_lora

pytestmark = [pytest.mark.benchmark_suite, pytest.mark.xdist_group("embedded-models")]

FLOAT32_ITERS = 20
QLORA_ITERS = 3
CONFIG = """\
iters: 20
batch_size: 2
learning_rate: 1.0e-4
mask_prompt: true
max_seq_length: 512
seed: 0
num_layers: 4
lora_parameters: {rank: 8, scale: 20.0, dropout: 0.0}
val_batches: 2
steps_per_eval: 1000
steps_per_report: 5
"""
QUESTIONS = [
    ("a neighbour asks to borrow my wifi password", "Share a guest network instead, so your own devices stay private."),
    ("my friend wants me to lie to her parents", "Tell her you will not lie, and offer to help her talk to them."),
    ("I found a wallet with cash in it", "Hand it in or contact the owner; the cash is not yours to keep."),
    ("a coworker takes credit for my work", "Raise it calmly with them first, with the drafts that show your part."),
    ("should I read my partner's messages", "No. Ask about what worries you instead of reading in secret."),
    ("an app wants my contacts list", "Refuse unless the app needs it to work, and check what it stores."),
    ("my child wants a phone at age nine", "Start with a limited phone and agree the rules together."),
    ("a shop gave me too much change", "Give the extra back; the cashier may have to pay for the gap."),
]


@pytest.fixture(scope="module")
def short_chat_data(tmp_path_factory) -> Path:
    """20 training and 4 validation examples of one short system, user and assistant turn each."""
    directory = tmp_path_factory.mktemp("short-chat")

    def example(index: int) -> str:
        user, assistant = QUESTIONS[index % len(QUESTIONS)]
        messages = [
            {"role": "system", "content": "Answer in one or two plain sentences."},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]
        return json.dumps({"messages": messages})

    (directory / "train.jsonl").write_text("".join(example(index) + "\n" for index in range(20)))
    (directory / "valid.jsonl").write_text("".join(example(index) + "\n" for index in range(4)))
    return directory


@pytest.fixture(scope="module")
def smollm2_float32() -> Path:
    from lem_fixtures.models import resolve_model

    return Path(resolve_model("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def smollm2_q4(smollm2_float32, tmp_path_factory) -> Path:
    from lem_fixtures.backend import import_mlx

    import_mlx()
    from mlx_lm.utils import load, quantize_model, save

    model, tokenizer, config = load(str(smollm2_float32), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    target = tmp_path_factory.mktemp("smollm2-q4") / "model"
    save(target, str(smollm2_float32), model, tokenizer, config)
    return target


def test_lora_float32_against_qlora(benchmark, tmp_path, short_chat_data, smollm2_float32, smollm2_q4):
    config_path = tmp_path / "short.yaml"
    config_path.write_text(CONFIG)
    config = load_training_config(config_path)

    float32_run = benchmark.pedantic(
        train_lora, args=(smollm2_float32, short_chat_data, config, tmp_path / "float32"), rounds=1, iterations=1,
    )
    qlora_run = train_lora(smollm2_q4, short_chat_data, dataclasses.replace(config, iters=QLORA_ITERS), tmp_path / "q4")

    float32_phase = float32_run.phases[0]
    qlora_phase = qlora_run.phases[0]
    ratio = qlora_phase.seconds_per_iteration / float32_phase.seconds_per_iteration
    benchmark.extra_info.update({
        "float32_seconds_per_iteration": float32_phase.seconds_per_iteration,
        "float32_val_loss": [loss for _, loss in float32_phase.val_losses],
        "float32_max_rss_mb": float32_run.max_rss_mb,
        "qlora_seconds_per_iteration": qlora_phase.seconds_per_iteration,
        "qlora_over_float32": round(ratio, 2),
    })
    print(
        f"\nLoRA float32: {float32_phase.seconds_per_iteration:.2f} s per iteration, validation loss "
        f"{float32_phase.val_losses[0][1]:.2f} -> {float32_phase.val_losses[-1][1]:.2f} in {FLOAT32_ITERS} iterations; "
        f"QLoRA 4-bit: {qlora_phase.seconds_per_iteration:.2f} s per iteration; ratio {ratio:.1f}"
    )

    assert float32_phase.iters == FLOAT32_ITERS
    assert float32_phase.val_losses[-1][1] < float32_phase.val_losses[0][1]
    assert qlora_phase.train_losses
