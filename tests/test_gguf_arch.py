"""GGUF export for every architecture llama.cpp runs: each file is read by llama.cpp itself (llama-cpp-python) and,
where transformers has a GGUF loader for the architecture, by transformers; both must give slimlm's logits.

The tiny models have random norm weights and biases (not HF's init of ones / zeros), so a norm written under the
wrong name, without Gemma's +1, or a bias dropped, moves the logits by O(1) instead of hiding.
"""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, tiny_tokenizer

from slimlm.data.calibration import CalibrationSet
from slimlm.errors import SlimlmError
from slimlm.export import export_model
from slimlm.export.gguf import check_gguf_config, write_gguf
from slimlm.export.gguf_arch import ARCHITECTURES, head_dim
from slimlm.models.adapters import adapter_for
from slimlm.pipeline import compress_
from slimlm.prune.depth import DepthConfig, prune_depth_
from slimlm.prune.width import WidthConfig, prune_width_
from slimlm.recipes import parse_recipe

IDS = [5, 17, 42, 99, 3, 250, 7, 8, 11, 64, 200, 31, 9, 10, 12, 13, 14, 15, 16, 18]  # longer than the sliding windows
GPT2 = dict(
    vocab_size=320, bos_token_id=1, eos_token_id=2, pad_token_id=0, n_embd=64, n_layer=2, n_head=4, n_positions=256
)

# Gemma 2/3 use a sliding window of 8 < len(IDS), so llama.cpp's SWA masks are exercised; head_dim 16 with
# query_pre_attn_scalar 256 (the HF default) makes the query-scale fold necessary.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**TINY),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=32),
    "gemma": lambda: transformers.GemmaConfig(**TINY, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **TINY, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3": lambda: transformers.Phi3Config(**TINY),
    "gpt2": lambda: transformers.GPT2Config(**GPT2),
}
GELU = {"gemma", "gemma2", "gemma3_text", "gpt2"}  # ggml's GELU reads a float16 table: ~3e-4 of the largest logit


def model_from(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms and biases
                param.add_(torch.randn_like(param) * 0.3)
    return model


def logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].numpy()


def llama_cpp_logits(path, ids=IDS) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # float32 K/V cache (type 0 = GGML_TYPE_F32): llama.cpp's default F16 cache would add its own rounding
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False, type_k=0, type_v=0
    )
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_every_adapter_architecture_has_a_gguf_row_or_a_reason():
    from slimlm.export.gguf_arch import NOT_IN_LLAMA_CPP
    from slimlm.models.adapters import ADAPTERS

    assert set(ADAPTERS) == set(ARCHITECTURES) | set(NOT_IN_LLAMA_CPP)
    assert set(CONFIGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_llama_cpp_computes_slimlm_logits(arch, tmp_path):
    """f32 file: llama.cpp's logits at every position are slimlm's (its GELU table aside)."""
    model = model_from(CONFIGS[arch]())
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, "f32")
    tolerance = 1e-3 if arch in GELU else 1e-4  # measured: ≤ 4e-4 (GELU), ≤ 1e-5 otherwise
    assert relative_error(llama_cpp_logits(path), logits(model)) < tolerance


