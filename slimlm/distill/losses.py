"""Knowledge-distillation losses: pure functions of student and teacher tensors.

Token-level divergences take log-probabilities (…, V) and return one value per position (…,); p is the teacher's
distribution, q the student's:

- forward KL  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)          (Hinton et al. 2015: mode-covering)
- reverse KL  KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)          (MiniLLM, Gu et al. 2024: mode-seeking)
- generalised JSD(β)   = β KL(p ‖ m) + (1 − β) KL(q ‖ m),  m = β p + (1 − β) q   (GKD, Agarwal et al. 2024)
  It vanishes at both ends (m → q or m → p), and JSD(β)/β → KL(p ‖ q) as β → 0, JSD(β)/(1 − β) → KL(q ‖ p) as
  β → 1; GKD (and TRL's GKDTrainer) therefore define β = 0 as forward KL and β = 1 as reverse KL, as here.
- total variation TV(p, q) = ½ Σ_v |p_v − q_v|

`logit_distillation_loss` softens both logit sets by a temperature T (softmax(z / T)) and multiplies the mean over
positions by T², which keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).

Hidden-state losses (MSE, cosine) compare block outputs of a student layer with a teacher layer chosen by a
layer mapping; `HiddenProjection` learns a linear map from the student's width to the teacher's where they differ
(as TinyBERT / Minitron do).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tv")
HIDDEN_LOSSES = ("mse", "cosine")


# --- token-level divergences on log-probabilities (…, V) -> (…,) ------------------------------------------------


def forward_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position: Σ_v p_v (log p_v − log q_v)."""
    return F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True).sum(-1)


def reverse_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) per position: Σ_v q_v (log q_v − log p_v) (MiniLLM)."""
    return F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True).sum(-1)


def generalized_jsd(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """GKD's JSD(β) per position: β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q; β = 0 / 1 give forward / reverse KL."""
    if not 0.0 <= beta <= 1.0:
        raise SlimlmError(
            f"jsd: beta is {beta}, outside [0, 1]",
            "set beta within [0, 1] (0 = forward KL, 1 = reverse KL, 0.5 = symmetric JSD)",
        )
    if beta == 0.0:
        return forward_kl(student_log_probs, teacher_log_probs)
    if beta == 1.0:
        return reverse_kl(student_log_probs, teacher_log_probs)
    mixture = torch.logsumexp(
        torch.stack([teacher_log_probs + math.log(beta), student_log_probs + math.log(1 - beta)]), dim=0
    )
    kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True).sum(-1)  # KL(p ‖ m)
    kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True).sum(-1)  # KL(q ‖ m)
    return beta * kl_teacher + (1 - beta) * kl_student


