"""What `slimlm chat` and `slimlm serve` generate with: one `Backend` protocol, two engines.

- `TransformersBackend`: every form slimlm reads (alias, HF directory, slimlm / compressed-tensors directory,
  .gguf through transformers' GGUF loader). A token loop over a KV cache (slimlm's KIVI cache with `kv_bits`),
  sampled by `slimlm.serve.sampling` with llama.cpp's chain; speculative decoding with a draft from either engine
  (a GGUF drafting in llama.cpp costs a fraction of a transformers forward per token, so it is the draft that pays).
  Packed int4 linears are unpacked once at load (`dequantize_linears_`), the same values the packed module computes
  on every call, so decode is as fast as the dense model, at the dense model's memory.
- `LlamaCppBackend`: a .gguf file run by llama.cpp through llama-cpp-python (the `engines` extra): its own
  tokenizer, sampler chain and the chat template stored in the file.

Both hand out raw token ids (`tokens`); `generate` is the one loop around them that decodes text incrementally,
stops at end of turn / `max_tokens` / stop strings / the context, and times TTFT and decode.
"""

from __future__ import annotations

import codecs
import copy
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from slimlm.errors import SlimlmError
from slimlm.serve.forward import forward
from slimlm.serve.sampling import SamplingSettings, StopStrings, draw, make_generator, probabilities
from slimlm.serve.settings import DRAFT_TOKENS

PROBE_CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "probe-question"},
    {"role": "assistant", "content": "probe-answer"},
    {"role": "user", "content": "probe-follow-up"},
]