@pytest.mark.parametrize(
    ("arch", "stage", "gguf_type"),
    [
        ("phi3", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0"),  # fused qkv / gate_up
        ("gpt2", {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False}, "q4_1"),  # Conv1D codes
        ("gemma3_text", {"method": "rtn", "bits": 8, "group_size": None, "symmetric": True}, "q8_0"),
        ("qwen3", {"method": "rtn", "bits": 5, "group_size": 32, "symmetric": True}, "q5_0"),
        ("gemma2", {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True}, "q4_0"),  # query scale on d
    ],
)
def test_quantized_codes_of_every_layout_run_in_llama_cpp(arch, stage, gguf_type, tmp_path):
    """Codes kept as blocks; the (tied) embedding is Q8_0 in the file, so slimlm's reference holds its round trip."""
    model = model_from(CONFIGS[arch]())
    compress_(
        model,
        parse_recipe([stage], "test"),
        CalibrationSet(torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1)), "", "test", 0),
    )
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tiny_tokenizer(), path, gguf_type)
    assert summary.codes_kept == 2 * len(adapter_for(arch).linears())
    embed = model.get_input_embeddings().weight
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        embed.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(embed.numpy(), q8), q8)))
        if model.get_output_embeddings().weight.data_ptr() != embed.data_ptr():
            head = model.get_output_embeddings().weight
            head.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(head.numpy(), q8), q8)))
    # measured: 0.4% (llama) to 2.0% (gemma2, its √hidden-scaled embeddings) of the largest logit, all of it llama.cpp's
    # Q8_0 activations (the same model written f32 agrees to 3e-4); a wrong layout or scale is of order 100%
    assert relative_error(llama_cpp_logits(path), logits(model)) < 3e-2


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "gemma3_text", "qwen3"])
def test_pruned_shapes_run_in_llama_cpp(arch, tmp_path):
    """Width-pruned (fewer heads, a narrower fused gate_up / Conv1D MLP) and depth-pruned (Gemma 3's per-layer sliding
    pattern follows the kept blocks) models are written with their own shapes."""
    model = model_from(CONFIGS[arch]())
    mlp_width = 4 * model.config.n_embd if arch == "gpt2" else model.config.intermediate_size
    calibration = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    prune_width_(model, WidthConfig(mlp=0.25, heads=0.0 if arch in ("gpt2", "phi3") else 0.5), calibration)
    if arch == "gemma3_text":
        model.config.num_hidden_layers, model.config.layer_types = 2, ["full_attention", "sliding_attention"]
        prune_depth_(model, DepthConfig(blocks=1), calibration)
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, "f32")
    fields = gguf.GGUFReader(path).fields
    name = ARCHITECTURES[arch].name
    assert fields[f"{name}.feed_forward_length"].contents() == mlp_width * 3 // 4
    assert relative_error(llama_cpp_logits(path), logits(model)) < (1e-3 if arch in GELU else 1e-4)


SHORT, LONG = [1.0 + 0.25 * i for i in range(8)], [2.0 + i for i in range(8)]


@pytest.mark.parametrize(
    ("config", "reference"),
    [
        (
            lambda: transformers.LlamaConfig(
                **TINY,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            ),
            None,
        ),
        # llama.cpp picks LongRoPE's long factors when its context (64, padded to 256) exceeds the original length,
        # transformers when the sequence does: each case is compared with the factors both sides use
        (
            lambda: transformers.Phi3Config(
                **{**TINY, "max_position_embeddings": 2048},
                original_max_position_embeddings=512,
                rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
            ),
            None,
        ),
        (
            lambda: transformers.Phi3Config(
                **TINY,
                original_max_position_embeddings=64,
                rope_scaling={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG},
            ),
            lambda: transformers.Phi3Config(
                **TINY,
                original_max_position_embeddings=64,
                rope_scaling={"rope_type": "longrope", "short_factor": LONG, "long_factor": LONG},
            ),
        ),
        (
            lambda: transformers.Gemma3TextConfig(
                **TINY,
                head_dim=16,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                },
            ),
            None,
        ),
    ],
    ids=["llama3", "longrope-short", "longrope-long", "gemma3-linear-global"],
)
def test_rope_frequency_factors_reach_llama_cpp(config, reference, tmp_path):
    """Llama 3's wavelength-dependent scaling (rope_freqs), Phi-3's LongRoPE factors and attention factor, Gemma 3's
    linear scaling of the global layers only (the sliding ones keep their own base, unscaled)."""
    model = model_from(config())
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, "f32")
    if reference is not None:
        same_weights = model_from(reference())
        same_weights.load_state_dict(model.state_dict())
        model = same_weights
    assert relative_error(llama_cpp_logits(path), logits(model)) < (1e-3 if model.config.model_type in GELU else 1e-4)


# transformers' GGUF loader reads fewer keys than llama.cpp: no attention.key_length for qwen3, no
# query_pre_attn_scalar / sliding_window_pattern / rope_freq_base_swa for gemma2/3, n_ctx instead of GPT-2's
# n_positions; and it has no Gemma 1. These configs keep what it cannot read at its defaults.
LOADER_CONFIGS = {
    "llama": CONFIGS["llama"],
    "mistral": CONFIGS["mistral"],
    "qwen2": CONFIGS["qwen2"],
    "qwen3": lambda: transformers.Qwen3Config(**TINY),
    "phi3": CONFIGS["phi3"],
    "gpt2": lambda: transformers.GPT2Config(**{**GPT2, "n_positions": 1024}),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, head_dim=256, sliding_window=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=256, sliding_window=8),
}


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
@pytest.mark.parametrize("arch", sorted(LOADER_CONFIGS))
def test_transformers_gguf_loader_computes_slimlm_logits(arch, gguf_type, tmp_path):
    model = model_from(LOADER_CONFIGS[arch]())
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, gguf_type)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    assert loaded.config.model_type == ("llama" if arch == "mistral" else arch)  # llama.cpp runs Mistral as llama
    expected = logits(model)
    assert relative_error(logits(loaded), expected) < (1e-6 if gguf_type == "f32" else 3e-3)


