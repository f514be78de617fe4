"""Prompt rendering and text generation with mlx-lm, one response record per case.

Rendering follows the upstream LEM A/B script: the kernel goes in as the system message of
the chat template. A template that raises on a system message (Gemma 2 and Mistral
templates call `raise_exception`) gets one user message "<kernel>\\n\\n<prompt>" instead,
and a tokenizer without a chat template gets that text as is.

Generation runs greedy by default (temperature 0, as upstream), on one of two paths:

- batch_size=1 (the default) runs one `mlx_lm.generate_step` loop per case and yields the
  same tokens as upstream's `mlx_lm.generate`. A case's text depends only on its inputs.
- batch_size>1 prefills each prompt on its own and decodes up to batch_size cases together
  with mlx-lm's `BatchGenerator`, several times faster on a CPU. The decode steps are not
  bit-identical to the sequential path, because OpenBLAS rounds a row of a float32 matrix
  product differently depending on how many rows the product has (log-probabilities
  differ by about 1e-6). A greedy text can therefore change where the top two tokens
  nearly tie, and it can depend on which other cases shared its batch.

NOTE: on SmolLM2-135M with OpenBLAS 0.3.21, the greedy texts of both paths were equal for
12 cases at 64 tokens and 12 cases at 256 tokens. Nothing guarantees that equality for
other models, prompts or BLAS builds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lem_fixtures.errors import KernelDroppedError, ModelError

logger = logging.getLogger(__name__)

# 1 keeps every response a function of its own inputs (see the module docstring).
DEFAULT_BATCH_SIZE = 1
# The fast setting that `lem benchmark --help` suggests: batched float32 decoding of a
# 135M-parameter model on a CPU with OpenBLAS still gains throughput at 16 sequences.
RECOMMENDED_BATCH_SIZE = 16

MODE_CHAT = "chat"
MODE_CHAT_SYSTEM = "chat-system"
MODE_CHAT_USER_PREFIX = "chat-user-prefix"
MODE_PLAIN = "plain"
RENDER_MODES = (MODE_CHAT, MODE_CHAT_SYSTEM, MODE_CHAT_USER_PREFIX, MODE_PLAIN)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

# A word no chat template contains, used to find the token that ends an assistant turn.
_END_OF_TURN_PROBE = "LEMENDOFTURNPROBE"


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings of one run. temperature 0 means greedy decoding.

    A sampled run (temperature > 0) needs a seed. Each case then samples with a seed derived
    from this seed and its rendered prompt, so its random draws do not depend on the order
    or the batch it runs in.
    """

    max_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature > 0 and self.seed is None:
            raise ValueError(
                f"sampling with temperature {self.temperature} needs a seed so that every case can be "
                "reproduced; pass a seed (for example --seed 0) or use temperature 0"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RenderedPrompt:
    """The exact text sent to the model and how it was built (one of RENDER_MODES)."""

    text: str
    mode: str


@dataclass(frozen=True)
class Generation:
    """One response and how it was produced.

    generation_tokens counts every token the model emitted, the end-of-turn token included
    (as mlx-lm counts them), so a model that ends its turn at once has response "" and
    generation_tokens 1. seconds is wall time from the case's prefill to its last token.
    """

    response: str
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    seconds: float
    rendered_prompt: str
    mode: str
    params: dict[str, Any]
    mlx_version: str
    mlx_lm_version: str
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Generation:
        return cls(**{name: record[name] for name in cls.__dataclass_fields__ if name in record})


# ---------------------------------------------------------------------------------------------
# Rendering


def has_chat_template(tokenizer: Any) -> bool:
    """Return whether `tokenizer` (an mlx-lm TokenizerWrapper or a Hugging Face tokenizer) has a chat template."""
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return getattr(tokenizer, "chat_template", None) is not None


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _render_baseline(tokenizer: Any, prompt: str, use_chat_template: bool) -> RenderedPrompt:
    if not use_chat_template:
        return RenderedPrompt(prompt, MODE_PLAIN)
    return RenderedPrompt(_apply_template(tokenizer, [{"role": "user", "content": prompt}]), MODE_CHAT)


def _render_with_kernel(tokenizer: Any, prompt: str, kernel_text: str, use_chat_template: bool) -> RenderedPrompt:
    if not use_chat_template:
        return RenderedPrompt(f"{kernel_text}\n\n{prompt}", MODE_PLAIN)

    messages = [{"role": "system", "content": kernel_text}, {"role": "user", "content": prompt}]
    try:
        return RenderedPrompt(_apply_template(tokenizer, messages), MODE_CHAT_SYSTEM)
    except Exception as error:  # jinja2.TemplateError from raise_exception, or whatever a template raises
        logger.debug("chat template rejected a system message (%s); putting the kernel in the user message", error)

    fallback = [{"role": "user", "content": f"{kernel_text}\n\n{prompt}"}]
    return RenderedPrompt(_apply_template(tokenizer, fallback), MODE_CHAT_USER_PREFIX)


def render_prompt(
    tokenizer: Any,
    prompt: str,
    kernel_text: str | None = None,
    *,
    use_chat_template: bool | None = None,
) -> RenderedPrompt:
    """Render one probe prompt, with `kernel_text` as the system message or without a kernel (baseline).

    use_chat_template=None uses the chat template when the tokenizer has one, and False
    renders plain text (the model registry can mark a model as not chat). Raises
    KernelDroppedError when a kernel condition renders to the same text as the baseline (a
    template that silently drops system messages), and ModelError when the chat template
    fails on a plain user message.
    """
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    try:
        baseline = _render_baseline(tokenizer, prompt, use_chat_template)
    except Exception as error:
        raise ModelError(
            f"the model's chat template failed on a single user message ({type(error).__name__}: {error}); "
            "fix chat_template in the model's tokenizer_config.json or use another model"
        ) from error
    if kernel_text is None:
        return baseline

    try:
        rendered = _render_with_kernel(tokenizer, prompt, kernel_text, use_chat_template)
    except Exception as error:
        raise ModelError(
            f"the model's chat template failed on a kernel condition, both with a system message and with the "
            f"kernel prefixed to the user message ({type(error).__name__}: {error}); fix chat_template in the "
            "model's tokenizer_config.json or use another model"
        ) from error

    if rendered.text == baseline.text:
        raise KernelDroppedError(
            f"the chat template dropped the kernel: in mode {rendered.mode!r} the prompt renders to the same "
            f"text as the baseline (kernel starts {kernel_text[:40]!r}); the kernel condition would measure "
            "nothing. Use a model whose template keeps system messages, or fix its chat_template"
        )
    if kernel_text.strip() not in rendered.text:
        logger.warning(
            "the chat template changed the kernel text in mode %r: the rendered prompt does not contain it verbatim",
            rendered.mode,
        )
    return rendered


# ---------------------------------------------------------------------------------------------
# Stop tokens


def _as_id_list(value: Any) -> list[int]:
    if value is None or value is False:
        return []
    if isinstance(value, int):
        return [value]
    return [int(item) for item in value]


def _is_special_token(tokenizer: Any, token_id: int) -> bool:
    if token_id in set(getattr(tokenizer, "all_special_ids", None) or []):
        return True
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    token = added.get(token_id)
    return bool(token is not None and getattr(token, "special", False))


def template_end_of_turn_id(tokenizer: Any) -> int | None:
    """Return the special token the chat template writes after an assistant message, or None.

    This is the id that ends a turn, for example Gemma's <end_of_turn> (106) or ChatML's
    <|im_end|>, whether or not the tokenizer declares it as its EOS token.
    """
    if not has_chat_template(tokenizer):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _END_OF_TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except Exception as error:  # a template may reject this conversation; the other sources still apply
        logger.debug("chat template failed on a user/assistant pair (%s); no end-of-turn token taken from it", error)
        return None
    if _END_OF_TURN_PROBE not in text:
        return None
    after = text.split(_END_OF_TURN_PROBE, 1)[1]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    if ids and _is_special_token(tokenizer, ids[0]):
        return int(ids[0])
    return None


def stop_token_ids(tokenizer: Any, config: dict[str, Any] | None = None, model_path: Path | None = None) -> frozenset[int]:
    """Return every token id that ends a response.

    The union of the tokenizer's EOS ids (mlx-lm's TokenizerWrapper already adds config.json's
    and generation_config.json's `eos_token_id` when it loads a model), `eos_token_id` of
    `config` and of `model_path`/generation_config.json, and the chat template's end-of-turn
    token (see template_end_of_turn_id).
    """
    ids: set[int] = set(getattr(tokenizer, "eos_token_ids", None) or [])
    ids.update(_as_id_list(getattr(tokenizer, "eos_token_id", None)))
    if config:
        ids.update(_as_id_list(config.get("eos_token_id")))

    if model_path is not None:
        generation_config_path = Path(model_path) / "generation_config.json"
        if generation_config_path.is_file():
            try:
                generation_config = json.loads(generation_config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                logger.warning("ignoring unreadable %s: %s", generation_config_path, error)
            else:
                ids.update(_as_id_list(generation_config.get("eos_token_id")))

    end_of_turn = template_end_of_turn_id(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    return frozenset(ids)


def stop_token_ids_for(loaded: Any) -> frozenset[int]:
    """Return stop_token_ids for a loaded model (anything with tokenizer, and optionally config and path)."""
    return stop_token_ids(loaded.tokenizer, getattr(loaded, "config", None), getattr(loaded, "path", None))


# ---------------------------------------------------------------------------------------------
# Generation


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Tokenize a rendered prompt as mlx-lm's stream_generate does: BOS added unless the text starts with it."""
    bos_token = getattr(tokenizer, "bos_token", None)
    add_special_tokens = bos_token is None or not text.startswith(bos_token)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def case_seed(params: GenerationParams, rendered_text: str) -> int:
    """Return the sampling seed of one case: derived from the run seed and the rendered prompt."""
    digest = hashlib.sha256(f"{params.seed}\0{rendered_text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def make_case_sampler(params: GenerationParams, seed: int) -> Callable[[Any], Any]:
    """Return a sampler for one case: mlx-lm's make_sampler, with the global PRNG reseeded per token.

    The seed of token k is a hash of (seed, k), so the sampled token depends only on the
    case and the logits, not on other sequences sampled in the same batch.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    # make_sampler applies top-p only for 0 < top_p < 1, so 1.0 means no nucleus filter.
    base = make_sampler(temp=params.temperature, top_p=params.top_p)
    step = 0

    def sampler(logprobs: Any) -> Any:
        nonlocal step
        digest = hashlib.sha256(f"{seed}\0{step}".encode()).digest()
        step += 1
        mx.random.seed(int.from_bytes(digest[:8], "big") >> 1)
        return base(logprobs)

    return sampler


@dataclass
class _CaseState:
    index: int
    rendered: RenderedPrompt
    prompt_ids: list[int]
    detokenizer: Any
    seed: int
    tokens: int = 0
    started: float = 0.0


@dataclass(frozen=True)
class _RunContext:
    params: GenerationParams
    stop_ids: frozenset[int]
    mlx_version: str
    mlx_lm_version: str
    batch_size: int
    on_result: Callable[[int, Generation], None] | None = field(default=None)

    def finish(self, case: _CaseState, finish_reason: str, finished_at: float) -> Generation:
        case.detokenizer.finalize()
        generation = Generation(
            response=case.detokenizer.text,
            finish_reason=finish_reason,
            prompt_tokens=len(case.prompt_ids),
            generation_tokens=case.tokens,
            seconds=round(finished_at - case.started, 3),
            rendered_prompt=case.rendered.text,
            mode=case.rendered.mode,
            params=self.params.to_dict(),
            mlx_version=self.mlx_version,
            mlx_lm_version=self.mlx_lm_version,
            batch_size=self.batch_size,
        )
        if self.on_result is not None:
            self.on_result(case.index, generation)
        return generation


def _generate_one(model: Any, case: _CaseState, context: _RunContext) -> Generation:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    sampler = None
    if not context.params.greedy:
        sampler = make_case_sampler(context.params, case.seed)

    case.started = time.perf_counter()
    finish_reason = FINISH_LENGTH
    steps = generate_step(mx.array(case.prompt_ids), model, max_tokens=context.params.max_tokens, sampler=sampler)
    for token, _logprobs in steps:
        case.tokens += 1
        if token in context.stop_ids:
            finish_reason = FINISH_STOP
            break
        case.detokenizer.add_token(token)
    # generate_step yields max_tokens tokens and then stops, so a loop without a stop token hit the limit.
    return context.finish(case, finish_reason, time.perf_counter())


# generate_step's default prefill chunk. The batched path prefills in the same chunks, so it
# runs the same matrix products as the sequential path and gets the same KV caches.
PREFILL_STEP_SIZE = 2048


def _prefill(model: Any, prompt_ids: list[int]) -> list[Any]:
    """Return a KV cache of prompt_ids[:-1], computed as mlx-lm's generate_step computes it (empty for one token)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    remaining = mx.array(prompt_ids[:-1])
    while remaining.size > 0:
        chunk_size = min(PREFILL_STEP_SIZE, remaining.size)
        model(remaining[:chunk_size][None], cache=cache)
        mx.eval([entry.state for entry in cache])
        remaining = remaining[chunk_size:]
        mx.clear_cache()
    return cache


def _generate_batched(model: Any, cases: list[_CaseState], context: _RunContext) -> None:
    """Decode up to batch_size cases at once, admitting the next case as soon as one finishes.

    Each prompt is prefilled on its own, exactly as the sequential path does, and then joins
    mlx-lm's BatchGenerator with its cache. Prefilling one prompt at a time wastes no work on
    padding (a kernel prompt is several times longer than a baseline one). It also leaves the
    decode steps as the only place where the two paths can round differently.
    """
    from collections import deque

    from mlx_lm.generate import BatchGenerator

    params = context.params
    generator = BatchGenerator(
        model,
        max_tokens=params.max_tokens,
        stop_tokens=[[token] for token in sorted(context.stop_ids)],
        completion_batch_size=context.batch_size,
        prefill_batch_size=context.batch_size,
    )
    pending = deque(cases)
    by_uid: dict[int, _CaseState] = {}
    try:
        while pending or by_uid:
            admitted = []
            while pending and len(by_uid) + len(admitted) < context.batch_size:
                case = pending.popleft()
                case.started = time.perf_counter()
                admitted.append((case, _prefill(model, case.prompt_ids)))
            if admitted:
                uids = generator.insert(
                    [[case.prompt_ids[-1]] for case, _ in admitted],
                    caches=[cache for _, cache in admitted],
                    all_tokens=[case.prompt_ids[:-1] for case, _ in admitted],
                    samplers=None if params.greedy else [make_case_sampler(params, case.seed) for case, _ in admitted],
                )
                by_uid.update(zip(uids, (case for case, _ in admitted)))

            for response in generator.next_generated():
                case = by_uid[response.uid]
                case.tokens += 1
                if response.finish_reason != FINISH_STOP:
                    case.detokenizer.add_token(response.token)
                if response.finish_reason is not None:
                    del by_uid[response.uid]
                    context.finish(case, response.finish_reason, time.perf_counter())
    finally:
        generator.close()


def import_mlx_backend() -> None:
    """Import mlx through lem_fixtures.backend, which preloads OpenBLAS first and raises BackendError when mlx is unusable."""
    from lem_fixtures.backend import import_mlx

    import_mlx()


def library_versions() -> tuple[str, str]:
    """Return the versions of mlx and mlx-lm in use."""
    import mlx.core as mx
    import mlx_lm

    return str(mx.__version__), str(mlx_lm.__version__)


def generate(
    loaded: Any,
    prompts: Sequence[RenderedPrompt],
    params: GenerationParams | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seeds: Sequence[int] | None = None,
    on_result: Callable[[int, Generation], None] | None = None,
) -> list[Generation]:
    """Generate one response per rendered prompt with `loaded.model` and `loaded.tokenizer`.

    batch_size 1 runs the cases one after another in the given order, which reproduces
    `mlx_lm.generate`. A larger batch_size runs mlx-lm's continuous batching with up to that
    many sequences at once, prompts sorted by token count. seeds: one sampling seed per
    prompt, in place of case_seed(params, text); greedy runs ignore them.
    on_result(index, generation) is called as each case finishes, so a caller can store it
    at once. Returns the generations in the order of `prompts`.
    """
    import_mlx_backend()
    params = params or GenerationParams()
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")

    tokenizer = loaded.tokenizer
    mlx_version, mlx_lm_version = library_versions()
    results: dict[int, Generation] = {}

    def record(index: int, generation: Generation) -> None:
        results[index] = generation
        if on_result is not None:
            on_result(index, generation)

    context = _RunContext(
        params=params,
        stop_ids=stop_token_ids_for(loaded),
        mlx_version=mlx_version,
        mlx_lm_version=mlx_lm_version,
        batch_size=batch_size,
        on_result=record,
    )
    cases = []
    for index, rendered in enumerate(prompts):
        seed = seeds[index] if seeds is not None else case_seed(params, rendered.text)
        cases.append(_CaseState(index, rendered, encode_prompt(tokenizer, rendered.text), tokenizer.detokenizer, seed))

    if batch_size == 1:
        for case in cases:
            _generate_one(loaded.model, case, context)
    elif cases:
        # Similar lengths in one batch need less padding; the generator admits new
        # sequences as others finish, so one insert covers every case.
        ordered = sorted(cases, key=lambda case: len(case.prompt_ids))
        _generate_batched(loaded.model, ordered, context)

    return [results[index] for index in range(len(cases))]