@dataclass
class Generation:
    """One answer as it streams: iterate for text pieces; the counts and timings are final once it is exhausted."""

    prompt_tokens: int
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of turn or a stop string) | "length" (max_tokens or context)
    ttft_s: float | None = None  # request to first token (prefill + first step)
    decode_s: float = 0.0  # first token to last
    speculative: dict | None = None  # acceptance counts when a draft model proposed tokens
    pieces: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second of decoding (the first token's time is TTFT)."""
        return (
            (self.completion_tokens - 1) / self.decode_s if self.completion_tokens > 1 and self.decode_s > 0 else None
        )

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def summary(self) -> str:
        """The line printed after each chat answer."""
        parts = [f"{self.completion_tokens} tokens"]
        if self.ttft_s is not None:
            parts.append(f"TTFT {self.ttft_s * 1000:.0f} ms ({self.prompt_tokens}-token prompt)")
        if self.decode_tokens_per_s is not None:
            parts.append(f"{self.decode_tokens_per_s:.1f} tok/s")
        if self.speculative and self.speculative["drafted"]:
            spec = self.speculative
            parts.append(
                f"draft acceptance {spec['accepted'] / spec['drafted']:.0%}, {spec['accepted'] / spec['rounds']:.2f} accepted per target step"
            )
        return " · ".join(parts)


class Backend(Protocol):
    """An engine holding one model: renders prompts, streams token ids, decodes them."""

    engine: str  # "transformers" | "llama.cpp"
    source: str  # what the user named
    description: str  # how it was loaded, shown to the user
    context_length: int
    chat_template: str | None
    end_ids: set[int]  # tokens that end a turn
    vocab_size: int  # token ids it knows

    def render_chat(self, messages: list[dict]) -> list[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> str: ...

    def is_end(self, token_id: int) -> bool: ...

    def decoder(self) -> Callable[[int], str]: ...

    def tokens(self, prompt_ids: list[int], settings: SamplingSettings, stats: dict) -> Iterator[int]: ...

    def drafter(self): ...  # a fresh `serve.speculative.Drafter` over this model

    def log_probs(self, ids: list[int], start: int): ...


def generate(backend: Backend, prompt_ids: list[int], settings: SamplingSettings) -> Generation:
    """Stream an answer to `prompt_ids`; refuses a prompt the context cannot hold (a one-line error)."""
    if len(prompt_ids) >= backend.context_length:
        raise SlimlmError(
            f"the prompt is {len(prompt_ids)} tokens, the model's context holds {backend.context_length}",
            "shorten the prompt or the conversation (/reset in chat)",
        )
    result = Generation(prompt_tokens=len(prompt_ids))
    result.pieces = _stream(backend, prompt_ids, settings, result)
    return result


def _stream(backend: Backend, prompt_ids: list[int], settings: SamplingSettings, result: Generation) -> Iterator[str]:
    room = backend.context_length - len(prompt_ids)
    limit = room if settings.max_tokens == -1 else min(settings.max_tokens, room)
    stops, decode = StopStrings(settings.stop), backend.decoder()
    stats: dict = {}
    start = time.perf_counter()
    tokens = backend.tokens(prompt_ids, settings, stats)
    try:
        for token in tokens:
            now = time.perf_counter()
            if result.ttft_s is None:
                result.ttft_s, first = now - start, now
            result.decode_s = now - first
            if backend.is_end(token):
                result.finish_reason = "stop"
                break
            result.token_ids.append(token)
            result.completion_tokens += 1
            shown = stops.feed(decode(token))
            if shown:
                result.text += shown
                yield shown
            if stops.stopped:
                result.finish_reason = "stop"
                break
            if result.completion_tokens >= limit:
                result.finish_reason = "length"
                break
    finally:
        tokens.close()
        result.speculative = stats or None
    rest = stops.flush()
    if rest:
        result.text += rest
        yield rest


# --- transformers ----------------------------------------------------------------------------------------------


class TransformersBackend:
    """A transformers causal LM on CPU/CUDA, decoded token by token over a KV cache."""

    engine = "transformers"

    def __init__(self, loaded, kv_cache=None):
        from slimlm.export.hf import dequantize_linears_
        from slimlm.quantize.kv_cache import check_kv_cache, kv_cache_setting

        self.model, self.tokenizer, self.source = loaded.model, loaded.tokenizer, loaded.source
        unpacked = dequantize_linears_(self.model)
        self.kv_cache = kv_cache if kv_cache is not None else kv_cache_setting(self.model)
        if self.kv_cache is not None:
            check_kv_cache(self.model, self.kv_cache)
        how = {
            "alias-gguf": "GGUF via transformers' GGUF loader (dequantized)",
            "gguf": "GGUF via transformers' GGUF loader (dequantized)",
        }
        self.description = f"{loaded.resolved} · transformers ({how.get(loaded.kind, loaded.kind)}) on {next(self.model.parameters()).device}"
        if unpacked:
            self.description += f" · {unpacked} packed linears unpacked once to dense weights"
        if self.kv_cache is not None:
            self.description += f" · {self.kv_cache.describe()}"
        config = self.model.config.get_text_config(decoder=True)
        self.context_length = int(
            getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
        )
        self.chat_template = getattr(self.tokenizer, "chat_template", None) or None
        self.end_ids = turn_end_ids(self.model, self.tokenizer)
        self.vocab_size = len(self.tokenizer)
        self.draft: Backend | None = None  # set by `with_draft`
        self.draft_tokens = DRAFT_TOKENS

    def with_draft(self, draft: Backend, draft_tokens: int = DRAFT_TOKENS) -> TransformersBackend:
        """The same model (shared, not copied) decoding speculatively with `draft` (either engine)."""
        check_draft(self, draft)
        other = copy.copy(self)
        other.draft, other.draft_tokens = draft, draft_tokens
        other.description = (
            f"{self.description} · speculative: {draft_tokens} tokens drafted by {draft.source} in {draft.engine}"
        )
        return other

    def drafter(self):
        from slimlm.serve.speculative import ModuleDrafter

        return ModuleDrafter(self.model)

    def render_chat(self, messages: list[dict]) -> list[int]:
        """The conversation through the model's own chat template, ending where the assistant speaks."""
        if not self.chat_template:
            raise SlimlmError(
                f"{self.source} has no chat template",
                "use plain completion (/v1/completions), or a model with a template",
            )
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # jinja2's TemplateError, or the template's own raise_exception()
            raise SlimlmError(
                f"the chat template of {self.source} fails to render these messages ({type(err).__name__}: {err})",
                "check the roles and their order (system first, then user/assistant turns)",
            ) from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def is_end(self, token_id: int) -> bool:
        return token_id in self.end_ids

    def decoder(self) -> Callable[[int], str]:
        """Text of each new token: decoding the whole tail keeps multi-token characters and spaces right."""
        ids: list[int] = []
        shown = ""

        def add(token: int) -> str:
            nonlocal shown
            ids.append(token)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                return ""
            new, shown = text[len(shown) :], text
            return new

        return add

    def tokens(self, prompt_ids: list[int], settings: SamplingSettings, stats: dict) -> Iterator[int]:
        if self.draft is not None:
            from slimlm.serve.speculative import speculative_tokens

            context = min(self.context_length, self.draft.context_length)
            return speculative_tokens(
                self.model, self.draft.drafter(), prompt_ids, settings, self.draft_tokens, stats, context
            )
        return self._plain_tokens(prompt_ids, settings)

    def _plain_tokens(self, prompt_ids: list[int], settings: SamplingSettings) -> Iterator[int]:
        from slimlm.quantize.kv_cache import make_cache

        generator = make_generator(settings.seed)
        cache = make_cache(self.model, self.kv_cache)
        logits = forward(self.model, prompt_ids, cache)[-1]
        while True:
            token = int(logits.argmax()) if settings.greedy else draw(probabilities(logits, settings), generator)
            yield token
            logits = forward(self.model, [token], cache)[-1]

    def log_probs(self, ids: list[int], start: int):
        """Log-probabilities (T - start, V) of the next token at each position from `start - 1` on: row i scores
        ids[start + i] (teacher forcing, one forward)."""
        logits = forward(self.model, ids, None)
        return logits[start - 1 : len(ids) - 1].float().log_softmax(-1)


def turn_end_ids(model, tokenizer) -> set[int]:
    """Tokens that end a turn: the generation config's eos ids (SmolLM2: <|im_end|>) and the tokenizer's eos."""
    ends = getattr(model.generation_config, "eos_token_id", None)
    ends = set(ends if isinstance(ends, list) else [] if ends is None else [ends])
    if tokenizer.eos_token_id is not None:
        ends.add(tokenizer.eos_token_id)
    return ends


def check_draft(target: Backend, draft: Backend) -> None:
    """Refuse a draft whose tokens mean something else: its ids are fed to the target as they are. Compared across
    engines: the same text gives the same ids, and the target's end-of-turn ids are the same tokens in the draft
    (llama.cpp counts more tokens as ends of generation than a transformers config lists)."""
    probe = "Speculative decoding: the draft's token ids must mean the target's. 1234 ünïcode"
    same_ends = all(
        end < draft.vocab_size and draft.detokenize([end]) == target.detokenize([end]) for end in target.end_ids
    )
    if target.encode(probe) != draft.encode(probe) or not same_ends:
        raise SlimlmError(
            f"the draft {draft.source} does not share the tokenizer of {target.source} (the same text gives other token ids)",
            "draft with a model of the same family and tokenizer, e.g. a slimlm-compressed copy of the target",
        )


def check_chat_template(backend: Backend) -> None:
    """Render a probe conversation through the model's template now, so a broken template (or one lost in export)
    is said at load, not on the first message."""
    if not backend.chat_template:
        return
    rendered = backend.render_chat(PROBE_CONVERSATION)
    text = backend.detokenize(rendered)
    missing = [m["content"] for m in PROBE_CONVERSATION[1:] if m["content"] not in text]
    if missing:
        raise SlimlmError(
            f"the chat template of {backend.source} drops messages (e.g. {missing[0]!r} is not in the prompt it renders)",
            "fix tokenizer_config.json's chat_template, or re-export from the original model",
        )


# --- llama.cpp -------------------------------------------------------------------------------------------------


class LlamaCppBackend:
    """A .gguf file run by llama.cpp (llama-cpp-python): its tokenizer, sampler chain and stored chat template."""

    engine = "llama.cpp"

    def __init__(
        self,
        path: Path,
        source: str,
        context_length: int | None = None,
        threads: int | None = None,
        logits_all: bool = False,
        reuse_prompt: bool = True,
    ):
        import llama_cpp

        from slimlm.models.gguf_check import check_gguf_file

        check_gguf_file(path)
        try:
            self.llm = _llama(path, context_length, threads, logits_all)
        except (ValueError, RuntimeError) as err:
            raise SlimlmError(
                f"llama.cpp could not load '{path}' ({err})", "check that the file is a complete GGUF model"
            ) from None
        self.source = source
        self.reuse_prompt = reuse_prompt
        self.context_length = self.llm.n_ctx()
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template") or None
        vocab = self.llm._model.vocab
        self._is_eog = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))
        self.vocab_size = self.llm.n_vocab()
        self.end_ids = {t for t in range(self.vocab_size) if self._is_eog(t)}
        self.add_bos = self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.description = f"{path} · llama.cpp {getattr(llama_cpp, '__version__', '')} via llama-cpp-python · {self.llm.n_threads} threads · context {self.context_length}"

    def render_chat(self, messages: list[dict]) -> list[int]:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.chat_template:
            raise SlimlmError(
                f"{self.source} has no chat template (no tokenizer.chat_template in the GGUF)",
                "use plain completion (/v1/completions), or export from a model with a template",
            )
        bos, eos = (
            self.llm.detokenize([t], special=True).decode(errors="replace")
            for t in (self.llm.token_bos(), self.llm.token_eos())
        )
        try:
            prompt = Jinja2ChatFormatter(template=self.chat_template, eos_token=eos, bos_token=bos)(
                messages=messages
            ).prompt
        except Exception as err:  # jinja2 errors, or the template's raise_exception()
            raise SlimlmError(
                f"the chat template of {self.source} fails to render these messages ({type(err).__name__}: {err})",
                "check the roles and their order (system first, then user/assistant turns)",
            ) from None
        return self.llm.tokenize(prompt.encode(), add_bos=self.add_bos and not prompt.startswith(bos), special=True)

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=self.add_bos, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids, special=True).decode(errors="replace")

    def is_end(self, token_id: int) -> bool:
        return self._is_eog(token_id)

    def decoder(self) -> Callable[[int], str]:
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: utf8.decode(self.llm.detokenize([token], special=False))

    def tokens(self, prompt_ids: list[int], settings: SamplingSettings, stats: dict) -> Iterator[int]:
        """llama.cpp samples with its own chain (top-k → top-p → min-p → temperature). With `reuse_prompt` the
        prompt's longest prefix already in llama.cpp's cache is reused (multi-turn chat re-reads only the new turn);
        without, every prompt is read whole, so an answer depends on its request alone: a prefix read in another
        batch split rounds differently, which flipped 2 of 20 greedy SmolLM2 answers (measured)."""
        if not self.reuse_prompt:
            self.llm.reset()
        self.llm.set_seed(settings.seed if settings.seed != -1 else int.from_bytes(os.urandom(4), "little"))
        return self.llm.generate(
            prompt_ids,
            temp=max(settings.temp, 0.0),
            top_k=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            repeat_penalty=1.0,
            reset=True,
        )

    def drafter(self) -> LlamaCppDrafter:
        return LlamaCppDrafter(self.llm)

    def log_probs(self, ids: list[int], start: int):
        import torch

        if not self.llm._logits_all:
            raise SlimlmError(
                "this llama.cpp model was loaded without per-position logits", "load it with logits_all=True"
            )
        self.llm.reset()
        self.llm.eval(ids)
        scores = torch.from_numpy(self.llm.scores[start - 1 : len(ids) - 1].copy())
        return scores.float().log_softmax(-1)