@pytest.mark.parametrize("gguf_type", ["f32", "q8_0", "q4_1"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_slimlm_reads_a_llama_family_gguf_as_transformers_does(arch, gguf_type, tmp_path):
    """slimlm's own GGUF reader (one parse) gives transformers' GGUF loader's weights bit for bit (q/k rows permuted
    back, biases, q/k norms, the tied or untied head) and the same config where transformers reads the keys."""
    from slimlm.models.gguf_load import dense_checkpoint
    from slimlm.models.load import load_model

    model = model_from(LOADER_CONFIGS[arch]())
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, gguf_type)
    assert dense_checkpoint(path) is not None  # read by slimlm, not handed to transformers
    ours = load_model(str(path)).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    for key in ("model_type", "hidden_size", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours.config, key) == getattr(theirs.config, key), key
    assert head_dim(ours.config) == head_dim(theirs.config)
    assert ours.config.rope_parameters["rope_theta"] == theirs.config.rope_parameters["rope_theta"]
    assert np.array_equal(logits(ours), logits(theirs))


def test_slimlm_reads_the_head_dim_transformers_gguf_loader_misses(tmp_path):
    """A Qwen3 whose head_dim is not hidden / heads: the file's attention.key_length is read (transformers' loader
    derives it from the hidden size), so the model computes slimlm's logits."""
    from slimlm.models.load import load_model

    model = model_from(CONFIGS["qwen3"]())
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, "f32")
    assert relative_error(logits(load_model(str(path)).model), logits(model)) < 1e-6


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "gpt2"])
def test_other_architectures_are_left_to_transformers_gguf_loader(arch, tmp_path):
    from slimlm.models.gguf_load import dense_checkpoint
    from slimlm.models.load import load_model

    model = model_from(LOADER_CONFIGS[arch]())
    path = tmp_path / "m.gguf"
    write_gguf(model, tiny_tokenizer(), path, "f32")
    assert dense_checkpoint(path) is None
    assert relative_error(logits(load_model(str(path)).model), logits(model)) < 1e-6


# --- tokenizers ---------------------------------------------------------------------------------------------------

TEXT = "The quick brown fox, 1234 times — naïve café!\nsmall language models are compressed, re-compressed."


