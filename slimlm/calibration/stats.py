"""Statistics of a linear layer's inputs, accumulated over calibration tokens — computed once, shared by all methods.

- `hessian`: H = 2/N · Σ x xᵀ (in, in), the layer-wise reconstruction Hessian of GPTQ / SparseGPT,
  kept as a running mean so it does not grow with N.
- `input_norm`: ‖X_j‖₂ per input channel j (in,), Wanda's activation term; also mean |x| for AWQ.
- `input_absmax`: max |X_j| per input channel j (in,), SmoothQuant's activation range.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError

STATISTICS = ("hessian", "input_norm", "input_absmax")


class InputStats:
    """Running statistics of the rows x (in,) a linear layer sees; `update` takes (..., in)."""

    def __init__(self, in_features: int, wanted: tuple[str, ...], device: torch.device, name: str = "a linear layer"):
        unknown = set(wanted) - set(STATISTICS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STATISTICS}")
        self.wanted = wanted
        self.name = name  # the layer whose inputs these are, for error messages
        self.tokens = 0
        self.hessian = torch.zeros(in_features, in_features, device=device) if "hessian" in wanted else None
        self.sq_sum = torch.zeros(in_features, device=device) if "input_norm" in wanted else None
        self.abs_sum = torch.zeros(in_features, device=device) if "input_norm" in wanted else None
        self.input_absmax = torch.zeros(in_features, device=device) if "input_absmax" in wanted else None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # (N, in)
        n = rows.shape[0]
        total = self.tokens + n
        # Each statistic is a per-channel reduction that a NaN or Inf in its channel turns non-finite, so checking
        # the reductions finds bad activations without a pass over the rows (isfinite on a 32k × 1536 batch cost
        # as much as a quarter of its Hessian).
        per_channel = []  # this batch's reductions, checked before any is added to the running statistics
        if self.hessian is not None:
            batch_gram = gram(rows)
            per_channel.append(batch_gram.diagonal())  # Σ x_j²
        if self.sq_sum is not None:
            batch_sq_sum, batch_abs_sum = rows.pow(2).sum(dim=0), rows.abs().sum(dim=0)
            per_channel += [batch_sq_sum, batch_abs_sum]
        if self.input_absmax is not None:
            batch_absmax = rows.abs().amax(dim=0)
            per_channel.append(batch_absmax)
        if not all(torch.isfinite(value).all() for value in per_channel):
            raise SlimlmError(
                f"non-finite activations (NaN/Inf) reach {self.name} during calibration",
                "the model already overflows on this data: load it in float32, check the base model's perplexity, or drop the stage that broke it",
            )
        if self.hessian is not None:
            # running mean of 2·x xᵀ: rescale the old mean, add the new batch's share
            self.hessian.mul_(self.tokens / total).add_(batch_gram, alpha=2.0 / total)
        if self.sq_sum is not None:
            self.sq_sum.add_(batch_sq_sum)
            self.abs_sum.add_(batch_abs_sum)
        if self.input_absmax is not None:
            torch.maximum(self.input_absmax, batch_absmax, out=self.input_absmax)
        self.tokens = total

    @property
    def input_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, per input channel."""
        return self.sq_sum.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


def gram(rows: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """XᵀX for X (N, in), computing only the blocks on and above the diagonal (XᵀX is symmetric): 10 of 16 block
    products, about 30% less time than the full product for wide layers (the down_proj Hessian dominates)."""
    width = rows.shape[1]
    step = -(-width // blocks)
    out = torch.empty(width, width, dtype=rows.dtype, device=rows.device)
    for start in range(0, width, step):
        product = rows[:, start : start + step].t() @ rows[:, start:]  # (step, width - start)
        out[start : start + step, start:] = product
        out[start:, start : start + step] = product.t()
    return out