def _llama(path: Path, context_length: int | None, threads: int | None, logits_all: bool):
    """llama-cpp-python's model with flash attention, as llama-cli runs it by default (`-fa auto`: on for the CPU),
    so greedy answers are llama-cli's own (a near-tie flips with the attention's arithmetic: measured on the shipped
    SmolLM2, token 4 of "What is the capital of France?"), and faster (SmolLM2 Q4_0, llama-bench, 2 threads: prompt
    660 -> 843 tok/s, decode 162 -> 177). Without it where this llama.cpp cannot run it for the model."""
    import llama_cpp

    options = dict(
        model_path=str(path), n_ctx=context_length or 0, n_threads=threads, logits_all=logits_all, verbose=False
    )
    try:
        return llama_cpp.Llama(**options, flash_attn=True)
    except (ValueError, RuntimeError):
        return llama_cpp.Llama(**options)


class LlamaCppDrafter:
    """llama.cpp's context as a speculative draft: `eval` appends tokens, and a rollback only lowers the count of
    tokens held (llama-cpp-python's next `eval` drops the cache past it before decoding)."""

    def __init__(self, llm):
        llm.reset()  # a fresh context: one answer's drafts never see another's
        self.llm = llm

    @property
    def length(self) -> int:
        return self.llm.n_tokens

    def extend(self, ids: list[int]):
        import llama_cpp
        import numpy as np
        import torch

        self.llm.eval(ids)
        last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last token's logits (the only ones computed)
        return torch.from_numpy(np.ctypeslib.as_array(last, shape=(self.llm.n_vocab(),)).copy())

    def rollback(self, length: int) -> None:
        self.llm.n_tokens = length


