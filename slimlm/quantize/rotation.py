"""Offline rotation of the residual stream (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

An orthogonal Q (hidden × hidden, QᵀQ = I) leaves an RMSNorm pre-norm transformer's function unchanged when every
residual vector x becomes x·Q, because ‖x·Q‖ = ‖x‖ and norms without a gain commute with Q:

1. fuse each RMSNorm gain g into the linears that read the norm (W ← W·diag(g), gain ← 1; Gemma's (1 + w): w ← 0),
   the final norm into lm_head;
2. embedding rows E ← E·Q; readers of the residual (q/k/v, gate/up, lm_head) W ← W·Q;
   writers to it (o_proj, down_proj) W ← Qᵀ·W and b ← Qᵀ·b (weights are (out, in); activations are rows);
3. optionally each value head too: v_proj rows of head h ← Hᵀ·W_h, o_proj columns of head h ← W_h·H
   (H head_dim × head_dim; the attention-weighted sum is linear in v, so it commutes).

Nothing runs at inference: the rotated model is a plain dense checkpoint. What it buys: Q spreads the few outlier
channels of the residual over all channels, so weights that read it have flatter rows and quantize with a smaller
error at the same bits. Q is a random Hadamard matrix, diag(±1)·H/√n, where a Hadamard matrix of order n can be
built (Sylvester 2^k, times a Paley matrix: orders q+1 for a prime q ≡ 3 mod 4, 2(q+1) for a prime q ≡ 1 mod 4,
e.g. SmolLM2's 576 = 8 · 72 with 72 = 71 + 1), otherwise a random orthogonal matrix (QR of a Gaussian).

Tied embeddings: the embedding needs E·Q, lm_head needs E·diag(g)·Q; unless the final gain g is uniform (a scalar
commutes with Q and can stay in the norm), lm_head gets its own weight (vocab × hidden more bytes).

Refused: LayerNorm models (GPT-2, OPT: the mean subtraction does not commute with Q), and norms on a branch output
before the residual add (Gemma 2/3): a gain between a writer and the residual cannot be fused into anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.models.adapters import (
    ArchAdapter,
    adapter_for,
    decoder_blocks,
    linear_weight,
    set_linear_weight_,
)
from slimlm.quantize.smoothing import _is_one_plus_gain
from slimlm.stage import Stage, StageConfig

MATRICES = ("hadamard", "orthogonal")
SUPPORTED = "RMSNorm pre-norm models (llama, mistral, qwen2, qwen3, gemma, phi3)"


@dataclass(frozen=True)
class RotateConfig(StageConfig):
    """Rotate the residual stream by an orthogonal matrix (QuaRot): same function, flatter weights to quantize."""

    method: ClassVar[str] = "rotate"
    matrix: str = "hadamard"  # "hadamard": random Hadamard where one of that order can be built, else random orthogonal; "orthogonal": always random orthogonal
    seed: int = 0  # seed of the random ±1 diagonal (and of the random orthogonal matrix)
    value_heads: bool = True  # also rotate each value head (v_proj rows, o_proj columns) by a head_dim matrix
    untie: bool = True  # tied embeddings with a non-uniform final norm gain: give lm_head its own weight; false: refuse such models

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets is not None or self.exclude is not None:
            self.fail(
                "targets",
                "does not apply: the rotation changes every layer that touches the residual stream",
                "remove 'targets' / 'exclude' from the stage",
            )
        if self.matrix not in MATRICES:
            self.fail(
                "matrix",
                f"is '{self.matrix}', not one of {', '.join(MATRICES)}",
                "use 'hadamard' (default) or 'orthogonal'",
            )


@dataclass(frozen=True)
class RotationSummary:
    residual: str  # how Q (hidden × hidden) was built
    value_heads: str | None  # how the per-head matrix was built; None when value heads were not rotated
    untied_bytes: int  # bytes lm_head's own weight added (0 when the embeddings stay tied or were never tied)

    def record(self) -> dict:
        """What the manifest keeps: the matrices used and what untying lm_head cost."""
        return {"residual": self.residual, "value_heads": self.value_heads, "untied_bytes": self.untied_bytes}

    def describe(self) -> str:
        parts = [f"residual: {self.residual}"]
        if self.value_heads:
            parts.append(f"value heads: {self.value_heads}")
        if self.untied_bytes:
            parts.append(f"lm_head untied from the embedding (+{self.untied_bytes / 1e6:.1f} MB)")
        return "rotate: " + "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Hadamard and orthogonal matrices (float64)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order n = 2^k: H_2n = [[H, H], [H, −H]]. (n, n) float64 of ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ij = χ(j − i) for a prime q, χ the Legendre symbol (0 at 0). (q, q) float64."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index.unsqueeze(0) - index.unsqueeze(1)) % q]


def paley_prime(m: int) -> tuple[str, int] | None:
    """Which Paley construction gives a Hadamard matrix of order m from a prime q: ("I", q) for m = q + 1 with
    q ≡ 3 mod 4, ("II", q) for m = 2(q + 1) with q ≡ 1 mod 4; None when neither applies."""
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I", m - 1
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II", m // 2 - 1
    return None


def paley(m: int) -> torch.Tensor:
    """Paley's Hadamard matrix of order m (see `paley_prime`). (m, m) float64 of ±1."""
    found = paley_prime(m)
    if found is None:
        raise ValueError(f"no Paley construction of order {m} from a prime")
    kind, q = found
    jacobsthal = _jacobsthal(q)
    ones = torch.ones(q, 1, dtype=torch.float64)
    if kind == "I":  # H = I + [[0, 1ᵀ], [−1, Q]]; Q is antisymmetric
        s = torch.cat(
            [torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.t()], 1), torch.cat([-ones, jacobsthal], 1)], 0
        )
        return s + torch.eye(q + 1, dtype=torch.float64)
    # II: C = [[0, 1ᵀ], [1, Q]] is a symmetric conference matrix; H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]
    c = torch.cat(
        [torch.cat([torch.zeros(1, 1, dtype=torch.float64), ones.t()], 1), torch.cat([ones, jacobsthal], 1)], 0
    )
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k · m and a Paley matrix of order m: pure Sylvester (m = 1) for a power of two, else the
    largest such m; None when no such split exists (then slimlm uses a random orthogonal matrix instead)."""
    if n >= 1 and n & (n - 1) == 0:
        return n, 1
    power = 1
    while n % power == 0:
        m = n // power
        if m == 1 or paley_prime(m) is not None:
            return power, m
        power *= 2
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (H·Hᵀ = n·I): Sylvester(2^k) ⊗ Paley(m); None if `hadamard_factors` finds none."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    power, m = factors
    return sylvester(power) if m == 1 else torch.kron(sylvester(power), paley(m))


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal (n, n) float64: QR of a Gaussian, columns signed by diag(R)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def rotation_matrix(n: int, matrix: str, generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """An orthogonal (n, n) float64 matrix and how it was built: diag(±1)·H/√n, or a random orthogonal one."""
    h = hadamard(n) if matrix == "hadamard" else None
    if h is None:
        reason = "" if matrix == "orthogonal" else f" (no Hadamard matrix of order {n} from Sylvester ⊗ Paley)"
        return random_orthogonal(n, generator), f"random orthogonal {n}×{n}{reason}"
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    power, m = hadamard_factors(n)
    build = f"Sylvester {power}" if m == 1 else f"Sylvester {power} ⊗ Paley {paley_prime(m)[0]} {m}"
    return signs.unsqueeze(1) * h / n**0.5, f"random Hadamard {n}×{n} ({build})"


# ---------------------------------------------------------------------------------------------------------------
# The model


def _gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel factor an RMSNorm multiplies by, (hidden,) float64."""
    gain = norm.weight.detach().double()
    return gain + 1 if _is_one_plus_gain(norm) else gain


