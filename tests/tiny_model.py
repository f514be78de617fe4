"""Build tiny mlx-lm `llama` models with a word-level tokenizer for fast unit tests.

A model is either random (seeded, so its greedy output is fixed but meaningless) or
scripted: every layer's output projection is zero, so the residual stream is the input
token's embedding, and the embedding and lm_head implement a bigram table `next_tokens`
that maps each token to the token that follows it. A scripted model lets a test choose exactly what
the model generates, for example an end-of-turn token as the first token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<|im_start|>", "<|im_end|>", "<end_of_turn>", "[UNK]"]
WORDS = [
    "system", "user", "assistant", "hello", "world", "the", "a", "kernel", "prompt", "answer",
    "is", "to", "of", "and", "you", "are", "be", "kind", "honest", "what", "why", "how", "tell",
    "me", "about", "consent", "dignity", "ethics", "model", "question", "more", "words", "here",
    "P01", "P02", "P03", "?", ".", ",", "!", ":",
]

# Chat templates that exercise each render mode of lem_fixtures.generation.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
# Rejects a system message the way Gemma 2 and Mistral templates do.
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn>{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>assistant{% endif %}"
)
# Drops a system message without an error, so a kernel condition would equal the baseline.
DROPS_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)
CHAT_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "no-system": NO_SYSTEM_TEMPLATE,
    "drops-system": DROPS_SYSTEM_TEMPLATE,
    "none": None,
}


@dataclass(frozen=True)
class TinyModel:
    path: Path
    vocab: dict[str, int]

    def token_id(self, token: str) -> int:
        return self.vocab[token]


def build_vocab() -> dict[str, int]:
    tokens = SPECIAL_TOKENS + WORDS
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(path: Path, vocab: dict[str, int], chat_template: str | None) -> None:
    """Write tokenizer.json (WordLevel, whitespace split) and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(path / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "[UNK]",
        "model_max_length": 512,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def build_tiny_model(
    path: Path,
    *,
    chat_template: str = "chatml",
    next_tokens: dict[str, str] | None = None,
    default_next: str = "the",
    generation_eos: list[str] | None = None,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
) -> TinyModel:
    """Write an mlx-lm loadable model directory to `path` and return it.

    chat_template: a key of CHAT_TEMPLATES. next_tokens: a bigram table that makes the
    model scripted (token -> next token, every other token -> `default_next`); without it
    the weights are random. generation_eos: tokens written as generation_config.json
    `eos_token_id`, as Hugging Face checkpoints list extra end-of-turn ids.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab()
    if next_tokens is not None and hidden_size < len(vocab):
        raise ValueError(f"a scripted model needs hidden_size >= vocabulary size {len(vocab)}")

    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(vocab),
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": vocab["<bos>"],
        "eos_token_id": vocab["<eos>"],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if generation_eos is not None:
        generation_config = {"eos_token_id": [vocab[token] for token in generation_eos]}
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    write_tokenizer(path, vocab, CHAT_TEMPLATES[chat_template])

    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if next_tokens is not None:
        weights.update(scripted_weights(weights, vocab, next_tokens, default_next, hidden_size))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return TinyModel(path=path, vocab=vocab)


def scripted_weights(weights, vocab, next_tokens, default_next, hidden_size):
    """Return weights that make greedy decoding follow the bigram table.

    With zero o_proj and down_proj the final hidden state is RMSNorm(embedding[token]).
    The embedding of token i is the unit vector e_i, so lm_head row j is e_i for every
    i whose successor is j, and token j gets the only positive logit.
    """
    import mlx.core as mx

    updates = {}
    for name, value in weights.items():
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            updates[name] = mx.zeros_like(value)

    vocab_size = len(vocab)
    embedding = mx.eye(vocab_size, hidden_size)
    lm_head = [[0.0] * hidden_size for _ in range(vocab_size)]
    for token, index in vocab.items():
        successor = vocab[next_tokens.get(token, default_next)]
        lm_head[successor][index] = 1.0

    updates["model.embed_tokens.weight"] = embedding
    updates["model.norm.weight"] = mx.ones((hidden_size,))
    updates["lm_head.weight"] = mx.array(lm_head)
    return updates
