"""QAT: quantization-aware training of integer weights, distilled from the full-precision model.

LLM-QAT (Liu et al. 2023, arXiv:2305.17888): quantize the weights in the forward pass ("fake quantization"), let
gradients pass straight through the rounding (the straight-through estimator, STE), and train the quantized model
to match the full-precision model's next-token distributions (forward KL), optionally on text that model writes
itself (`samples: teacher`, data-free). LSQ (Esser et al. 2020, arXiv:1902.08153), as EfficientQAT (Chen et al.
2024, arXiv:2407.11062) uses it for LLMs: the per-group step sizes (scales) learn too.

Per group of `group_size` input channels of a row, with step s, integer zero point z (fixed) and grid [qmin, qmax]:

    q = clamp(round(w / s) + z, qmin, qmax)          ŵ = (q − z) · s          (grid.py's quantize_with → dequantize)

    ∂ŵ/∂w = 1 where round(w / s) + z lies in [qmin, qmax], else 0         (STE; clipped weights get no gradient)
    ∂ŵ/∂s = (q − z) − w / s inside the range, (q − z) outside             (LSQ)

s is rounded to float16 in the forward pass (what is saved) and passes its gradient straight through that rounding,
so what is trained is exactly what is stored. The zero point stays the integer chosen at initialisation: it is
stored as an integer, and a learnable step already moves both ends of an asymmetric range.

Parametrisation. Adam moves every parameter by about `lr` per step whatever its gradient's size, while step sizes
differ by orders of magnitude between layers. So the trained quantities are measured in each group's initial step s₀:
w = w₀ + s₀·δ (δ starts at 0) and s = s₀·r (r starts at 1): `lr` = 1e-3 moves a weight by about a thousandth of its
quantization step per optimizer step, and a scale by about 0.1 %, in every layer alike.

Initialisation. A float linear starts from min/max qparams (round to nearest); an already quantized linear (after
`rtn`, `gptq`, `awq`) starts from its dequantized weight with its own scale and zero point, so QAT refines that
result instead of starting over. A float linear that holds exact zeros (pruned) keeps them. At the end every
training-time `FakeQuantLinear` becomes a `QuantizedLinear` again (codes = quantize_with(w, s, z)): storage,
export and evaluation are those of any quantized model. Embeddings, norms and the LM head are not trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from slimlm.distill.losses import LOGIT_LOSSES
from slimlm.distill.stage import (
    Base,
    DistillConfig,
    TrainingStageConfig,
    check_teacher,
    distillation_loss_fn,
    distillation_source,
    teacher_fingerprint,
)
from slimlm.errors import SlimlmError
from slimlm.models.adapters import (
    block_linears,
    decoder_blocks,
    is_linear,
    linear_weight,
)
from slimlm.models.swap import replace_module_
from slimlm.quantize.grid import (
    MIN_SCALE,
    SCALE_DTYPE,
    QuantGrid,
    choose_qparams,
    quantize_with,
)
from slimlm.quantize.linear import QuantizedLinear
from slimlm.quantize.rtn import GridConfig
from slimlm.quantize.w8a8 import Int8Linear
from slimlm.stage import Stage
from slimlm.train.distributed import world
from slimlm.train.trainer import TrainResult, train


@dataclass(frozen=True)
class QATConfig(GridConfig, TrainingStageConfig):
    """Quantization-aware training: fake-quantized weights (STE) with learned step sizes, distilled from the base.
    The grid fields come from GridConfig, the training fields from TrainingStageConfig (shared with distill)."""

    method: ClassVar[str] = "qat"
    group_size: int | None = 64  # input channels per scale; null for one scale per output channel
    symmetric: bool = False  # false: an integer zero point per group as well (fixed during training)
    batch_size: int = 4  # sequences per micro-step
    lr: float = 5e-3  # peak learning rate, in units of each group's initial step (see the module docstring)
    learn_weights: bool = True  # train the float weights behind the codes (LLM-QAT)
    learn_scales: bool = True  # train the per-group step sizes (LSQ / EfficientQAT); both false is refused
    loss: str = "forward_kl"  # forward_kl, reverse_kl, jsd (β = 0.5) or tv, between base and quantized model
    samples: str = "corpus"  # corpus windows, or teacher: text the base model generates (data-free, LLM-QAT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.learn_weights or self.learn_scales):
            self.fail(
                "learn_weights",
                "and 'learn_scales' are both false, so nothing would train",
                "set either (or both) to true",
            )
        if self.loss not in LOGIT_LOSSES:
            self.fail(
                "loss",
                f"is '{self.loss}'",
                f"use one of {', '.join(LOGIT_LOSSES)} (the base and the quantized model share a vocabulary)",
            )
        if self.samples not in ("corpus", "teacher"):
            self.fail(
                "samples",
                f"is '{self.samples}'",
                "use corpus (windows of 'data') or teacher (text the base model generates)",
            )

    def distillation(self) -> DistillConfig:
        """The training half of this stage as the distill stage's config (its data, loss and trainer settings),
        for the distillation machinery it reuses; every field was checked when this config was built."""
        shared = {f.name for f in fields(TrainingStageConfig)} - {"targets", "exclude"}
        return DistillConfig(loss=self.loss, samples=self.samples, **{name: getattr(self, name) for name in shared})


# --- the kernel ----------------------------------------------------------------------------------------------------


def stored_scale(scale: torch.Tensor) -> torch.Tensor:
    """The float16 step that is saved for `scale` (at least MIN_SCALE), as float32."""
    return scale.float().clamp(min=MIN_SCALE).to(SCALE_DTYPE).float()


class _FakeQuantize(torch.autograd.Function):
    """ŵ = (clamp(round(w / s) + z, qmin, qmax) − z) · s per group, with the STE / LSQ gradients above."""

    @staticmethod
    def forward(
        ctx, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: QuantGrid
    ) -> torch.Tensor:
        ctx.save_for_backward(weight, scale, zero_point)
        ctx.grid = grid
        _, q, _, step = _fake_quantize_parts(weight, scale, zero_point, grid)
        return (q * step).reshape(weight.shape).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale, zero_point = ctx.saved_tensors
        x, q, inside, _ = _fake_quantize_parts(weight, scale, zero_point, ctx.grid)
        grad = grad_output.float().reshape(x.shape)  # (out, G, size)
        grad_weight = (grad * inside).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[0] else None
        grad_scale = (grad * torch.where(inside, q - x, q)).sum(2).to(scale.dtype) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scale, None, None


def _fake_quantize_parts(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: QuantGrid):
    """x = w / s, q − z, whether round(x) + z is inside the grid, and s (float16-rounded); all (out, G, size | 1).

    The same float32 operations, in the same order, as grid.quantize_with then grid.dequantize."""
    out_features, in_features = weight.shape
    groups = scale.shape[1]
    step = stored_scale(scale).unsqueeze(2)  # (out, G, 1)
    x = weight.float().reshape(out_features, groups, in_features // groups) / step
    codes = torch.round(x)
    if zero_point is not None:
        codes = codes + zero_point.float().unsqueeze(2)
    inside = (codes >= grid.qmin) & (codes <= grid.qmax)
    q = codes.clamp(grid.qmin, grid.qmax)
    if zero_point is not None:
        q = q - zero_point.float().unsqueeze(2)
    return x, q, inside, step


def fake_quantize(
    weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, grid: QuantGrid
) -> torch.Tensor:
    """weight (out, in), scale (out, groups) float, zero_point (out, groups) int8 | None -> ŵ (out, in), weight's dtype.

    Equals `dequantize(quantize_with(weight, scale16, zero_point, grid), scale16, zero_point)` with scale16 the
    float16-rounded scale; gradients reach `weight` straight through round() (zero where clamped) and `scale` as LSQ's."""
    return _FakeQuantize.apply(weight, scale, zero_point, grid)


