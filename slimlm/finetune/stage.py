"""The `finetune` recipe stage: adapt the model to the recipe's data (LoRA/DoRA merged back, or full), optionally
with DP-SGD, as one step of a compression recipe, e.g. fine-tune privately, then quantize:

    - method: finetune
      data: my-notes.txt
      adapter: lora
      steps: 200
      dp_epsilon: 8
    - method: gptq
      bits: 4

The result is a plain model (adapters folded in), so later stages see ordinary linears; what the stage did (loss
curve, held-out perplexity before/after, the privacy budget spent) goes to the manifest. Prompt tuning and
adaption prompts add inputs rather than weights, so they are offered by `slimlm finetune`, not as a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.finetune.settings import ACCOUNTANTS, DEFAULT_LR, FinetuneSettings
from slimlm.stage import Base, Stage, StageConfig, check_range

ADAPTERS = ("lora", "dora", "full")


@dataclass(frozen=True)
class FinetuneStageConfig(StageConfig):
    """Fine-tune on `data` (causal LM on text, answers only on chat jsonl), optionally with teacher-written rows
    (`augment`); `targets` selects the LoRA linears."""

    method: ClassVar[str] = "finetune"
    data: str = "default"  # .txt, .jsonl (text / chat messages), wikitext2:DIR, hf:NAME, default
    adapter: str = "lora"  # lora, dora (both merged back at the end) or full
    rank: int = 8
    alpha: float | None = None  # default 2 × rank
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None  # default: the adapter's DEFAULT_LR
    seqlen: int = 256
    heldout: float = 0.1  # share of the data held out to measure perplexity before and after
    seed: int = 0
    dp_epsilon: float | None = None  # DP-SGD to this ε (Opacus); null: no DP
    dp_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    augment: int = FinetuneSettings.augment  # teacher-written rows per training example (0: none)
    augment_teacher: str | None = FinetuneSettings.augment_teacher  # null: the model being fine-tuned
    augment_tokens: int = FinetuneSettings.augment_tokens
    augment_temperature: float = FinetuneSettings.augment_temperature

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter not in ADAPTERS:
            self.fail("adapter", f"is '{self.adapter}'", f"use one of {', '.join(ADAPTERS)}")
        if self.accountant not in ACCOUNTANTS:
            self.fail("accountant", f"is '{self.accountant}'", f"use one of {', '.join(ACCOUNTANTS)}")
        for key in ("rank", "steps", "batch_size"):
            check_range(self, key, getattr(self, key), 1, 2**31)
        check_range(self, "seqlen", self.seqlen, 2, 2**20)
        check_range(self, "heldout", self.heldout, 1e-6, 1 - 1e-6)
        if self.dp_epsilon is not None:
            check_range(self, "dp_epsilon", self.dp_epsilon, 1e-6, 1e6)
        check_range(self, "dp_delta", self.dp_delta, 1e-30, 1 - 1e-12)
        check_range(self, "max_grad_norm", self.max_grad_norm, 1e-12, 1e12)
        check_range(self, "augment", self.augment, 0, 2**31)
        check_range(self, "augment_tokens", self.augment_tokens, 1, 2**31)
        check_range(self, "augment_temperature", self.augment_temperature, 1e-6, 1e6)
        if self.augment and self.dp_epsilon is not None:
            self.fail(
                "augment",
                "is set with dp_epsilon: teacher-written rows derive from the private examples, outside DP-SGD's per-example guarantee",
                "set augment: 0, or remove dp_epsilon",
            )

    def settings(self) -> FinetuneSettings:
        return FinetuneSettings(
            method=self.adapter,
            rank=self.rank,
            alpha=self.alpha,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.adapter],
            seqlen=self.seqlen,
            heldout=self.heldout,
            seed=self.seed,
            dp_epsilon=self.dp_epsilon,
            dp_delta=self.dp_delta,
            max_grad_norm=self.max_grad_norm,
            accountant=self.accountant,
            augment=self.augment,
            augment_teacher=self.augment_teacher,
            augment_tokens=self.augment_tokens,
            augment_temperature=self.augment_temperature,
        )


def check_finetune(model: nn.Module, config: FinetuneStageConfig) -> None:
    """Refuse before anything changes: peft (adapters) and opacus (DP) present, the targets exist."""
    from slimlm.distill.lora import require_peft
    from slimlm.finetune.peft_methods import adapter_targets

    if config.adapter != "full":
        require_peft()
        adapter_targets(model, config.targets)
    if config.dp_epsilon is not None:
        from slimlm.finetune.privacy import require_opacus

        require_opacus()


def finetune_(model: nn.Module, base: Base, config: FinetuneStageConfig, device: torch.device | None = None) -> dict:
    """Train `model` in place on the config's data; LoRA/DoRA are folded into the weights at the end."""
    from slimlm.distill.lora import lora_config
    from slimlm.finetune.api import heldout_perplexity
    from slimlm.finetune.data import PoissonRows, ShuffledRows, read_rows, split_heldout
    from slimlm.finetune.peft_methods import adapter_targets, finetune_loss, trainable_parameters
    from slimlm.train.trainer import TrainConfig, train

    settings = config.settings()
    if device is not None:
        model.to(device)
    rows, held = split_heldout(read_rows(config.data, base.tokenizer, config.seqlen), config.heldout, config.seed)
    augmentation = {}
    if config.augment:  # the training split only; the default teacher is the model as this stage receives it
        from slimlm.finetune.augment import augment_training

        rows, augmentation["augment"] = augment_training(rows, model, base.tokenizer, settings, "the recipe's model")
    before = heldout_perplexity(model, held)["perplexity"]
    if config.adapter == "full":
        adapted = model.requires_grad_(True)
    else:
        from peft import get_peft_model

        targets = adapter_targets(model, config.targets)
        targets = [name for name in targets if config.selects(name)]
        adapted = get_peft_model(
            model,
            lora_config(model, config.rank, config.alpha or 2.0 * config.rank, targets, dora=config.adapter == "dora"),
        )
    record: dict = {"trainable_parameters": trainable_parameters(adapted), **augmentation}
    trained, wrap, source = adapted, None, ShuffledRows(rows, config.seed)
    if config.dp_epsilon is not None:
        from slimlm.finetune.privacy import make_private, plan_privacy

        plan = plan_privacy(
            len(rows),
            config.batch_size,
            config.steps,
            config.dp_delta,
            config.max_grad_norm,
            config.accountant,
            config.dp_epsilon,
        )
        trained, wrap = make_private(adapted, plan, len(rows), config.seed)
        source = PoissonRows(rows, config.batch_size, config.seed)
        record["privacy"] = plan.record(len(rows))
    train_config = TrainConfig(
        steps=config.steps,
        batch_size=config.batch_size,
        lr=settings.peak_lr,
        warmup_steps=min(settings.warmup, config.steps - 1),
        clip_norm=None if wrap else 1.0,
        seed=config.seed,
    )
    result = train(
        trained, finetune_loss, source, train_config, description=f"finetune ({config.adapter})", wrap_optimizer=wrap
    )
    if wrap is not None:
        trained.remove_hooks()
    if config.adapter != "full":
        adapted.merge_and_unload()  # folds B·A into the linears of `model` itself and removes the adapters
    model.requires_grad_(False)
    return {
        **record,
        "losses": result.losses,
        "heldout_perplexity_before": before,
        "heldout_perplexity_after": heldout_perplexity(model, held)["perplexity"],
    }


FINETUNE = Stage(config=FinetuneStageConfig, apply=finetune_, scope="model", needs=("base",), check=check_finetune)