def tiny_sentencepiece_tokenizer(merges_wanted: int = 360):
    """A Gemma tokenizer as transformers builds it for a SentencePiece checkpoint (BPE, byte fallback, "▁" for a
    space, <0xXX> pieces), with merges trained in memory on the default corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from slimlm.data.text import load_text

    trainer_side = Tokenizer(models.BPE())
    trainer_side.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=merges_wanted, show_progress=False)
    trainer_side.train_from_iterator([load_text("default", "calibration").text[:50_000]], trainer)
    learned = json.loads(trainer_side.to_str())["model"]
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    return transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def tiny_llama2_tokenizer():
    """The same pieces as transformers' LlamaTokenizer builds them (Llama 2, Mistral v0.1): a space is prepended
    (Metaspace, prepend_scheme "first"). HF skips that space before text that starts with one, SentencePiece and
    llama.cpp do not: the texts here do not start with a space."""
    gemma = tiny_sentencepiece_tokenizer()
    merges = [tuple(m) for m in json.loads(gemma.backend_tokenizer.to_str())["model"]["merges"]]
    return transformers.LlamaTokenizer(
        vocab=gemma.get_vocab(),
        merges=merges,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        add_bos_token=True,
    )


def tiny_split_tokenizer(regex: str):
    """A byte-level BPE behind a regex split, as Llama 3's and Qwen2's tokenizer.json have it, over the full byte
    alphabet, trained in memory on the default corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from slimlm.data.text import load_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([load_text("default", "calibration").text[:50_000]], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eos|>")


def tokenizer_of(kind: str):
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from slimlm.export.gguf_vocab import LLAMA3_SPLIT

    return {
        "sentencepiece": tiny_sentencepiece_tokenizer,
        "sentencepiece-prefix": tiny_llama2_tokenizer,
        "gpt-2": tiny_tokenizer,
        "llama-bpe": lambda: tiny_split_tokenizer(LLAMA3_SPLIT),
        "qwen2": lambda: tiny_split_tokenizer(PRETOKENIZE_REGEX),
    }[kind]()


@pytest.mark.parametrize("kind", ["sentencepiece", "sentencepiece-prefix", "gpt-2", "llama-bpe", "qwen2"])
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(kind, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    tokenizer = tokenizer_of(kind)
    arch = {
        "sentencepiece": "gemma3_text",
        "sentencepiece-prefix": "llama",
        "gpt-2": "gpt2",
        "llama-bpe": "llama",
        "qwen2": "qwen2",
    }[kind]
    config = CONFIGS[arch]()
    config.vocab_size = 704
    path = tmp_path / "m.gguf"
    write_gguf(model_from(config), tokenizer, path, "f32")
    fields = gguf.GGUFReader(path).fields
    sentencepiece = kind.startswith("sentencepiece")
    assert fields["tokenizer.ggml.model"].contents() == ("llama" if sentencepiece else "gpt2")
    assert fields["tokenizer.ggml.pre"].contents() == ("default" if sentencepiece else kind)
    # conftest's byte-level BPE learned only the characters of its corpus (no full byte alphabet): plain text for it
    text = (
        TEXT
        if kind != "gpt-2"
        else "The quick brown fox, 1234 times, naive cafe.\nsmall language models are compressed."
    )
    expected = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in expected
    assert len(expected) < len(text) * 0.8  # merges are in play, not just characters
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected  # add_bos: if the file says so
    assert llm.detokenize(expected).decode() == text  # after <bos>, llama.cpp drops the prepended space as HF does
    if sentencepiece:
        assert fields["tokenizer.ggml.add_space_prefix"].contents() is (kind == "sentencepiece-prefix")
        types = fields["tokenizer.ggml.token_type"].contents()
        assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
        assert (
            types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
            and types[tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN
        )
        assert expected[0] == tokenizer.bos_token_id and fields["tokenizer.ggml.add_bos_token"].contents() is True
        rebuilt = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        assert rebuilt(text).input_ids == expected


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            lambda: transformers.OPTConfig(
                vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4
            ),
            "llama.cpp has no OPT architecture",
        ),
        (
            lambda: transformers.GemmaConfig(**TINY, head_dim=16, tie_word_embeddings=False),
            "always reads token_embd as the output",
        ),
        (lambda: transformers.LlamaConfig(**TINY, hidden_act="gelu"), "activation is 'gelu'"),
        (
            lambda: transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8),
            "sliding-window attention",
        ),
        (lambda: transformers.MistralConfig(**TINY, sliding_window=16), "sliding-window attention"),
        (
            lambda: transformers.GPT2Config(**GPT2, scale_attn_by_inverse_layer_idx=True),
            "scale_attn_by_inverse_layer_idx",
        ),
        (
            lambda: transformers.LlamaConfig(**TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
            "RoPE scaling 'dynamic'",
        ),
        (lambda: transformers.Qwen3Config(**TINY, attention_bias=True), "no attention output bias"),
        (
            lambda: transformers.Qwen2Config(
                **{**TINY, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=16
            ),
            "sizes the query and output projections hidden × hidden",
        ),
        (
            lambda: transformers.Phi3Config(
                **{**TINY, "num_attention_heads": 2, "num_key_value_heads": 1}, head_dim=16
            ),
            "sizes the query and output projections hidden × hidden",
        ),
    ],
    ids=[
        "opt",
        "gemma-untied",
        "llama-gelu",
        "qwen2-swa",
        "mistral-swa",
        "gpt2-layer-scaling",
        "dynamic-rope",
        "qwen3-bias",
        "qwen2-head-pruned",
        "phi3-head-pruned",
    ],
)
def test_what_llama_cpp_cannot_run_is_refused_from_the_config(config, message, tmp_path):
    with pytest.raises(SlimlmError, match=message):
        check_gguf_config(config())
    directory = tmp_path / "model"
    directory.mkdir()
    config().save_pretrained(directory)  # no weights: refused before any would load
    with pytest.raises(SlimlmError, match=message) as refused:
        export_model(str(directory), "gguf", tmp_path / "m.gguf")
    assert "\n" not in str(refused.value) and "--format compressed-tensors" in str(refused.value)
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_tokenizer_kind_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(SlimlmError, match="neither"):
        write_gguf(model_from(CONFIGS["llama"]()), word_level, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()
