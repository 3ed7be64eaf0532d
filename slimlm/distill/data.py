"""Distillation data, addressed by global sample index (what the trainer's resume relies on).

Three kinds (`samples` in the distill stage):
- "corpus": non-overlapping windows of a tokenized text (`slimlm.data.text.load_text`: the offline default corpus,
  a file, wikitext2:DIR, hf:NAME), reshuffled every epoch with a seeded permutation.
- "teacher": text the teacher writes itself, no data needed (LLM-QAT, Liu et al. 2023): the first token is drawn
  uniformly from the vocabulary, the next `greedy_tokens` are the teacher's top-1, the rest are sampled.
- "student": on-policy samples (GKD, Agarwal et al. 2024): the student continues prompts cut from the corpus
  and is trained on its own continuations, scored by the teacher.

Every generated batch is seeded by (seed, first sample index), so the same index gives the same text after a
resume. Generation is batched with a static KV cache (`generate(..., cache_implementation="static")`), which
transformers compiles on CUDA; on CPU it runs eagerly.

A batch is {"input_ids": (b, T), "loss_mask": (b, T) bool}: loss_mask[t] says whether the distribution at position
t (the prediction of token t + 1) is trained on — the generated tokens up to the first end-of-sequence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimlm.data.calibration import ids_sha256, tokenize_text
from slimlm.data.text import Text
from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class SamplingSettings:
    """How generated samples are drawn (recorded with the run)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    greedy_tokens: int = 3  # LLM-QAT: the first tokens after the random start are the model's top-1


