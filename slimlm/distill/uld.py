"""Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
Distillation Loss for LLMs"): distillation between models whose tokenizers and vocabularies differ.

Token distributions over different vocabularies cannot be compared entry by entry, but their Wasserstein-1
distance under a uniform transport cost can: with both probability vectors sorted in decreasing order and the
shorter one padded with zeros to the longer vocabulary size,

    ULD_t = Σ_i | sort↓(p_t)_i − sort↓(q_t)_i |          p: teacher, q: student, over a common length V = max(V_p, V_q)

Positions are aligned by index: the teacher and the student read the same text through their own tokenizers and
the shorter sequence sets the length (the paper's alignment). The paper trains with CE + λ·ULD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimlm.distill.losses import at_least_float32, masked_mean, temperature_scale


def sorted_probabilities(logits: torch.Tensor, size: int, temperature: float = 1.0) -> torch.Tensor:
    """(…, V) logits -> (…, size) probabilities sorted in decreasing order, zero-padded from V up to `size`."""
    probs = (
        torch.softmax(temperature_scale(at_least_float32(logits), temperature), dim=-1)
        .sort(dim=-1, descending=True)
        .values
    )
    return F.pad(probs, (0, size - probs.shape[-1]))


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over aligned positions of Σ |sorted teacher probs − sorted student probs|.

    student_logits (B, T_s, V_s), teacher_logits (B, T_t, V_t): the first min(T_s, T_t) positions are compared;
    mask (B, ≥ min(T_s, T_t)) picks the positions that count. Returns a scalar in [0, 2].
    """
    length = min(student_logits.shape[1], teacher_logits.shape[1])
    size = max(student_logits.shape[-1], teacher_logits.shape[-1])
    student = sorted_probabilities(student_logits[:, :length], size, temperature)  # (B, T, V)
    teacher = sorted_probabilities(teacher_logits[:, :length], size, temperature)  # (B, T, V)
    per_position = (student - teacher).abs().sum(-1)  # (B, T)
    return masked_mean(per_position, None if mask is None else mask[:, :length])
