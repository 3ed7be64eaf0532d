"""One forward + backward per calibration window: what the additive proxy and GPTQ need, for every tensor.

For a tensor W replaced by Ŵ = W + ΔW, the mean per-token KL from the base is, to second order,

    KL(ΔW) ≈ ½ E[⟨G, ΔW⟩²] / T

with G the gradient of a window's log-likelihood log p(ŷ) with respect to W, ŷ *sampled from the model itself*
at every position (the Fisher identity; T positions per window). `projection_proxy` is that estimate over the
calibration windows: unbiased, but noisy with few windows. `shaped_proxy` is its smooth counterpart

    ½ Σ_r F_r · ΔW_r H ΔW_rᵀ,      F_r = E_t[g_{t,r}²] (output gradient),   H = E_t[x_t x_tᵀ] (input)

which sees how an error lines up with the inputs (why GPTQ's errors cost less than RTN's) but treats positions as
independent, so it misses how errors add up across the positions that later tokens attend to (measured: ~20×
low on a tiny Llama). The database scales the shaped proxy per tensor by Σ projection / Σ shaped over that
tensor's options: the shape from H and F, the size from the unbiased estimate. H is also GPTQ's Hessian (up to 2)
and its diagonal llama.cpp's imatrix.

llama.cpp also rounds every matmul's input to the weight type's activation type (`export.gguf_activations`): a
noise e on x of variance σ²_c per column costs ½ Σ_r F_r Σ_c W_rc² σ²_c by the same expansion (`rounding_proxy`),
with σ² measured on the calibration inputs (`activation_noise`). That noise is drawn anew at every position, which
is what the shaped form assumes, so it is not rescaled; on SmolLM2 it came within 2× of the true KL of each
projection's rounding alone (the q/k/v inputs 2× high, the others 0.7–1.3×).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.calibration.sequential import hooks_removed_after
from slimlm.models.adapters import adapter_for, decoder_blocks, is_linear, linear_weight
from slimlm.progress import progress_bar


@dataclass
class SearchStatistics:
    hessians: dict[str, torch.Tensor]  # module -> (in, in) E[x xᵀ] float32 (shared inputs share the tensor)
    output_fisher: dict[str, torch.Tensor]  # module -> (out,) E[g²] of its output
    gradients: dict[str, torch.Tensor]  # module (or the embedding) -> (windows, out, in) float16: each window's G
    embedding_fisher: torch.Tensor  # (vocab, hidden): Σ over positions reading token v of g² at the embedding output
    tokens: int  # positions the expectations average over
    windows: int
    # module -> activation type -> (in,) E[(round(x) − x)²] of its input (`collect_statistics(activation_kinds=)`)
    activation_noise: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def importance(self, module: str) -> torch.Tensor:
        """llama.cpp's imatrix statistic: E[x_c²] per input column."""
        return self.hessians[module].diagonal().clone()


def _shared_key(model: nn.Module, module: str) -> str:
    """Linears reading the very same input share one Hessian (q/k/v, gate/up)."""
    adapter = adapter_for(model)
    if not module.startswith(adapter.blocks + "."):
        return module
    index, _, rel = module.removeprefix(adapter.blocks + ".").partition(".")
    for group in adapter.shared_inputs:
        if rel in group:
            return f"{adapter.blocks}.{index}.{group[0]}"
    return module


