"""Differentially private fine-tuning: DP-SGD (Abadi et al. 2016) through Opacus.

Every step draws a Poisson batch (each training row joins with probability q = batch_size / N,
`slimlm.finetune.data.PoissonRows`), computes each row's gradient (Opacus' per-layer hooks on the trainable
adapter layers), clips it to norm C, sums, adds N(0, σ²C²) noise and divides by the expected batch size:

    g = (Σᵢ gᵢ · min(1, C / ‖gᵢ‖) + N(0, σ² C² I)) / (q · N)

The privacy loss of T such steps is accounted by Opacus' PRV accountant (Gopi et al. 2021) or its RDP accountant
(Mironov 2017); with an ε target the noise multiplier σ is solved for the run before it starts, and the ε the
accountant gives for (σ, q, T) is what the manifest records.

What trains must be layers Opacus computes per-sample gradients for: LoRA's A and B are nn.Linear and prompt
tuning's soft prompt is an nn.Embedding, so `lora` and `prompt-tuning` work on any family; the norms (HF's
LlamaRMSNorm is not nn.RMSNorm) and the tied token embedding stay frozen, which is why they cause no trouble.
DoRA's magnitudes, the adaption prompts' gates and full fine-tuning's norms are refused by name. The training
losses in the log are not privatized (diagnostics for the data owner); the adapters are.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimlm.errors import SlimlmError

# Names of the accountants in the report.
ACCOUNTANT_NAMES = {
    "prv": "Opacus PRVAccountant (privacy random variables, Gopi et al. 2021)",
    "rdp": "Opacus RDPAccountant (Rényi DP, Mironov 2017)",
}


def require_opacus() -> None:
    if importlib.util.find_spec("opacus") is None:
        raise SlimlmError(
            "differentially private fine-tuning needs the optional package 'opacus'",
            "pip install 'slimlm[privacy]' (or pip install opacus)",
        )


@dataclass(frozen=True)
class PrivacyPlan:
    """DP-SGD's parameters for one run, and the budget they spend."""

    noise_multiplier: float  # σ
    max_grad_norm: float  # C
    sample_rate: float  # q
    steps: int  # T
    delta: float
    accountant: str  # "prv" or "rdp"
    target_epsilon: float | None  # the ε asked for (None: σ was given)

    def epsilon(self) -> float:
        """ε spent by T steps of the subsampled Gaussian mechanism (σ, q), as the accountant computes it."""
        return epsilon_spent(self.noise_multiplier, self.sample_rate, self.steps, self.delta, self.accountant)

    def record(self, rows: int) -> dict:
        return {
            **asdict(self),
            "epsilon": self.epsilon(),
            "expected_batch_size": self.sample_rate * rows,
            "accountant_name": ACCOUNTANT_NAMES[self.accountant],
            "sampling": "Poisson (each row independently with probability sample_rate every step)",
        }


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    counter = create_accountant(mechanism=accountant)
    counter.history = [(noise_multiplier, sample_rate, steps)]
    return float(counter.get_epsilon(delta=delta))


def plan_privacy(
    rows: int,
    batch_size: int,
    steps: int,
    delta: float,
    max_grad_norm: float,
    accountant: str,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
) -> PrivacyPlan:
    """σ for the ε target (or the given σ), refusing a target the run cannot reach and saying what it can."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    if batch_size > rows:
        raise SlimlmError(
            f"DP batch size {batch_size} exceeds the {rows} training rows (sampling rate above 1)",
            f"use --batch-size {rows} or less, or more data",
        )
    if delta >= 1 / rows:
        raise SlimlmError(
            f"δ = {delta:g} is not below 1 / the {rows} training rows: it would allow publishing a row outright",
            f"pass --dp-delta {0.1 / rows:.0e} or smaller",
        )
    rate = batch_size / rows
    if noise_multiplier is None:
        try:
            noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
        except (ValueError, RuntimeError):
            reachable = epsilon_spent(10.0, rate, steps, delta, accountant)
            raise SlimlmError(
                f"ε = {target_epsilon:g} (δ = {delta:g}) cannot be reached by {steps} steps at sampling rate {rate:.4f} ({batch_size} of {rows} rows): "
                f"even noise multiplier 10 spends ε = {reachable:.3g}",
                "raise --dp-epsilon, or use fewer --steps, a smaller --batch-size or more data",
            ) from None
    return PrivacyPlan(noise_multiplier, max_grad_norm, rate, steps, delta, accountant, target_epsilon)


def unsupported_layers(model: nn.Module) -> list[str]:
    """'name (Type)' of each module that owns trainable parameters Opacus has no per-sample gradient rule for."""
    from opacus import GradSampleModule

    found = []
    for name, module in model.named_modules():
        if (
            any(p.requires_grad for p in module.parameters(recurse=False))
            and type(module) not in GradSampleModule.GRAD_SAMPLERS
        ):
            found.append(f"{name} ({type(module).__name__})")
    return found


def make_private(model: nn.Module, plan: PrivacyPlan, rows: int, seed: int) -> tuple[nn.Module, object]:
    """(the model wrapped for per-sample gradients, a function turning the trainer's optimizer into DP-SGD's)."""
    require_opacus()
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    refused = unsupported_layers(model)
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise SlimlmError(
            f"DP fine-tuning: Opacus computes no per-sample gradients for the trainable {shown}",
            "use --method lora or prompt-tuning (norms and the tied embedding stay frozen)",
        )
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    generator = torch.Generator().manual_seed(seed)
    expected = plan.sample_rate * rows

    def wrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return DPOptimizer(
            optimizer,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            expected_batch_size=expected,
            loss_reduction="mean",
            generator=generator,
        )

    return wrapped, wrap_optimizer