@torch.no_grad()
def _set_unit_gain_(norm: nn.Module) -> None:
    norm.weight.fill_(0.0 if _is_one_plus_gain(norm) else 1.0)


@torch.no_grad()
def _transform_(
    module: nn.Module, left: torch.Tensor | None = None, right: torch.Tensor | None = None, rows: slice = slice(None)
) -> None:
    """W[rows] ← left·W[rows]·right, b[rows] ← left·b[rows], in float64, written back in the module's dtype and layout."""
    weight = linear_weight(module).double().clone()  # (out, in)
    part = weight[rows]
    if left is not None:
        part = left.to(part.device) @ part
    if right is not None:
        part = part @ right.to(part.device)
    weight[rows] = part
    set_linear_weight_(module, weight)
    if left is not None and getattr(module, "bias", None) is not None:
        bias = module.bias.double().clone()
        bias[rows] = left.to(bias.device) @ bias[rows]
        module.bias.copy_(bias.to(module.bias.dtype))


def _ties_embeddings(model: nn.Module, adapter: ArchAdapter) -> bool:
    return model.get_submodule(adapter.lm_head).weight is model.get_submodule(adapter.embed).weight


def _writers(adapter: ArchAdapter) -> tuple[str, ...]:
    return (adapter.head_consumer, adapter.mlp_consumer)


