"""The `distill` recipe stage: train the compressed model to match the model the recipe started from.

    loss = T² · D(teacher ‖ student)  [+ hidden · hidden-state loss]  [+ ce · next-token cross-entropy]

D is one of forward KL, reverse KL (MiniLLM), generalised JSD(β) (GKD), total variation, or ULD; the student is
trained fully or through LoRA adapters (merged back at the end, so the result is a plain model). This is the
recovery step of Minitron (prune, then distill from the unpruned model) and of "kd-recover" recipes.

Sparse models keep their zeros: a gradient mask on every pruned linear makes AdamW / Adafactor leave them at zero
(LoRA is refused on them: merging B·A would fill the zeros). Quantized layers are frozen; a later `qat` stage
is how quantized weights learn.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.data.text import load_text
from slimlm.distill.data import GeneratedSamples, Retokenized, SamplingSettings, TokenWindows
from slimlm.distill.lora import add_lora, lora_targets, merge_lora, require_peft
from slimlm.distill.losses import (
    HIDDEN_LOSSES,
    LOGIT_LOSSES,
    HiddenProjection,
    hidden_state_loss,
    layer_mapping,
    logit_distillation_loss,
    masked_mean,
)
from slimlm.distill.uld import uld_loss
from slimlm.errors import SlimlmError
from slimlm.models.adapters import (
    block_linears,
    decoder_blocks,
    is_linear,
)
from slimlm.stage import Base, Stage, StageConfig, check_range
from slimlm.train.distributed import full_state, shard_, world
from slimlm.train.trainer import OPTIMIZERS, SCHEDULES, TrainConfig, TrainResult, train

SAMPLES = ("corpus", "teacher", "student")


@dataclass(frozen=True)
class TrainingStageConfig(StageConfig):
    """The training fields every stage that trains against a teacher shares (distill, qat), declared and checked
    once; `train_config()` hands them to the trainer."""

    temperature: float = 1.0  # softmax(logits / T) for both models; the loss is scaled by T²
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # sequences per micro-step (over all processes)
    grad_accum: int = 1  # micro-steps per optimizer step
    seqlen: int = 512  # tokens per sequence
    lr: float = 1e-4  # peak learning rate (LoRA usually wants ~1e-3)
    warmup: int = 10  # warm-up steps
    schedule: str = "cosine"  # cosine, linear or constant
    optimizer: str = "adamw"  # adamw or adafactor
    data: str = "default"  # text source (training split): default, a .txt/.jsonl file, wikitext2:DIR, hf:NAME
    seed: int = 0
    checkpoint_dir: str | None = None  # resume from / checkpoint to this folder; null: no checkpoints
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end and on interruption only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            self.fail("schedule", f"is '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            self.fail("optimizer", f"is '{self.optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")
        check_range(self, "temperature", self.temperature, 1e-3, 100.0)
        for key in ("steps", "batch_size", "grad_accum"):
            check_range(self, key, getattr(self, key), 1, 2**31)
        check_range(self, "seqlen", self.seqlen, 2, 2**20)
        check_range(self, "lr", self.lr, 1e-12, 1.0)
        check_range(self, "warmup", self.warmup, 0, 2**31)

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            lr=self.lr,
            warmup_steps=min(self.warmup, self.steps - 1),
            schedule=self.schedule,
            optimizer=self.optimizer,
            seed=self.seed,
            checkpoint_dir=self.checkpoint_dir,
            checkpoint_every=self.checkpoint_every,
        )


@dataclass(frozen=True)
class DistillConfig(TrainingStageConfig):
    """Distil the current model from the recipe's base model (knowledge distillation / recovery training)."""

    method: ClassVar[str] = "distill"
    loss: str = (
        "forward_kl"  # forward_kl, reverse_kl (MiniLLM), jsd (GKD, with beta), tv, or uld (sorted probabilities)
    )
    beta: float = 0.5  # jsd only: 0 = forward KL, 1 = reverse KL
    ce: float = 0.0  # weight of the next-token cross-entropy on the data, added to the distillation loss
    hidden: float = 0.0  # weight of a hidden-state loss between mapped blocks (0: logits only)
    hidden_loss: str = "mse"  # mse or cosine
    layers: str = "uniform"  # block mapping for the hidden loss: uniform, last, or pairs "student:teacher,…"
    lora: int | None = None  # LoRA rank (peft), merged at the end; null: full fine-tuning
    lora_alpha: float | None = None  # LoRA scale numerator (default 2 × rank)
    samples: str = "corpus"  # corpus windows, teacher-generated (data-free, LLM-QAT) or student (on-policy, GKD)
    prompt_tokens: int = 16  # samples=student: corpus tokens the student continues
    sample_temperature: float = 1.0  # generated samples: sampling temperature
    teacher: str | None = None  # another model to distil from (alias, directory, .gguf, hub id); null: the recipe's
    # base. With another tokenizer (loss: uld), each batch is re-encoded with the teacher's tokenizer

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher is not None and self.samples == "teacher":
            self.fail(
                "samples", "is 'teacher' with another teacher model", "use samples: corpus or student with 'teacher'"
            )
        if self.loss not in (*LOGIT_LOSSES, "uld"):
            self.fail("loss", f"is '{self.loss}'", f"use one of {', '.join((*LOGIT_LOSSES, 'uld'))}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            self.fail("hidden_loss", f"is '{self.hidden_loss}'", f"use one of {', '.join(HIDDEN_LOSSES)}")
        if self.samples not in SAMPLES:
            self.fail("samples", f"is '{self.samples}'", f"use one of {', '.join(SAMPLES)}")
        check_range(self, "beta", self.beta, 0.0, 1.0)
        check_range(self, "ce", self.ce, 0.0, 1e6)
        check_range(self, "hidden", self.hidden, 0.0, 1e6)
        check_range(self, "sample_temperature", self.sample_temperature, 1e-3, 100.0)
        check_range(self, "prompt_tokens", self.prompt_tokens, 1, 2**31)
        if self.lora is not None:
            check_range(self, "lora", self.lora, 1, 4096)
        elif self.targets is not None:
            self.fail(
                "targets",
                "selects LoRA-adapted layers, but 'lora' is null (full fine-tuning trains everything)",
                "set a LoRA rank, or remove 'targets'",
            )
        if self.lora_alpha is not None and self.lora is None:
            self.fail("lora_alpha", "is set but 'lora' is null", "set a LoRA rank, or remove 'lora_alpha'")
        if self.samples == "student" and self.prompt_tokens >= self.seqlen:
            self.fail(
                "prompt_tokens",
                f"({self.prompt_tokens}) leaves nothing to generate in seqlen {self.seqlen}",
                "use fewer prompt tokens or a longer seqlen",
            )


# --- checks ----------------------------------------------------------------------------------------------------


def vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_distill(model: nn.Module, config: DistillConfig) -> None:
    """What can be refused before anything changes: peft present for LoRA, a hidden mapping that exists."""
    if config.lora is not None:
        require_peft()
        lora_targets(model, config.selects)
    if config.hidden > 0:
        layer_mapping(len(decoder_blocks(model)), len(decoder_blocks(model)), config.layers)


def check_teacher(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> None:
    """Teacher and student must share a vocabulary unless the loss is ULD."""
    if config.loss != "uld" and vocab_size(student) != vocab_size(teacher):
        raise SlimlmError(
            f"distill: the teacher's vocabulary has {vocab_size(teacher)} entries, the student's {vocab_size(student)}, so '{config.loss}' cannot compare their distributions",
            "use loss: uld (Universal Logit Distillation compares sorted probabilities across vocabularies)",
        )


# --- the stage ---------------------------------------------------------------------------------------------------


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-zero masks of the decoder-block linears that hold exact zeros (pruned), by fully-qualified name."""
    masks = {}
    for index in range(len(decoder_blocks(model))):
        for name, module in block_linears(model, index).items():
            if is_linear(module) and bool((module.weight == 0).any()):
                masks[name] = module.weight != 0
    return masks


def keep_zeros(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Gradient hooks that zero the gradient of pruned weights: Adam's moments stay 0, so the weights stay 0."""
    return [
        model.get_submodule(name).weight.register_hook(lambda grad, mask=mask: grad * mask)
        for name, mask in masks.items()
    ]


def freeze_quantized(model: nn.Module) -> None:
    """Quantized linears hold integer codes (buffers); their float biases stay as they are too."""
    from slimlm.quantize.linear import QuantizedLinear

    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.bias is not None:
            module.bias.requires_grad_(False)


def teacher_fingerprint(teacher: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in list(teacher.state_dict().items())[:4]:
        digest.update(name.encode())
        digest.update(f"{tuple(tensor.shape)}:{float(tensor.float().sum()):.6e}".encode())
    return digest.hexdigest()[:16]


def distillation_source(
    config: DistillConfig, student: nn.Module, teacher: nn.Module, tokenizer, teacher_tokenizer=None
):
    """The batches the stage trains on (see `slimlm.distill.data`); each also in the teacher's tokens when
    `teacher_tokenizer` is another tokenizer than the student's `tokenizer`."""
    sampling = SamplingSettings(temperature=config.sample_temperature)
    if config.samples == "teacher":
        return GeneratedSamples(teacher, config.seqlen, sampling, config.seed, "teacher")
    source = TokenWindows.from_text(tokenizer, load_text(config.data, split="calibration"), config.seqlen, config.seed)
    if config.samples == "student":
        source = GeneratedSamples(
            student, config.seqlen, sampling, config.seed, "student", source, config.prompt_tokens
        )
    if teacher_tokenizer is not None and not same_tokenizer(tokenizer, teacher_tokenizer):
        source = Retokenized(source, tokenizer, teacher_tokenizer)
    return source


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary, token for token)."""
    return a is b or a.get_vocab() == b.get_vocab()


def load_teacher(config: DistillConfig, base: Base, device: torch.device) -> Base:
    """The model to distil from: `config.teacher` when given (loaded here), else the recipe's base."""
    if config.teacher is None:
        return base
    from slimlm.models.load import load_model

    loaded = load_model(config.teacher, device=str(device))
    return Base(loaded.model.eval().requires_grad_(False), loaded.tokenizer)


def distillation_loss_fn(
    config: DistillConfig, teacher: nn.Module, projection: HiddenProjection | None, pairs: list[tuple[int, int]]
):
    """loss_fn(student, batch) for the trainer."""
    hidden = config.hidden > 0

    def loss_fn(student: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["loss_mask"]
        with torch.no_grad():
            teacher_out = teacher(batch.get("teacher_input_ids", ids), output_hidden_states=hidden, use_cache=False)
        student_out = student(ids, output_hidden_states=hidden, use_cache=False)
        if config.loss == "uld":
            loss = uld_loss(student_out.logits, teacher_out.logits, config.temperature, mask)
        else:
            loss = logit_distillation_loss(
                student_out.logits, teacher_out.logits, config.loss, config.temperature, config.beta, mask
            )
        if hidden:
            loss = loss + config.hidden * hidden_state_loss(
                student_out.hidden_states, teacher_out.hidden_states, pairs, projection, config.hidden_loss, mask
            )
        if config.ce > 0:
            nll = F.cross_entropy(
                student_out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
            ).view(ids.shape[0], -1)
            loss = loss + config.ce * masked_mean(nll, mask[:, :-1])
        return loss

    return loss_fn


class _Student(nn.Module):
    """The trained parameters: the model (or its LoRA wrapper) and, when widths differ, the hidden projections."""

    def __init__(self, model: nn.Module, projection: HiddenProjection | None):
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def distill_(model: nn.Module, base: Base, config: DistillConfig, device: torch.device | None = None) -> TrainResult:
    """Distil `model` (in place) from `base.model` on `config`'s data; returns the training record.

    Under `torchrun` the student is trained as an FSDP2-sharded copy whose gathered weights are loaded back."""
    device = device or next(model.parameters()).device
    teacher_base = load_teacher(config, base, device)
    teacher = teacher_base.model.to(device).eval().requires_grad_(False)
    model.to(device)
    check_teacher(model, teacher, config)
    masks = sparse_masks(model)
    if masks and config.lora is not None:
        raise SlimlmError(
            f"distill: the model is sparse ({len(masks)} pruned linears) and LoRA's merged update B·A would fill the pruned zeros",
            "set lora: null (full fine-tuning keeps the zeros), or distill before pruning",
        )
    if masks and world().size > 1:
        raise SlimlmError(
            "distill: keeping a sparse model's zeros is not supported under torchrun yet",
            "distill the sparse model in a single process",
        )
    pairs: list[tuple[int, int]] = []
    projection = None
    if config.hidden > 0:
        pairs = layer_mapping(len(decoder_blocks(model)), len(decoder_blocks(teacher)), config.layers)
        projection = HiddenProjection(model.config.hidden_size, teacher.config.hidden_size, len(pairs)).to(device)
    model.requires_grad_(True)  # full fine-tuning trains every float parameter (LoRA freezes them again)
    freeze_quantized(model)
    trained = (
        model
        if config.lora is None
        else add_lora(model, config.lora, config.lora_alpha or 2.0 * config.lora, lora_targets(model, config.selects))
    )
    student = _Student(trained, projection)
    place = world()
    if place.size > 1:
        student = copy.deepcopy(
            student
        )  # the copy's blocks are sharded; `model` keeps plain tensors for the gathered weights
        shard_(student, list(decoder_blocks(student.model if config.lora is None else student.model.base_model.model)))
    hooks = keep_zeros(model, masks) if place.size == 1 else []
    try:
        source = distillation_source(config, student.model, teacher, base.tokenizer, teacher_base.tokenizer)
        stage = {k: v for k, v in asdict(config).items() if k not in ("checkpoint_dir", "checkpoint_every")}
        run = {"stage": stage, "teacher": teacher_fingerprint(teacher)}
        result = train(
            student,
            distillation_loss_fn(config, teacher, projection, pairs),
            source,
            config.train_config(),
            run=run,
            description="distill",
        )
    finally:
        for hook in hooks:
            hook.remove()
    if place.size > 1:
        state, _ = full_state(student)
        _Student(trained, projection).load_state_dict(state)
    if config.lora is not None:
        merge_lora(trained)
    model.eval()
    return result


DISTILL = Stage(config=DistillConfig, apply=distill_, scope="model", needs=("base",), check=check_distill)
