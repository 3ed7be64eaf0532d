"""The factored inverse Hessian that the OBS-style methods (GPTQ, SparseGPT) update weights with, and the float32
working copies of W and H they start from.

Both walk the input columns of W (out, in) in order and, after fixing column j, move the columns still free by
the row j of the inverse of the Hessian restricted to them. With H⁻¹ = UᵀU (U upper triangular), that row is
U[j, j:] / U_jj up to scale, so one Cholesky factorization serves every step.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError


def working_copies(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of W (out, in) and H (in, in) with the inputs that never fire (H_jj = 0) taken out, as the
    GPTQ / SparseGPT reference code does: H_jj := 1 and W[:, j] := 0, so column j stays 0 and moves no other.
    The caller's tensors are not modified (one Hessian may be shared by q/k/v)."""
    W = weight.detach().float().clone()  # (out, in)
    H = hessian.detach().float().clone()  # (in, in)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def dampened_inverse_cholesky(hessian: torch.Tensor, dampening: float, method: str, retries: int = 0) -> torch.Tensor:
    """U (in, in) upper triangular with UᵀU = (H + δ·mean(diag H)·I)⁻¹, for a symmetric H (in, in).

    δ starts at `dampening` and grows 10× per retry while the dampened H is not (numerically) positive definite;
    after `retries` failed retries a SlimlmError names `method`. H is not modified.
    """
    mean_diagonal = hessian.diagonal().mean()
    for attempt in range(retries + 1):
        dampened = hessian.clone()
        dampened.diagonal().add_(dampening * 10**attempt * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(dampened)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
        if info == 0:
            return upper
    tried = f" (also with dampening raised to {dampening * 10**retries:g})" if retries else ""
    raise SlimlmError(f"{method}: the dampened Hessian is not positive definite (numerically){tried}", "raise 'dampening' (e.g. 0.1) or calibrate on more tokens")