# --- loading ---------------------------------------------------------------------------------------------------


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def load_backend(
    source: str,
    engine: str = "auto",
    kv_bits: int | None = None,
    draft: str | None = None,
    draft_tokens: int = DRAFT_TOKENS,
    device: str | None = None,
    logits: bool = False,
    threads: int | None = None,
    reuse_prompt: bool = True,
) -> Backend:
    """The backend for what the user named. engine "auto": llama.cpp for a .gguf (or the alias) when
    llama-cpp-python is installed and nothing needs transformers (`kv_bits`, `draft`), else transformers.
    A `draft` runs where `load_draft` puts it (a .gguf in llama.cpp unless engine is "transformers").
    `threads`: llama.cpp's threads (default: every core, as llama-cli) or torch's (default: torch's own).
    `reuse_prompt`: llama.cpp reuses the cached prefix of the previous prompt (chat); False for a server, whose
    answers must not depend on the requests before them."""
    if engine not in ("auto", "transformers", "llama.cpp"):
        raise SlimlmError(f"unknown engine {engine!r}", "pass --engine auto, transformers or llama.cpp")
    path, is_gguf = _model_path(source)
    needs_transformers = [flag for flag, value in (("--kv-bits", kv_bits), ("--draft", draft)) if value is not None]
    if engine == "llama.cpp":
        if not is_gguf:
            raise SlimlmError(
                f"--engine llama.cpp runs .gguf files; {source} is not one",
                "export it with `slimlm export MODEL --format gguf`, or use --engine transformers",
            )
        if needs_transformers:
            raise SlimlmError(
                f"{needs_transformers[0]} runs in the transformers engine, not llama.cpp",
                f"drop {needs_transformers[0]} or use --engine transformers",
            )
        if not llama_cpp_available():
            raise SlimlmError("--engine llama.cpp needs llama-cpp-python", "pip install 'slimlm[engines]'")
    if is_gguf and engine != "transformers" and not needs_transformers and llama_cpp_available():
        return LlamaCppBackend(
            path, source, threads=threads or os.cpu_count(), logits_all=logits, reuse_prompt=reuse_prompt
        )
    import torch

    from slimlm.models.load import load_model
    from slimlm.quantize.kv_cache import KVCacheConfig

    if threads:
        torch.set_num_threads(threads)

    kv_cache = KVCacheConfig(bits=kv_bits) if kv_bits is not None else None
    draft_backend = None
    if draft is not None:
        if kv_cache is not None:
            raise SlimlmError(
                "--kv-bits with --draft: slimlm's quantized KV cache cannot be rolled back, and speculative decoding drops the rejected draft tokens from the cache",
                "use one of the two (re-reading the whole context after every rejection would cost more than the draft saves)",
            )
        draft_backend = load_draft(draft, engine, device, threads)
    target = TransformersBackend(load_model(source, device=device), kv_cache=kv_cache)
    if draft_backend is not None:
        if target.kv_cache is not None:
            raise SlimlmError(
                f"{source} carries a quantized KV-cache setting, which cannot be rolled back for speculative decoding",
                "drop --draft, or use a copy of the model without the kv-cache stage",
            )
        target = target.with_draft(draft_backend, draft_tokens)
    if is_gguf and not llama_cpp_available():
        target.description += (
            " (llama-cpp-python is not installed: pip install 'slimlm[engines]' to run it in llama.cpp)"
        )
    return target


def load_draft(
    source: str, engine: str = "auto", device: str | None = None, threads: int | None = None, allow_pickle: bool = False
) -> Backend:
    """A speculative draft: a .gguf (or the alias) in llama.cpp when llama-cpp-python is installed and engine is not
    "transformers" (its decode costs a fraction of a transformers forward: the draft that speeds the target up),
    else the model in transformers. Drafting and verifying alternate, so llama.cpp may take every core."""
    from slimlm.models.load import load_model

    path, is_gguf = _model_path(source)
    if is_gguf and engine != "transformers" and llama_cpp_available():
        return LlamaCppBackend(path, source, threads=threads or os.cpu_count(), reuse_prompt=False)
    return TransformersBackend(load_model(source, device=device, allow_pickle=allow_pickle))


def _model_path(source: str) -> tuple[Path, bool]:
    """Where `source` lives, and whether it is a .gguf file (a directory holding exactly one counts)."""
    from slimlm.models.load import ALIASES, resolve_alias

    path = resolve_alias(source) if source in ALIASES else Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and len(list(path.glob("*.gguf"))) == 1:
        path = next(path.glob("*.gguf"))
    return path, path.suffix == ".gguf" and path.is_file()