def check_rotate(model: nn.Module, config: RotateConfig) -> None:
    """Refuse, before anything changes, models whose function a rotation of the residual stream would change."""
    adapter = adapter_for(model)
    model_type = model.config.model_type
    readers = {reader for _, group in adapter.input_norms for reader in group}
    for index, block in enumerate(decoder_blocks(model)):
        for path, _ in adapter.input_norms:
            norm = block.get_submodule(path)
            if (
                isinstance(norm, nn.LayerNorm)
                or "RMSNorm" not in type(norm).__name__
                or getattr(norm, "bias", None) is not None
            ):
                raise SlimlmError(
                    f"rotate: {model_type} normalises with {type(norm).__name__}, not RMSNorm; LayerNorm subtracts the mean, which does not commute with a rotation of the residual stream",
                    f"rotation supports {SUPPORTED}",
                )
        fused = {path for path, _ in adapter.input_norms}
        branch_norms = [
            name for name, child in block.named_children() if "Norm" in type(child).__name__ and name not in fused
        ]
        if branch_norms:
            raise SlimlmError(
                f"rotate: {model_type} normalises branch outputs ({', '.join(branch_norms)}) before the residual add; a gain between a writer and the residual cannot be fused, so the rotation would change the model",
                f"rotation supports {SUPPORTED}; Gemma 2/3 are not",
            )
        linears = set(adapter.linears())
        if not adapter.head_consumer or linears != readers | set(_writers(adapter)):
            raise SlimlmError(
                f"rotate: cannot tell which projections of {model_type} read and which write the residual stream",
                f"rotation supports {SUPPORTED}",
            )
        for rel in adapter.linears():
            module = block.get_submodule(rel)
            if not isinstance(module, nn.Linear):
                raise SlimlmError(
                    f"rotate: {adapter.blocks}.{index}.{rel} is a {type(module).__name__}, not a dense nn.Linear",
                    "rotate before any quantization stage",
                )
    final_norm = model.get_submodule(adapter.final_norm)
    if "RMSNorm" not in type(final_norm).__name__:
        raise SlimlmError(
            f"rotate: the final norm of {model_type} is a {type(final_norm).__name__}, not RMSNorm",
            f"rotation supports {SUPPORTED}",
        )
    if not isinstance(model.get_submodule(adapter.lm_head), nn.Linear):
        raise SlimlmError(f"rotate: {adapter.lm_head} is not a dense nn.Linear", "rotate before any quantization stage")
    gain = _gain(final_norm)
    if _ties_embeddings(model, adapter) and not torch.all(gain == gain[0]) and not config.untie:
        raise SlimlmError(
            "rotate: the model ties lm_head to the embedding and its final norm gain is not uniform, so both cannot share one rotated matrix",
            "set 'untie: true' (lm_head gets its own weight: vocab × hidden more bytes)",
        )
    if config.value_heads:
        _value_rows(model, adapter, decoder_blocks(model)[0])  # refuses a layout it cannot read