def tracked_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every decoder-block linear and the output head."""
    adapter = adapter_for(model)
    found = {}
    for index, block in enumerate(decoder_blocks(model)):
        for rel in adapter.linears():
            found[f"{adapter.blocks}.{index}.{rel}"] = block.get_submodule(rel)
    head = model.get_submodule(adapter.lm_head)
    if is_linear(head):
        found[adapter.lm_head] = head
    return found


def collect_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    seed: int = 0,
    progress: bool = True,
    gradients: bool = True,
    activation_kinds: tuple[str, ...] = (),
) -> SearchStatistics:
    """Hessians, output Fishers and per-window gradients of every tracked linear and of the embedding, from
    `input_ids` (N, T); one window per forward + backward, the model itself unchanged. `gradients=False`: the
    Hessians alone (forward only; the same Hessians, what encoding needs), the rest left empty.
    `activation_kinds`: llama.cpp activation types whose rounding noise to measure on each input (where its
    blocks divide the row)."""
    from slimlm.export.gguf_activations import ROUNDING_BLOCK, rounded_activations

    adapter = adapter_for(model)
    linears = tracked_linears(model)
    device = next(model.parameters()).device
    keys = {name: _shared_key(model, name) for name in linears}
    hessians: dict[str, torch.Tensor] = {}
    noise: dict[str, dict[str, torch.Tensor]] = {}
    fisher = {name: torch.zeros(linear_weight(m).shape[0], device=device) for name, m in linears.items()}
    # (windows, out, in) float16 each, filled window by window (stacking lists of them took a seventh of the pass)
    window_gradients: dict[str, torch.Tensor] = {}
    embedding = model.get_submodule(adapter.embed)
    embedding_fisher = torch.zeros_like(embedding.weight, dtype=torch.float32)
    window = [0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    current_ids: list[torch.Tensor] = []
    seen_inputs: set[str] = set()

    def on_linear(name: str):
        def hook(_module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (T, in)
            key = keys[name]
            if key not in seen_inputs:  # the first reader of a shared input counts it
                seen_inputs.add(key)
                hessians[key] = hessians.get(key, 0) + x.t() @ x
                per_kind = noise.setdefault(key, {})
                for kind in (k for k in activation_kinds if x.shape[-1] % ROUNDING_BLOCK[k] == 0):
                    per_kind[kind] = per_kind.get(kind, 0) + (rounded_activations(x, kind) - x).pow_(2).sum(0)
            if output.requires_grad:
                output.register_hook(
                    lambda g: _on_output_gradient(name, g.detach().reshape(-1, g.shape[-1]).float(), x)
                )

        return hook

    def _store(name: str, gradient: torch.Tensor) -> None:
        if name not in window_gradients:
            window_gradients[name] = torch.empty((len(input_ids), *gradient.shape), dtype=torch.float16)
        window_gradients[name][window[0]].copy_(gradient)

    def _on_output_gradient(name: str, g: torch.Tensor, x: torch.Tensor) -> None:
        fisher[name].add_(g.pow(2).sum(0))
        _store(name, g.t() @ x)  # (out, in): this window's gradient of W

    def on_embedding(_module, _args, output):
        output = output.detach().requires_grad_()  # the graph starts here: no weight gets a gradient

        def grad_hook(g):
            g = g.detach().reshape(-1, g.shape[-1]).float()  # (T, hidden)
            ids = current_ids[0].reshape(-1)
            embedding_fisher.index_add_(0, ids, g.pow(2))
            rows = torch.zeros_like(embedding_fisher)
            rows.index_add_(0, ids, g)
            _store(adapter.embed, rows)

        output.register_hook(grad_hook)
        return output

    handles = [m.register_forward_hook(on_linear(n)) for n, m in linears.items()]
    handles.append(embedding.register_forward_hook(on_embedding))
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with (
            hooks_removed_after(handles),
            progress_bar(
                f"search: statistics ({'forward + backward' if gradients else 'forward'})",
                len(input_ids),
                unit="windows",
                show=progress,
            ) as advance,
        ):
            for window[0], row in enumerate(input_ids):
                ids = row[None].to(device)
                current_ids[:] = [ids]
                seen_inputs.clear()
                if not gradients:
                    with torch.no_grad():
                        model(ids, use_cache=False)
                    advance()
                    continue
                with torch.enable_grad():
                    logits = model(ids, use_cache=False).logits[0].float()  # (T, V)
                    log_p = torch.log_softmax(logits, dim=-1)
                    sampled = sample_tokens(log_p.detach(), generator)  # (T, 1)
                    log_p.gather(-1, sampled).sum().backward()
                del logits, log_p
                advance()
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    tokens = input_ids.numel()
    mean_hessians = {key: h / tokens for key, h in hessians.items()}
    return SearchStatistics(
        hessians={name: mean_hessians[keys[name]] for name in linears},
        output_fisher={name: f / tokens for name, f in fisher.items()},
        gradients=window_gradients,
        embedding_fisher=embedding_fisher,
        tokens=tokens,
        windows=len(input_ids),
        activation_noise={
            name: {kind: total / tokens for kind, total in noise[keys[name]].items()}
            for name in linears
            if noise.get(keys[name])
        },
    )


def sample_tokens(log_p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per position from exp(log_p) (T, V), by inverting the cumulative distribution with uniforms from
    `generator` (CPU): the same distribution as torch.multinomial at a twentieth of its time on a 49k vocabulary."""
    cdf = log_p.exp().cumsum(-1)  # (T, V)
    uniform = torch.rand((cdf.shape[0], 1), generator=generator).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform).clamp_(max=cdf.shape[-1] - 1)  # (T, 1)


def embedding_importance(statistics: SearchStatistics, head: str | None) -> torch.Tensor:
    """(vocab, hidden): each embedding weight's share of the shaped proxy, the diagonal of its quadratic form: the
    input role's Fisher of the positions reading that token, plus, when the embedding is also the output head, the
    head's F_r · H_cc. A rare token's row costs little as an input; llama.cpp's imatrix weights columns only."""
    importance = statistics.embedding_fisher / statistics.tokens
    if head is not None:
        importance = (
            importance + statistics.output_fisher[head][:, None] * statistics.hessians[head].diagonal()[None, :]
        )
    return importance


def shaped_proxy(delta: torch.Tensor, hessian: torch.Tensor, output_fisher: torch.Tensor) -> float:
    """½ Σ_r F_r ΔW_r H ΔW_rᵀ for ΔW (out, in)."""
    per_row = ((delta @ hessian) * delta).sum(dim=1)  # (out,)
    return 0.5 * float((output_fisher * per_row).sum())


def rounding_proxy(weight: torch.Tensor, noise: torch.Tensor, output_fisher: torch.Tensor) -> float:
    """½ Σ_r F_r Σ_c W_rc² σ²_c: the KL of a noise of variance σ² (in,) on the input of W (out, in)."""
    return 0.5 * float((output_fisher * (weight.pow(2) @ noise)).sum())


def embedding_shaped_proxy(delta: torch.Tensor, statistics: SearchStatistics) -> float:
    """½ Σ G ⊙ ΔE² / N: the embedding's input role, positions taken as independent like `shaped_proxy`."""
    return 0.5 * float((statistics.embedding_fisher * delta.pow(2)).sum()) / statistics.tokens


def projection_proxy(delta: torch.Tensor, gradients: torch.Tensor, tokens: int) -> float:
    """½ Σ_n ⟨G_n, ΔW⟩² / (N·T): the Fisher estimate of the KL, from the windows' gradients (N, out, in)."""
    dots = (
        gradients.reshape(len(gradients), -1).float() @ delta.reshape(-1).float()
    )  # (N,): one matrix-vector product (40x einsum's speed)
    return 0.5 * float(dots.pow(2).sum()) / tokens
