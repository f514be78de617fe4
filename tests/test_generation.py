"""Prompt rendering, stop tokens and generation paths, on tiny llama models built per test session."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lem_fixtures.errors import KernelError, LemError
from lem_fixtures.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    MODE_CHAT,
    MODE_CHAT_SYSTEM,
    MODE_CHAT_USER_PREFIX,
    MODE_PLAIN,
    Generation,
    GenerationParams,
    KernelDroppedError,
    RenderedPrompt,
    encode_prompt,
    generate,
    render_prompt,
    stop_token_ids_for,
    template_end_of_turn_id,
)

from tiny_model import build_tiny_model

pytest.importorskip("mlx_lm")

KERNEL = "be kind and honest"
PROMPTS = [
    "hello world",
    "tell me about consent and dignity",
    "what is the kernel ?",
    "why",
    "how are you kind and honest . tell me more words here",
]
# Scripted model: after the generation prompt it generates "hello world" and then <end_of_turn>.
HELLO_THEN_END_OF_TURN = {"assistant": "hello", "hello": "world", "world": "<end_of_turn>"}


def load_tiny(tiny) -> SimpleNamespace:
    """Load a tiny model the way lem_fixtures.models does, without hashing its files."""
    from lem_fixtures.backend import import_mlx

    import_mlx()
    import mlx_lm

    model, tokenizer, config = mlx_lm.load(str(tiny.path), return_config=True)
    return SimpleNamespace(name=tiny.path.name, path=tiny.path, model=model, tokenizer=tokenizer, config=config)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    tiny = build_tiny_model(tmp_path_factory.mktemp("models") / "random", hidden_size=128)
    return load_tiny(tiny)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """One tokenizer per chat template kind of tiny_model.CHAT_TEMPLATES."""
    from mlx_lm import load

    base = tmp_path_factory.mktemp("templates")
    loaded = {}
    for kind in ("chatml", "no-system", "drops-system", "none"):
        tiny = build_tiny_model(base / kind, chat_template=kind, hidden_size=64, num_layers=1)
        loaded[kind] = load(str(tiny.path))[1]
    return loaded


# ---------------------------------------------------------------------------------------------
# Parameters


def test_params_defaults_are_upstream():
    params = GenerationParams()

    assert params.to_dict() == {"max_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "seed": None}
    assert params.greedy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0.7}, "seed"),
    ],
)
def test_params_invalid_values_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_params_are_frozen():
    params = GenerationParams()

    with pytest.raises(AttributeError):
        params.max_tokens = 5


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_baseline_uses_user_message(tokenizers):
    rendered = render_prompt(tokenizers["chatml"], "hello world")

    assert rendered == RenderedPrompt("<|im_start|>user hello world<|im_end|><|im_start|>assistant", MODE_CHAT)


def test_render_kernel_as_system_message(tokenizers):
    rendered = render_prompt(tokenizers["chatml"], "hello world", KERNEL)

    assert rendered.mode == MODE_CHAT_SYSTEM
    assert rendered.text.startswith(f"<|im_start|>system {KERNEL}<|im_end|>")
    assert rendered.text.endswith("<|im_start|>user hello world<|im_end|><|im_start|>assistant")


def test_render_template_rejecting_system_prefixes_user(tokenizers):
    rendered = render_prompt(tokenizers["no-system"], "hello world", KERNEL)

    assert rendered.mode == MODE_CHAT_USER_PREFIX
    assert rendered.text == f"<start_of_turn>user {KERNEL}\n\nhello world<end_of_turn><start_of_turn>assistant"


def test_render_baseline_under_rejecting_template(tokenizers):
    rendered = render_prompt(tokenizers["no-system"], "hello world")

    assert rendered == RenderedPrompt("<start_of_turn>user hello world<end_of_turn><start_of_turn>assistant", MODE_CHAT)


def test_render_without_template_is_plain(tokenizers):
    baseline = render_prompt(tokenizers["none"], "hello world")
    kernel = render_prompt(tokenizers["none"], "hello world", KERNEL)

    assert baseline == RenderedPrompt("hello world", MODE_PLAIN)
    assert kernel == RenderedPrompt(f"{KERNEL}\n\nhello world", MODE_PLAIN)


def test_render_dropped_kernel_raises(tokenizers):
    with pytest.raises(KernelDroppedError, match="dropped the kernel") as raised:
        render_prompt(tokenizers["drops-system"], "hello world", KERNEL)

    assert isinstance(raised.value, KernelError)
    assert isinstance(raised.value, LemError)


def test_render_dropping_template_baseline_still_works(tokenizers):
    rendered = render_prompt(tokenizers["drops-system"], "hello world")

    assert rendered.mode == MODE_CHAT


def test_render_kernel_text_kept_verbatim(tokenizers):
    kernel = '{"axioms": ["one", "two"]}\n'

    rendered = render_prompt(tokenizers["chatml"], "why", kernel)

    assert kernel in rendered.text


# ---------------------------------------------------------------------------------------------
# Stop tokens


def test_end_of_turn_found_in_template(tokenizers):
    chatml = tokenizers["chatml"]
    gemma_like = tokenizers["no-system"]

    assert template_end_of_turn_id(chatml) == chatml.convert_tokens_to_ids("<|im_end|>")
    assert template_end_of_turn_id(gemma_like) == gemma_like.convert_tokens_to_ids("<end_of_turn>")
    assert template_end_of_turn_id(tokenizers["none"]) is None


def test_stop_ids_include_generation_config_list(tmp_path):
    tiny = build_tiny_model(tmp_path / "m", generation_eos=["<eos>", "<end_of_turn>"], hidden_size=64, num_layers=1)
    loaded = load_tiny(tiny)

    stop_ids = stop_token_ids_for(loaded)

    assert tiny.token_id("<eos>") in stop_ids
    assert tiny.token_id("<end_of_turn>") in stop_ids
    assert tiny.token_id("<|im_end|>") in stop_ids


def test_stop_ids_read_generation_config_file(tmp_path):
    tiny = build_tiny_model(tmp_path / "m", chat_template="none", hidden_size=64, num_layers=1)
    loaded = load_tiny(tiny)
    end_of_turn = tiny.token_id("<end_of_turn>")
    assert end_of_turn not in stop_token_ids_for(loaded)

    (tiny.path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, end_of_turn]}))

    assert end_of_turn in stop_token_ids_for(loaded)


# ---------------------------------------------------------------------------------------------
# Generation on scripted models


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eos_first_gives_empty_response(tmp_path, batch_size):
    tiny = build_tiny_model(tmp_path / "m", next_tokens={"assistant": "<eos>"})
    loaded = load_tiny(tiny)
    prompts = [render_prompt(loaded.tokenizer, prompt) for prompt in PROMPTS[:3]]

    generations = generate(loaded, prompts, GenerationParams(max_tokens=8), batch_size=batch_size)

    for generation in generations:
        assert generation.response == ""
        assert generation.finish_reason == FINISH_STOP
        assert generation.generation_tokens == 1


@pytest.mark.parametrize("batch_size", [1, 2])
def test_end_of_turn_from_generation_config_stops(tmp_path, batch_size):
    tiny = build_tiny_model(
        tmp_path / "m", next_tokens=HELLO_THEN_END_OF_TURN, generation_eos=["<eos>", "<end_of_turn>"]
    )
    loaded = load_tiny(tiny)
    # The ChatML template ends turns with <|im_end|>, so only generation_config names <end_of_turn>.
    assert loaded.tokenizer.eos_token_id != tiny.token_id("<end_of_turn>")
    assert template_end_of_turn_id(loaded.tokenizer) != tiny.token_id("<end_of_turn>")

    [generation, _] = generate(
        loaded, [render_prompt(loaded.tokenizer, "why"), render_prompt(loaded.tokenizer, "why", KERNEL)],
        GenerationParams(max_tokens=10), batch_size=batch_size,
    )

    assert generation.response == "hello world"
    assert generation.finish_reason == FINISH_STOP
    assert generation.generation_tokens == 3


@pytest.mark.parametrize("batch_size", [1, 2])
def test_end_of_turn_from_template_stops(tmp_path, batch_size):
    # A Gemma-like checkpoint: EOS is <eos>, the template ends turns with <end_of_turn>,
    # and no generation_config.json lists it.
    tiny = build_tiny_model(tmp_path / "m", chat_template="no-system", next_tokens=HELLO_THEN_END_OF_TURN)
    loaded = load_tiny(tiny)
    assert tiny.token_id("<end_of_turn>") not in loaded.tokenizer.eos_token_ids

    [generation, _] = generate(
        loaded, [render_prompt(loaded.tokenizer, "why"), render_prompt(loaded.tokenizer, "why", KERNEL)],
        GenerationParams(max_tokens=10), batch_size=batch_size,
    )

    assert generation.response == "hello world"
    assert generation.finish_reason == FINISH_STOP


@pytest.mark.parametrize("batch_size", [1, 2])
def test_max_tokens_finishes_with_length(tmp_path, batch_size):
    tiny = build_tiny_model(tmp_path / "m", next_tokens={"assistant": "hello"}, default_next="the")
    loaded = load_tiny(tiny)
    prompts = [render_prompt(loaded.tokenizer, "why"), render_prompt(loaded.tokenizer, "hello world")]

    generations = generate(loaded, prompts, GenerationParams(max_tokens=4), batch_size=batch_size)

    for generation in generations:
        assert generation.response == "hello the the the"
        assert generation.finish_reason == FINISH_LENGTH
        assert generation.generation_tokens == 4


# ---------------------------------------------------------------------------------------------
# Generation records and paths on a random model


def test_generation_record_fields(random_model):
    import mlx.core as mx
    import mlx_lm

    rendered = render_prompt(random_model.tokenizer, PROMPTS[1], KERNEL)
    params = GenerationParams(max_tokens=6)

    [generation] = generate(random_model, [rendered], params)

    assert generation.rendered_prompt == rendered.text
    assert generation.mode == MODE_CHAT_SYSTEM
    assert generation.params == params.to_dict()
    assert generation.prompt_tokens == len(encode_prompt(random_model.tokenizer, rendered.text))
    assert 1 <= generation.generation_tokens <= 6
    assert generation.seconds > 0
    assert generation.mlx_version == mx.__version__
    assert generation.mlx_lm_version == mlx_lm.__version__
    assert Generation.from_dict(json.loads(json.dumps(generation.to_dict()))) == generation


def test_sequential_matches_mlx_lm_generate(random_model):
    import mlx_lm

    tokenizer = random_model.tokenizer
    prompts = [render_prompt(tokenizer, prompt, kernel) for prompt in PROMPTS for kernel in (None, KERNEL)]
    generations = generate(random_model, prompts, GenerationParams(max_tokens=24))

    # mlx_lm.generate stops on the tokenizer's EOS ids only, so give it the same stop set.
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = stop_token_ids_for(random_model)
    try:
        expected = [mlx_lm.generate(random_model.model, tokenizer, p.text, max_tokens=24) for p in prompts]
    finally:
        tokenizer.eos_token_ids = saved

    assert [g.response for g in generations] == expected


def test_batched_matches_sequential_on_tiny_model(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt, kernel) for prompt in PROMPTS for kernel in (None, KERNEL)]
    params = GenerationParams(max_tokens=24)

    sequential = generate(random_model, prompts, params)
    batched = generate(random_model, prompts, params, batch_size=4)

    assert [g.response for g in batched] == [g.response for g in sequential]
    assert [g.finish_reason for g in batched] == [g.finish_reason for g in sequential]
    assert [g.generation_tokens for g in batched] == [g.generation_tokens for g in sequential]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in sequential]
    assert {g.batch_size for g in batched} == {4}


def test_batched_one_token_prompt(tmp_path):
    tiny = build_tiny_model(tmp_path / "m", chat_template="none", hidden_size=64)
    loaded = load_tiny(tiny)
    prompts = [render_prompt(loaded.tokenizer, "hello"), render_prompt(loaded.tokenizer, "tell me about consent")]
    assert len(encode_prompt(loaded.tokenizer, prompts[0].text)) == 1

    sequential = generate(loaded, prompts, GenerationParams(max_tokens=6))
    batched = generate(loaded, prompts, GenerationParams(max_tokens=6), batch_size=2)

    assert [g.response for g in batched] == [g.response for g in sequential]
    assert [g.prompt_tokens for g in batched] == [1, 4]


def test_batched_admits_cases_beyond_batch_size(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt, kernel) for prompt in PROMPTS for kernel in (None, KERNEL)]
    params = GenerationParams(max_tokens=12)

    sequential = generate(random_model, prompts, params)
    batched = generate(random_model, prompts, params, batch_size=3)

    assert [g.response for g in batched] == [g.response for g in sequential]


def test_on_result_reports_every_case(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt) for prompt in PROMPTS]
    seen = {}

    generations = generate(
        random_model, prompts, GenerationParams(max_tokens=5), batch_size=2,
        on_result=lambda index, generation: seen.setdefault(index, generation),
    )

    assert sorted(seen) == list(range(len(PROMPTS)))
    assert [seen[index] for index in range(len(PROMPTS))] == generations


def test_generate_empty_list(random_model):
    assert generate(random_model, [], GenerationParams(max_tokens=5)) == []


def test_generate_rejects_wrong_seed_count(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt) for prompt in PROMPTS[:2]]

    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(random_model, prompts, GenerationParams(max_tokens=5), seeds=[1])


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampled_case_reproducible(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt) for prompt in PROMPTS]
    params = GenerationParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=7)

    first = generate(random_model, prompts, params)
    second = generate(random_model, list(reversed(prompts)), params)

    assert [g.response for g in first] == [g.response for g in reversed(second)]


def test_sampled_case_independent_of_batching(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt) for prompt in PROMPTS]
    params = GenerationParams(max_tokens=16, temperature=1.0, seed=7)

    sequential = generate(random_model, prompts, params)
    batched = generate(random_model, prompts, params, batch_size=3)

    assert [g.response for g in batched] == [g.response for g in sequential]


def test_sampled_seed_changes_text(random_model):
    prompts = [render_prompt(random_model.tokenizer, prompt) for prompt in PROMPTS]

    seven = generate(random_model, prompts, GenerationParams(max_tokens=16, temperature=1.0, seed=7))
    eight = generate(random_model, prompts, GenerationParams(max_tokens=16, temperature=1.0, seed=8))
    greedy = generate(random_model, prompts, GenerationParams(max_tokens=16))

    assert [g.response for g in seven] != [g.response for g in eight]
    assert [g.response for g in seven] != [g.response for g in greedy]


def test_explicit_seeds_override_derived(random_model):
    prompt = render_prompt(random_model.tokenizer, PROMPTS[0])
    params = GenerationParams(max_tokens=16, temperature=1.0, seed=7)

    same = generate(random_model, [prompt, prompt], params, seeds=[1, 1])
    different = generate(random_model, [prompt, prompt], params, seeds=[1, 2])

    assert same[0].response == same[1].response
    assert different[0].response != different[1].response


# ---------------------------------------------------------------------------------------------
# The real default model


@pytest.fixture(scope="module")
def smollm2():
    from lem_fixtures.errors import LemError
    from lem_fixtures.models import load_model

    try:
        return load_model("smollm2-135m-instruct")
    except LemError as error:
        pytest.skip(f"smollm2-135m-instruct is not available: {error}")


@pytest.mark.slow
def test_smollm2_batched_equals_sequential(smollm2):
    """Greedy texts of the batched path equal the sequential ones on six probes with and without a kernel.

    Equal texts here do not make the paths bit-identical. OpenBLAS rounds a row of a float32
    matrix product differently depending on how many rows the product has, so batched
    log-probabilities differ from sequential ones by about 1e-6. A near-tie between the top
    two tokens can therefore still flip in other prompts or longer responses.
    """
    from lem_fixtures.benchmark import default_kernel_specs, default_prompt_paths
    from lem_fixtures.kernels import load_kernels

    probes = json.loads(default_prompt_paths()[0].read_text())[:6]
    kernel = load_kernels(default_kernel_specs())[-1]
    prompts = [render_prompt(smollm2.tokenizer, probe["prompt"], text) for probe in probes for text in (None, kernel.text)]
    params = GenerationParams(max_tokens=64)

    sequential = generate(smollm2, prompts, params)
    batched = generate(smollm2, prompts, params, batch_size=16)

    for index, (one, many) in enumerate(zip(sequential, batched)):
        assert many.response == one.response, f"case {index} ({prompts[index].mode}) differs"
        assert many.finish_reason == one.finish_reason
        assert many.generation_tokens == one.generation_tokens


@pytest.mark.slow
def test_smollm2_sequential_matches_mlx_lm_generate(smollm2):
    import mlx_lm

    from lem_fixtures.benchmark import default_prompt_paths

    probes = json.loads(default_prompt_paths()[0].read_text())[:2]
    prompts = [render_prompt(smollm2.tokenizer, probe["prompt"]) for probe in probes]
    assert stop_token_ids_for(smollm2) == frozenset(smollm2.tokenizer.eos_token_ids)

    generations = generate(smollm2, prompts, GenerationParams(max_tokens=32))

    expected = [mlx_lm.generate(smollm2.model, smollm2.tokenizer, p.text, max_tokens=32) for p in prompts]
    assert [g.response for g in generations] == expected