def total_variation(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """TV(p, q) per position: ½ Σ_v |p_v − q_v|."""
    return 0.5 * (teacher_log_probs.exp() - student_log_probs.exp()).abs().sum(-1)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16/fp32 inputs, float64 kept (so the losses can be gradchecked in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-position `values` (B, T) over positions where `mask` (B, T) is true (all of them without a mask)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def temperature_scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits softened by T: softmax(z / T) is flatter for T > 1 and shows the teacher's 'dark knowledge'."""
    if not temperature > 0:
        raise SlimlmError(
            f"temperature is {temperature}, must be above 0", "use 1.0 (plain distributions) or e.g. 2.0 (softer)"
        )
    return logits / temperature


def logit_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · mean over (masked) positions of the divergence between softened teacher and student distributions.

    student_logits, teacher_logits: (B, T, V) of one vocabulary; mask: (B, T) bool, the positions that count.
    Computed in float32 (float64 inputs stay float64): a bf16 log-softmax over 49k tokens loses the tail.
    """
    if loss not in LOGIT_LOSSES:
        raise SlimlmError(
            f"unknown distillation loss '{loss}'", f"use one of {', '.join(LOGIT_LOSSES)} (or 'uld' across tokenizers)"
        )
    if student_logits.shape != teacher_logits.shape:
        raise SlimlmError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape",
            "teacher and student must share the vocabulary and the sequence; across tokenizers use loss 'uld'",
        )
    student = torch.log_softmax(temperature_scale(at_least_float32(student_logits), temperature), dim=-1)
    teacher = torch.log_softmax(temperature_scale(at_least_float32(teacher_logits), temperature), dim=-1)
    if loss == "forward_kl":
        per_position = forward_kl(student, teacher)
    elif loss == "reverse_kl":
        per_position = reverse_kl(student, teacher)
    elif loss == "jsd":
        per_position = generalized_jsd(student, teacher, beta)
    else:
        per_position = total_variation(student, teacher)
    return temperature**2 * masked_mean(per_position, mask)


# --- hidden states -----------------------------------------------------------------------------------------------


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over positions of the mean squared difference over the hidden size. (B, T, H) each -> scalar."""
    return masked_mean((at_least_float32(student_hidden) - at_least_float32(teacher_hidden)).pow(2).mean(-1), mask)


def hidden_cosine(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over positions of 1 − cos(student, teacher). (B, T, H) each -> scalar."""
    return masked_mean(
        1.0 - F.cosine_similarity(at_least_float32(student_hidden), at_least_float32(teacher_hidden), dim=-1), mask
    )


def layer_mapping(student_layers: int, teacher_layers: int, mapping: str = "uniform") -> list[tuple[int, int]]:
    """Pairs (student block, teacher block) whose outputs are compared.

    "uniform": student block i ↔ teacher block ⌈(i + 1)·L_t / L_s⌉ − 1, so the last blocks always pair (TinyBERT's
    uniform strategy); "last": only the last blocks; "i:j,k:l": explicit pairs (negative indices count from the end).
    """
    if mapping == "uniform":
        return [(i, math.ceil((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]
    if mapping == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    pairs = []
    for item in mapping.split(","):
        try:
            student, teacher = (int(part) for part in item.split(":"))
        except ValueError:
            raise SlimlmError(
                f"layer mapping '{mapping}' is not 'uniform', 'last' or pairs like '0:0,5:11'",
                "write student:teacher block pairs separated by commas",
            ) from None
        if not (-student_layers <= student < student_layers and -teacher_layers <= teacher < teacher_layers):
            raise SlimlmError(
                f"layer mapping pair {item} is out of range (student has {student_layers} blocks, teacher {teacher_layers})",
                "use block indices that exist",
            )
        pairs.append((student % student_layers, teacher % teacher_layers))
    return pairs


class HiddenProjection(nn.Module):
    """One learned linear map W (H_t, H_s) per mapped pair from the student's hidden size to the teacher's, or the
    identity when they are equal (nothing to learn). Initialised as a truncated identity so training starts from
    comparing the shared coordinates."""

    def __init__(self, student_width: int, teacher_width: int, pairs: int):
        super().__init__()
        self.maps = nn.ModuleList()
        if student_width != teacher_width:
            for _ in range(pairs):
                linear = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():
                    linear.weight.copy_(torch.eye(teacher_width, student_width))
                self.maps.append(linear)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[index](hidden) if len(self.maps) else hidden


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...],
    teacher_hidden: tuple[torch.Tensor, ...],
    pairs: list[tuple[int, int]],
    projection: HiddenProjection,
    loss: str = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over `pairs` of the hidden loss between block outputs.

    student_hidden / teacher_hidden: Hugging Face `output_hidden_states` tuples, (embeddings, block 0 out, …), so
    block i's output is entry i + 1; each (B, T, H).
    """
    if loss not in HIDDEN_LOSSES:
        raise SlimlmError(f"unknown hidden-state loss '{loss}'", f"use one of {', '.join(HIDDEN_LOSSES)}")
    function = hidden_mse if loss == "mse" else hidden_cosine
    total = sum(
        function(projection(k, student_hidden[s + 1]), teacher_hidden[t + 1], mask) for k, (s, t) in enumerate(pairs)
    )
    return total / len(pairs)