def _value_rows(model: nn.Module, adapter: ArchAdapter, block: nn.Module) -> tuple[str, slice, int]:
    """The projection holding the value heads, which of its rows they are, and head_dim."""
    attention = block.get_submodule(adapter.head_consumer.rpartition(".")[0])
    head_dim = attention.head_dim
    sizes = {
        "q": model.config.num_attention_heads * head_dim,
        "k": model.config.num_key_value_heads * head_dim,
        "v": model.config.num_key_value_heads * head_dim,
    }
    for path, layout in adapter.head_producers:
        if "v" in layout:
            start = sum(sizes[letter] for letter in layout[: layout.index("v")])
            return path, slice(start, start + sizes["v"]), head_dim
    raise SlimlmError(
        f"rotate: the adapter of {model.config.model_type} names no value projection", "set value_heads: false"
    )


@torch.no_grad()
def rotate_(model: nn.Module, config: RotateConfig) -> RotationSummary:
    """Fuse every RMSNorm gain into its readers, then rotate the residual stream (and value heads) in place."""
    check_rotate(model, config)
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(config.seed)
    hidden = model.get_submodule(adapter.embed).weight.shape[1]
    q, residual = rotation_matrix(hidden, config.matrix, generator)

    # 1. norm gains into their readers
    blocks = decoder_blocks(model)
    for block in blocks:
        for path, readers in adapter.input_norms:
            norm = block.get_submodule(path)
            gain = _gain(norm)
            for reader in readers:
                _transform_(block.get_submodule(reader), right=torch.diag(gain))
            _set_unit_gain_(norm)
    embed, lm_head, final_norm = (
        model.get_submodule(path) for path in (adapter.embed, adapter.lm_head, adapter.final_norm)
    )
    gain = _gain(final_norm)
    tied = _ties_embeddings(model, adapter)
    untied_bytes = 0
    # A uniform final gain is a scalar: it commutes with Q and stays in the norm, so a tied lm_head stays tied.
    if not (tied and torch.all(gain == gain[0])):
        if tied:
            lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
            model.config.tie_word_embeddings = False
            untied_bytes = lm_head.weight.numel() * lm_head.weight.element_size()
        _transform_(lm_head, right=torch.diag(gain) @ q)
        _set_unit_gain_(final_norm)

    # 2. the residual stream
    embed.weight.copy_((embed.weight.double() @ q.to(embed.weight.device)).to(embed.weight.dtype))
    for block in blocks:
        for _, readers in adapter.input_norms:
            for reader in readers:
                _transform_(block.get_submodule(reader), right=q)
        for writer in _writers(adapter):
            _transform_(block.get_submodule(writer), left=q.t())

    # 3. each value head
    heads = None
    if config.value_heads:
        path, rows, head_dim = _value_rows(model, adapter, blocks[0])
        h, heads = rotation_matrix(head_dim, config.matrix, generator)
        for block in blocks:
            producer = block.get_submodule(path)
            n_heads = (rows.stop - rows.start) // head_dim
            _transform_(producer, left=torch.block_diag(*[h.t()] * n_heads), rows=rows)
            consumer = block.get_submodule(adapter.head_consumer)
            _transform_(consumer, right=torch.block_diag(*[h] * (linear_weight(consumer).shape[1] // head_dim)))
    return RotationSummary(residual, heads, untied_bytes)


ROTATE = Stage(config=RotateConfig, apply=rotate_, scope="model", check=check_rotate, changes_architecture=True)