class TokenWindows:
    """Non-overlapping `seqlen`-token windows of one token stream; sample i is window perm_e[i mod n] of epoch e = i // n."""

    def __init__(self, ids: torch.Tensor, seqlen: int, seed: int, label: str):
        n_windows = ids.numel() // seqlen
        if n_windows < 1:
            raise SlimlmError(
                f"{label} has {ids.numel()} tokens, fewer than one window of {seqlen}",
                "use a shorter seqlen or a longer text",
            )
        self.windows = ids[: n_windows * seqlen].view(n_windows, seqlen)  # (n, T)
        self.seed, self.label = seed, label

    @classmethod
    def from_text(cls, tokenizer, text: Text, seqlen: int, seed: int = 0) -> TokenWindows:
        return cls(tokenize_text(tokenizer, text.text), seqlen, seed, text.label)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def rows(self, samples: range) -> torch.Tensor:
        """(len(samples), T) ids."""
        n = len(self.windows)
        return torch.stack([self.windows[self._permutation(i // n)[i % n]] for i in samples])

    def batch(self, samples: range) -> dict[str, torch.Tensor]:
        ids = self.rows(samples)
        return {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}

    def describe(self) -> dict:
        n, seqlen = self.windows.shape
        return {
            "kind": "corpus",
            "source": self.label,
            "windows": n,
            "seqlen": seqlen,
            "seed": self.seed,
            "sha256": ids_sha256(self.windows)[:16],
        }


def loss_mask_after(ids: torch.Tensor, prompt_length: int, eos_token_id: int | None) -> torch.Tensor:
    """(B, T) bool: position t counts when token t + 1 was generated (t + 1 ≥ prompt_length) and is at or before the
    row's first end-of-sequence token (what follows it is padding)."""
    batch, length = ids.shape
    target = torch.arange(length).expand(batch, length) + 1  # index of the token position t predicts
    mask = (target >= prompt_length) & (target < length)
    if eos_token_id is not None:
        generated_eos = (ids == eos_token_id) & (torch.arange(length) >= prompt_length)
        first = torch.where(generated_eos.any(1), generated_eos.float().argmax(1), torch.full((batch,), length))  # (B,)
        mask &= target <= first[:, None]
    return mask


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: torch.Tensor,
    new_tokens: int,
    sampling: SamplingSettings,
    seed: int,
    greedy_tokens: int = 0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, P) prompts -> (B, P + new_tokens) ids: `greedy_tokens` top-1 tokens, then sampled ones, static KV cache.

    Prompts of different lengths come left-padded with their (B, P) `attention_mask` (0 on the padding; default:
    all ones). Seeded: the same model, prompts and seed give the same ids. Rows that end early are padded (pad or
    eos id) to the full length; `loss_mask_after` masks what follows a row's end."""
    device = next(model.parameters()).device
    config = model.generation_config
    pad = (
        config.pad_token_id
        if config.pad_token_id is not None
        else (config.eos_token_id if isinstance(config.eos_token_id, int) else 0)
    )
    was_training = model.training
    model.eval()
    ids = prompts.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    common = {"pad_token_id": pad, "cache_implementation": "static", "use_cache": True}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            greedy = min(greedy_tokens, new_tokens)
            if greedy:
                ids = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=greedy, **common)
                mask = torch.nn.functional.pad(mask, (0, ids.shape[1] - mask.shape[1]), value=1)
            if new_tokens > greedy:
                ids = model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k or 0,
                    top_p=sampling.top_p or 1.0,
                    max_new_tokens=new_tokens - greedy,
                    **common,
                )
    finally:
        model.train(was_training)
    missing = prompts.shape[1] + new_tokens - ids.shape[1]  # generate stops early when every row has ended
    return torch.nn.functional.pad(ids.cpu(), (0, missing), value=pad)


class GeneratedSamples:
    """Samples written by `model`: data-free from a random first token ("teacher", LLM-QAT) or continuations of
    corpus prompts ("student", on-policy GKD). The loss covers the generated tokens only."""

    def __init__(
        self,
        model: nn.Module,
        seqlen: int,
        sampling: SamplingSettings,
        seed: int,
        kind: str,
        prompts: TokenWindows | None = None,
        prompt_tokens: int = 0,
    ):
        if kind == "student" and (prompts is None or prompt_tokens < 1):
            raise SlimlmError("on-policy samples need corpus prompts", "pass the prompt windows and prompt_tokens >= 1")
        if prompt_tokens >= seqlen:
            raise SlimlmError(
                f"prompt_tokens {prompt_tokens} leaves nothing to generate in a window of {seqlen}",
                "use fewer prompt tokens or a longer seqlen",
            )
        self.model, self.seqlen, self.sampling, self.seed, self.kind = model, seqlen, sampling, seed, kind
        self.prompts, self.prompt_tokens = prompts, prompt_tokens
        self.vocab_size = model.get_output_embeddings().weight.shape[0]

    def batch(self, samples: range) -> dict[str, torch.Tensor]:
        seed = self.seed * 1_000_003 + samples.start
        if self.kind == "teacher":
            first = torch.randint(self.vocab_size, (len(samples), 1), generator=torch.Generator().manual_seed(seed))
            ids = generate(self.model, first, self.seqlen - 1, self.sampling, seed, self.sampling.greedy_tokens)
            prompt_length = 1
        else:
            prompt = self.prompts.rows(samples)[:, : self.prompt_tokens]
            ids = generate(self.model, prompt, self.seqlen - self.prompt_tokens, self.sampling, seed)
            prompt_length = self.prompt_tokens
        eos = self.model.generation_config.eos_token_id
        return {
            "input_ids": ids,
            "loss_mask": loss_mask_after(ids, prompt_length, eos if isinstance(eos, int) else None),
        }

    def describe(self) -> dict:
        described = {"kind": self.kind, "seqlen": self.seqlen, "seed": self.seed, "sampling": asdict(self.sampling)}
        if self.kind == "student":
            described.update(prompts=self.prompts.describe(), prompt_tokens=self.prompt_tokens)
        return described


class Retokenized:
    """Cross-tokenizer distillation (ULD): every batch of `source` also as the teacher reads it — each row decoded to
    text and encoded with the teacher's tokenizer, cut or padded to the student's length ("teacher_input_ids",
    "teacher_mask")."""

    def __init__(self, source, student_tokenizer, teacher_tokenizer):
        self.source, self.student_tokenizer, self.teacher_tokenizer = source, student_tokenizer, teacher_tokenizer

    def batch(self, samples: range) -> dict[str, torch.Tensor]:
        batch = self.source.batch(samples)
        length = batch["input_ids"].shape[1]
        pad = self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer.pad_token_id is not None else 0
        rows, masks = [], []
        for row in batch["input_ids"]:
            ids = tokenize_text(self.teacher_tokenizer, self.student_tokenizer.decode(row))[:length]
            masks.append(torch.arange(length) < ids.numel())
            rows.append(torch.cat([ids, torch.full((length - ids.numel(),), pad, dtype=torch.int64)]))
        return {**batch, "teacher_input_ids": torch.stack(rows), "teacher_mask": torch.stack(masks)}

    def describe(self) -> dict:
        return {
            **self.source.describe(),
            "teacher_tokenizer": type(self.teacher_tokenizer).__name__,
            "teacher_vocab": len(self.teacher_tokenizer),
        }
