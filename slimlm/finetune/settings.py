"""What one fine-tuning run does, declared once and torch-free (the CLI builds its options' defaults from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimlm.errors import SlimlmError

METHODS = ("lora", "dora", "prompt-tuning", "adaption-prompt", "full")
# Peak learning rate per method when none is given: adapters start at zero (LoRA's B, the adaption gates) or at
# random prompts and want a larger step than full fine-tuning (PEFT's examples: LoRA 1e-3 to 2e-4, prompt tuning 3e-2).
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "prompt-tuning": 3e-2, "adaption-prompt": 3e-2, "full": 5e-5}
ACCOUNTANTS = ("prv", "rdp")
AUGMENT_TOP_P = 0.9  # nucleus sampling of teacher-written rows: varied, without the tail's nonsense


@dataclass(frozen=True)
class FinetuneSettings:
    """One fine-tuning run: the method and its size, the training schedule, privacy, the memorization check and
    teacher-written training rows."""

    method: str = "lora"  # lora, dora, prompt-tuning, adaption-prompt (LLaMA-Adapter) or full
    rank: int = 8  # lora/dora: rank r of B·A
    alpha: float | None = None  # lora/dora: scale numerator (default 2 × rank)
    targets: str | None = None  # lora/dora: regex over block linear names (default: every attention and MLP linear)
    virtual_tokens: int = 16  # prompt-tuning: learned soft-prompt tokens
    adapter_len: int = 10  # adaption-prompt: learned prompt tokens per adapted layer
    adapter_layers: int | None = None  # adaption-prompt: adapt the top N layers (default: all)
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per step (with DP: the expected Poisson batch)
    lr: float | None = None  # peak learning rate (default: DEFAULT_LR of the method)
    warmup: int = 5  # linear warm-up steps
    seqlen: int = 256  # tokens per training sequence (text windows; longer chat examples are cut)
    heldout: float = 0.1  # share of the data held out for evaluation, when no separate evaluation data is given
    eval_windows: int | None = None  # evaluate on the first N held-out rows only (default: all)
    eval_every: int = 0  # steps between held-out evaluations during training (0: before and after only)
    seed: int = 0
    dp_epsilon: float | None = None  # DP-SGD to this ε (the noise multiplier is solved for the run); null: no DP
    dp_delta: float = 1e-5  # DP δ
    noise_multiplier: float | None = None  # DP-SGD with this σ instead of an ε target (ε is then reported)
    max_grad_norm: float = 1.0  # DP: per-sample gradient clipping bound C
    accountant: str = "prv"  # DP accountant: prv (Gopi et al. 2021, tighter) or rdp (Mironov 2017)
    canaries: int = 0  # insert N random secrets into the training data and report their exposure (0: none)
    canary_repeats: int = 8  # copies of each secret in the training data
    canary_candidates: int = 1023  # random secrets each true one is ranked among (exposure at most log2(this + 1))
    augment: int = 0  # teacher-written rows per training example (slimlm.finetune.augment; 0: none)
    augment_teacher: str | None = (
        None  # the model that writes them (alias, directory, .gguf, hub id; default: the model fine-tuned)
    )
    augment_tokens: int = 128  # most tokens the teacher writes per row
    augment_temperature: float = 0.7  # the teacher's sampling temperature (top-p AUGMENT_TOP_P)

    @property
    def private(self) -> bool:
        return self.dp_epsilon is not None or self.noise_multiplier is not None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SlimlmError(f"unknown fine-tuning method '{self.method}'", f"use one of {', '.join(METHODS)}")
        if self.accountant not in ACCOUNTANTS:
            raise SlimlmError(f"unknown privacy accountant '{self.accountant}'", f"use one of {', '.join(ACCOUNTANTS)}")
        for name in ("rank", "virtual_tokens", "adapter_len", "steps", "batch_size", "seqlen"):
            _positive(name, getattr(self, name))
        for name in ("warmup", "eval_every", "canaries", "augment"):
            if getattr(self, name) < 0:
                raise SlimlmError(
                    f"finetune: {name} is {getattr(self, name)}, must be 0 or more", f"pass {name} 0 or more"
                )
        _positive("canary_repeats", self.canary_repeats)
        _positive("canary_candidates", self.canary_candidates)
        _positive("augment_tokens", self.augment_tokens)
        if self.adapter_layers is not None:
            _positive("adapter_layers", self.adapter_layers)
        if self.eval_windows is not None:
            _positive("eval_windows", self.eval_windows)
        if not 0 < self.heldout < 1:
            raise SlimlmError(f"finetune: heldout is {self.heldout}, outside (0, 1)", "pass e.g. 0.1")
        for name in ("lr", "alpha", "dp_epsilon", "noise_multiplier", "augment_temperature"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise SlimlmError(f"finetune: {name} is {value}, must be a positive number", f"pass a positive {name}")
        if not 0 < self.dp_delta < 1:
            raise SlimlmError(
                f"finetune: dp_delta is {self.dp_delta}, outside (0, 1)",
                "pass e.g. 1e-5 (below 1 / the number of examples)",
            )
        if not self.max_grad_norm > 0:
            raise SlimlmError(f"finetune: max_grad_norm is {self.max_grad_norm}, must be above 0", "pass e.g. 1.0")
        if self.dp_epsilon is not None and self.noise_multiplier is not None:
            raise SlimlmError(
                "both an ε target and a noise multiplier are given", "pass --dp-epsilon or --noise-multiplier, not both"
            )
        if self.augment and self.private:
            raise SlimlmError(
                "teacher-written rows are derived from the private examples, so DP-SGD's per-example guarantee would not cover them",
                "drop --augment, or train without DP",
            )
        if self.augment_teacher is not None and not self.augment:
            raise SlimlmError(
                f"an augmentation teacher ({self.augment_teacher}) is given, but augment is 0",
                "pass --augment N (rows per example), or drop --augment-teacher",
            )


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or value < 1:
        raise SlimlmError(f"finetune: {name} is {value}, must be at least 1", f"pass {name} 1 or more")
