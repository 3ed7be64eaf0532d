"""The factored inverse Hessian that the OBS-style methods (GPTQ, SparseGPT) update weights with, and the float32
working copies of W and H they start from.

Both walk the input columns of W (out, in) in order and, after fixing column j, move the columns still free by
the row j of the inverse of the Hessian restricted to them. With H⁻¹ = UᵀU (U upper triangular), that row is
U[j, j:] / U_jj up to scale, so one Cholesky factorization serves every step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from slimlm.calibration.stats import InputStats
from slimlm.errors import SlimlmError
from slimlm.models.adapters import linear_weight


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
    raise SlimlmError(
        f"{method}: the dampened Hessian is not positive definite (numerically){tried}",
        "raise 'dampening' (e.g. 0.1) or calibrate on more tokens",
    )


def stacked_by_input(
    linears: dict[str, nn.Module], stats: dict[str, InputStats]
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """(names, weights stacked row-wise, Hessian) per input tensor: linears that read one input (q/k/v, gate/up
    share one statistics object) go together. The OBS-style methods treat rows independently given H, so one
    call on the stack equals one call per linear, with one factorization and one column loop."""
    by_input: dict[int, list[str]] = {}
    for name in linears:
        by_input.setdefault(id(stats[name]), []).append(name)
    for names in by_input.values():
        yield names, torch.cat([linear_weight(linears[name]).detach() for name in names]), stats[names[0]].hessian


@contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one thread for a loop of small ops (the column-by-column updates): with more, every op pays a
    thread fork/join, and while another process holds a core each op waits for a descheduled thread (measured
    on 2 busy cores: a GPTQ block in 0.8 s on one thread, 43 s on two). It also makes GPTQ's codes independent of
    the machine's thread count (its matrix products round differently on 1 and 2 threads), which the search's
    database relies on: its forked encoders and a recipe's replay write the same bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