# --- the training-time layer ---------------------------------------------------------------------------------------


class FakeQuantLinear(nn.Module):
    """y = x · ŵᵀ + b, ŵ = fake_quantize(w₀ + s₀·δ, s₀·r, z): what a QuantizedLinear computes, but trainable.

    δ (out, in) and r (out, groups) are the parameters (see the module docstring); `mask` (out, in) keeps pruned zeros."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        grid: QuantGrid,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        learn_weights: bool = True,
        learn_scales: bool = True,
        mask: torch.Tensor | None = None,
    ):
        super().__init__()
        self.grid = grid
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("initial_weight", weight.detach().float().clone())  # w₀ (out, in)
        self.register_buffer("initial_scale", scale.detach().float().clone())  # s₀ (out, groups)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("mask", mask)
        self.weight_offset = nn.Parameter(torch.zeros_like(self.initial_weight), requires_grad=learn_weights)  # δ
        self.scale_ratio = nn.Parameter(torch.ones_like(self.initial_scale), requires_grad=learn_scales)  # r
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=learn_weights)

    @classmethod
    def from_linear(
        cls, module: nn.Module, grid: QuantGrid, learn_weights: bool = True, learn_scales: bool = True
    ) -> FakeQuantLinear:
        """Start from a float linear (nn.Linear or GPT-2's Conv1D) with min/max qparams; exact zeros stay zero."""
        weight = linear_weight(module).detach()
        scale, zero_point = choose_qparams(weight, grid)
        mask = weight != 0 if bool((weight == 0).any()) else None
        bias = None if module.bias is None else module.bias.detach()
        return cls(weight, scale, zero_point, grid, bias, weight.dtype, learn_weights, learn_scales, mask)

    @classmethod
    def from_quantized(
        cls, module: QuantizedLinear, learn_weights: bool = True, learn_scales: bool = True
    ) -> FakeQuantLinear:
        """Start from a quantized linear: its dequantized weight, its own scale, zero point and grid."""
        return cls(
            module.dequantized_weight().float(),
            module.weight_scale,
            module.weight_zero_point,
            module.grid,
            module.bias,
            module.compute_dtype,
            learn_weights,
            learn_scales,
        )

    def float_weight(self) -> torch.Tensor:
        """w = w₀ + s₀·δ (out, in), float32."""
        groups = self.initial_scale.shape[1]
        offset = self.weight_offset.reshape(self.out_features, groups, -1) * self.initial_scale.unsqueeze(2)
        weight = self.initial_weight + offset.reshape(self.out_features, self.in_features)
        return weight if self.mask is None else weight * self.mask

    def scale(self) -> torch.Tensor:
        """s = s₀·r (out, groups), float32 (rounded to float16 where it is used)."""
        return self.initial_scale * self.scale_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize(self.float_weight(), self.scale(), self.zero_point, self.grid)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def to_quantized(self) -> QuantizedLinear:
        """The QuantizedLinear whose dequantized weight equals this layer's fake-quantized weight."""
        scale = stored_scale(self.scale()).to(SCALE_DTYPE)
        codes = quantize_with(self.float_weight(), scale, self.zero_point, self.grid)
        bias = None if self.bias is None else self.bias.detach().to(self.compute_dtype)
        return QuantizedLinear(codes, scale, self.zero_point, self.grid, bias, self.compute_dtype)

    def extra_repr(self) -> str:
        group = "channel" if self.grid.group_size is None else f"group={self.grid.group_size}"
        return f"in={self.in_features}, out={self.out_features}, fake int{self.grid.bits} {'sym' if self.grid.symmetric else 'asym'} {group}"


# --- checks and the stage ----------------------------------------------------------------------------------------


def _describe(grid: QuantGrid) -> str:
    return f"int{grid.bits} {'sym' if grid.symmetric else 'asym'} {'per channel' if grid.group_size is None else f'g{grid.group_size}'}"


def qat_linears(model: nn.Module, config: QATConfig) -> dict[str, nn.Module]:
    """The decoder-block linears this stage trains (float or weight-only quantized), by fully-qualified name."""
    chosen: dict[str, nn.Module] = {}
    for index in range(len(decoder_blocks(model))):
        for name, module in block_linears(model, index).items():
            if not config.selects(name):
                continue
            if isinstance(module, Int8Linear):
                raise SlimlmError(
                    f"qat: {name} is a W8A8 layer (int8 activations too); qat trains weight-only grids",
                    "exclude it with 'exclude', or run qat instead of w8a8",
                )
            if isinstance(module, QuantizedLinear):
                if module.grid != config.grid:
                    raise SlimlmError(
                        f"qat: {name} is already quantized to {_describe(module.grid)}, but this stage asks for {_describe(config.grid)}",
                        "set bits / group_size / symmetric to the earlier stage's values (qat refines its codes), or drop the earlier quantization",
                    )
            elif not is_linear(module):
                raise SlimlmError(
                    f"qat: {name} is a {type(module).__name__}, not a linear layer",
                    "narrow the stage with 'targets' / 'exclude'",
                )
            elif config.group_size is not None and linear_weight(module).shape[1] % config.group_size:
                in_features = linear_weight(module).shape[1]
                divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
                raise SlimlmError(
                    f"qat: group_size {config.group_size} does not divide the input size {in_features} of {name}",
                    f"use a group_size that divides it (e.g. {', '.join(map(str, divisors)) or 'null for per-channel'})",
                )
            chosen[name] = module
    if not chosen:
        raise SlimlmError(
            f"qat: no linear layer is selected (targets={config.targets!r}, exclude={config.exclude!r})",
            "fix the regexes; names look like 'model.layers.0.mlp.up_proj'",
        )
    return chosen


def check_qat(model: nn.Module, config: QATConfig) -> None:
    """Refuse before anything changes: no layer selected, a group size that does not divide, a conflicting grid."""
    qat_linears(model, config)


def qat_(model: nn.Module, base: Base, config: QATConfig, device: torch.device | None = None) -> TrainResult:
    """Quantize `model`'s selected linears (in place) by training them against `base.model`; returns the training record.

    Every selected linear becomes a FakeQuantLinear for the training and a QuantizedLinear afterwards (also when
    training stops on an error: the layers then hold the last good state). Only δ, r and the biases train."""
    if world().size > 1:
        raise SlimlmError("qat: training under torchrun is not supported yet", "run the qat stage in a single process")
    linears = qat_linears(model, config)
    training = config.distillation()
    device = device or next(model.parameters()).device
    teacher = base.model.to(device).eval().requires_grad_(False)
    model.to(device).requires_grad_(False)
    check_teacher(model, teacher, training)
    for name, module in linears.items():
        if isinstance(module, QuantizedLinear):
            fake = FakeQuantLinear.from_quantized(module, config.learn_weights, config.learn_scales)
        else:
            fake = FakeQuantLinear.from_linear(module, config.grid, config.learn_weights, config.learn_scales)
        replace_module_(model, name, fake.to(device))
    try:
        source = distillation_source(training, model, teacher, base.tokenizer)
        stage = {k: v for k, v in asdict(config).items() if k not in ("checkpoint_dir", "checkpoint_every")}
        run = {"stage": stage, "teacher": teacher_fingerprint(teacher)}
        return train(
            model,
            distillation_loss_fn(training, teacher, None, []),
            source,
            training.train_config(),
            run=run,
            description="qat",
        )
    finally:
        for name in linears:
            replace_module_(model, name, model.get_submodule(name).to_quantized())
        model.eval()


QAT = Stage(config=QATConfig, apply=qat_, scope="model", needs=("base",), check=check_qat, quantizes=True)
