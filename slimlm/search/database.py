"""The database of compressed tensor variants: every knob encoded once per option, kept on disk, reused across
budgets (EvoPress's "layer database").

    DIR/database.json           what it was built from (model, calibration, options): a mismatch is refused
    DIR/tensors/<tensor>.safetensors   one uint8 entry per option: the exact bytes the GGUF file will hold,
                                rows in the model's order; its metadata holds each option's bytes and proxy KL

Each knob's file is written atomically when done, so an interrupted build resumes where it stopped. Under
`torchrun` every process builds its share (knob i goes to rank i mod world size) and rank 0 waits for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar
from slimlm.search.space import REFERENCE_TYPES, Knob, Option, SearchSpace
from slimlm.search.statistics import SearchStatistics, embedding_shaped_proxy, projection_proxy, shaped_proxy

VERSION = 2  # 2: GPTQ codes at gguf_types.GGUF_GPTQ_DAMP (was GPTQ's 0.01)
BASELINE_METHOD = "ref"  # llama.cpp's reference quantizer: always encoded (the presets use it)


@dataclass(frozen=True)
class Variant:
    option: Option
    bytes: int  # of the tensor's data in the file
    proxy: float  # additive proxy KL (nats per token) of this tensor alone


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture and every weight's bytes (float32): same model, same fingerprint."""
    digest = hashlib.sha256(model.config.model_type.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- encoding one tensor ---------------------------------------------------------------------------------------


def encode(weight: torch.Tensor, option: Option, hessian: torch.Tensor | None, importance: torch.Tensor | None) -> np.ndarray:
    """weight (out, in) -> the GGUF bytes (out, row bytes) uint8 that `option` writes for it (for a
    compressed-tensors type, `search.compressed_tensors.ct_encode`'s payload)."""
    from slimlm.export.gguf_types import quantize_tensor
    from slimlm.search.compressed_tensors import ct_encode, is_ct_type

    if is_ct_type(option.type):
        return ct_encode(weight, option, hessian)

    w = weight.detach().float().cpu()
    if option.method == BASELINE_METHOD:
        if option.type == "f16":
            return w.numpy().astype(np.float16).view(np.uint8)
        from gguf import quants

        from slimlm.export.gguf_types import ggml_type

        return np.ascontiguousarray(quants.quantize(w.numpy(), ggml_type(option.type)))
    if option.method == "gptq":
        return gptq_encode(w, hessian, option.type, importance)
    return np.ascontiguousarray(quantize_tensor(w, option.type, importance))


def gptq_encode(weight: torch.Tensor, hessian: torch.Tensor, type_: str, importance: torch.Tensor | None = None) -> np.ndarray:
    """GPTQ on the GGUF type's grid; the codes it commits are the file's codes."""
    from slimlm.export import gguf_types

    return np.ascontiguousarray(gguf_types.gptq_for_type(weight, hessian, type_, importance=importance))


def decode(data: np.ndarray, option: Option, shape: tuple[int, int]) -> torch.Tensor:
    from slimlm.export.gguf_types import dequantize_tensor
    from slimlm.search.compressed_tensors import ct_decode, is_ct_type

    if is_ct_type(option.type):
        return ct_decode(data, option, shape)

    return dequantize_tensor(data, option.type, shape)


def stored_bytes(knob: Knob, option: Option, data: np.ndarray) -> int:
    """What the variant adds to the file: GGUF stores the payload as it is; compressed-tensors packs it (an upper
    bound with its header entries, `search.compressed_tensors.variant_bytes`)."""
    from slimlm.search.compressed_tensors import is_ct_type, variant_bytes

    return variant_bytes(knob.module, option, knob.shape) if is_ct_type(option.type) else int(data.nbytes)


def proxy_terms(knob: Knob, delta: torch.Tensor, statistics: SearchStatistics, gradients: torch.Tensor, head: str | None) -> tuple[float, float]:
    """(shaped, projection) estimates of one tensor's KL (see `search.statistics`), `gradients` its
    `knob_gradients`; `head` names the output head a tied embedding also is."""
    if knob.role in ("linear", "output"):
        shaped = shaped_proxy(delta, statistics.hessians[knob.module], statistics.output_fisher[knob.module])
    else:
        shaped = embedding_shaped_proxy(delta, statistics)
        if head is not None:
            shaped += shaped_proxy(delta, statistics.hessians[head], statistics.output_fisher[head])
    return shaped, projection_proxy(delta, gradients, statistics.tokens)


def knob_gradients(knob: Knob, statistics: SearchStatistics, embed: str, head: str | None) -> torch.Tensor:
    """Each window's gradient with respect to the knob's tensor, float32 (a tied embedding: both roles summed),
    made once per knob: converting the embedding's per option cost more than its proxies."""
    if knob.role in ("linear", "output"):
        return statistics.gradients[knob.module].float()
    gradients = statistics.gradients[embed].float()
    return gradients + statistics.gradients[head].float() if head is not None else gradients


def scaled_proxies(terms: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Each option's shaped estimate, scaled by Σ projection / Σ shaped over the tensor's options."""
    shaped = sum(s for s, _ in terms.values())
    projected = sum(p for _, p in terms.values())
    if shaped <= 0:
        return {label: p for label, (_, p) in terms.items()}
    return {label: s * projected / shaped for label, (s, _) in terms.items()}


# --- the database ---------------------------------------------------------------------------------------------


class Database:
    """Variants of every knob, on disk; `variants[tensor]` lists each option's bytes and proxy KL."""

    def __init__(self, path: Path, space: SearchSpace, variants: dict[str, list[Variant]]):
        self.path, self.space, self.variants = path, space, variants

    def payload(self, tensor: str, option: Option) -> np.ndarray:
        from safetensors.numpy import load_file

        return load_file(str(_knob_file(self.path, tensor)))[option.label]

    def chosen(self, configuration) -> dict[str, tuple[Option, np.ndarray]]:
        """Tensor (base numbering) -> (option, stored bytes) of every knob `configuration` keeps: what its file holds."""
        kept = {}
        for knob, index in zip(self.space.knobs, configuration.choice):
            if knob.block not in configuration.removed:
                option = self.variants[knob.tensor][index].option
                kept[knob.tensor] = (option, self.payload(knob.tensor, option))
        return kept

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.path / "tensors").iterdir())


def _knob_file(path: Path, tensor: str) -> Path:
    return path / "tensors" / f"{tensor}.safetensors"


def _identity(model_id: str, calibration_sha: str, space: SearchSpace) -> dict:
    return {
        "version": VERSION,
        "model": model_id,
        "calibration": calibration_sha,
        "target": space.target,
        "knobs": {k.tensor: [o.label for o in k.options] for k in space.knobs},
    }


def _check_identity(path: Path, wanted: dict) -> None:
    found = json.loads((path / "database.json").read_text())
    for key, what in (("version", "format version"), ("model", "model weights"), ("calibration", "calibration tokens"), ("target", "target format")):
        if found.get(key) != wanted[key]:
            raise SlimlmError(
                f"the search database in {path} was built for other {what} ({key} {str(found.get(key))[:16]} here, {str(wanted[key])[:16]} now)",
                "pass another --database directory (or delete this one) to build a new database",
            )
    extra = {t: o for t, o in wanted["knobs"].items() if t in found["knobs"] and set(o) - set(found["knobs"][t])}
    if set(found["knobs"]) != set(wanted["knobs"]) or extra:
        found["knobs"] = {t: sorted(set(found["knobs"].get(t, [])) | set(o)) for t, o in wanted["knobs"].items()}
        (path / "database.json").write_text(json.dumps(found, indent=1))  # new options are added to the same database


def _atomic_write(target: Path, write) -> None:
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        write(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _read_variants(path: Path, knob: Knob) -> list[Variant] | None:
    """The knob's stored variants if its file holds every wanted option, else None (to (re)build)."""
    from safetensors import safe_open

    file = _knob_file(path, knob.tensor)
    if not file.exists():
        return None
    with safe_open(str(file), "np") as f:
        meta = json.loads(f.metadata()["variants"])
    wanted = [o.label for o in (*knob.options, *baseline_options(knob))]
    if any(label not in meta for label in wanted):
        return None
    return [Variant(Option.parse(label), meta[label]["bytes"], meta[label]["proxy"]) for label in wanted]


def baseline_options(knob: Knob) -> tuple[Option, ...]:
    """The reference-quantizer encodings of each searched type (llama.cpp's presets without an imatrix)."""
    types = sorted({o.type for o in knob.options if o.type in REFERENCE_TYPES})
    return tuple(o for o in (Option(t, BASELINE_METHOD) for t in types) if o not in knob.options)


def build_database(
    path: str | Path,
    model: nn.Module,
    space: SearchSpace,
    statistics_for,
    calibration_sha: str,
    rank: int = 0,
    world: int = 1,
) -> Database:
    """Encode every knob once per option (resuming what an earlier run stored) and return the database.

    `statistics_for()` is called only if some knob is still missing (the statistics pass is the costly part on a
    resumed run). Knob i is built by rank i mod world; rank 0 then waits for the other ranks' files.
    """
    from slimlm.models.adapters import adapter_for
    from slimlm.search.space import tied_output

    path = Path(path)
    (path / "tensors").mkdir(parents=True, exist_ok=True)
    identity = _identity(model_fingerprint(model), calibration_sha, space)
    if (path / "database.json").exists():
        _check_identity(path, identity)
    elif rank == 0:
        _atomic_write(path / "database.json", lambda p: p.write_text(json.dumps(identity, indent=1)))
    adapter = adapter_for(model)
    head = adapter.lm_head if tied_output(model) else None
    variants: dict[str, list[Variant]] = {}
    todo = []
    for number, group in enumerate(shared_input_groups(space)):
        for knob in group:
            stored = _read_variants(path, knob)
            if stored is not None:
                variants[knob.tensor] = stored
        missing = [k for k in group if k.tensor not in variants]
        if missing and number % world == rank:
            todo.append(missing)
    if todo:
        statistics = statistics_for()
        with progress_bar("search: encoding tensor variants", sum(map(len, todo)), unit="tensors") as advance:
            for group in todo:
                for knob, meta in _encode_group(model, group, statistics, adapter.embed, head, path):
                    variants[knob.tensor] = [Variant(Option.parse(label), m["bytes"], m["proxy"]) for label, m in meta.items()]
                    advance()
    if rank == 0 and world > 1:
        _wait_for_others(path, space, variants)
    return Database(path, space, variants)


def shared_input_groups(space: SearchSpace) -> list[list[Knob]]:
    """Knobs that read the same input (q/k/v, gate/up of one block) together: GPTQ runs once on their stacked rows
    (rows are independent given H, so this equals one run each, with one factorization and one column loop)."""
    groups: dict[tuple, list[Knob]] = {}
    for knob in space.knobs:
        key = (knob.block, knob.shared) if knob.role == "linear" else (knob.tensor,)
        groups.setdefault(key, []).append(knob)
    return list(groups.values())


def group_inputs(model: nn.Module, group: list[Knob], statistics: SearchStatistics, head: str | None) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """(each knob's float32 weight, the Hessian and importance of the input the group reads)."""
    weights = [_weight(model, knob).detach().float().cpu() for knob in group]
    module = head if group[0].role == "embedding" else group[0].module
    hessian = statistics.hessians.get(module) if module else None
    importance = statistics.importance(module) if module in statistics.hessians else None
    return weights, hessian, importance


def encode_group(weights: list[torch.Tensor], options: list[tuple[Option, ...]], hessian: torch.Tensor | None, importance: torch.Tensor | None) -> list[dict[str, np.ndarray]]:
    """Each weight's payload by option label. GPTQ runs once per type on the group's stacked rows; the database
    and a recipe's replay (`search.replay`) both encode through here, so they write the same bytes."""
    stacked: dict[str, list[np.ndarray]] = {}  # GPTQ type -> each knob's rows
    encoded = []
    for position, (weight, wanted) in enumerate(zip(weights, options)):
        payloads = {}
        for option in wanted:
            if option.method == "gptq" and len(weights) > 1 and space_target(option) == "gguf":
                if option.type not in stacked:
                    rows = np.cumsum([w.shape[0] for w in weights])[:-1]
                    stacked[option.type] = np.split(gptq_encode(torch.cat(weights), hessian, option.type, importance), rows)
                data = stacked[option.type][position]
            else:
                data = encode(weight, option, hessian, importance)
            payloads[option.label] = np.ascontiguousarray(data)
        encoded.append(payloads)
    return encoded


def _encode_group(model: nn.Module, group: list[Knob], statistics: SearchStatistics, embed: str, head: str | None, path: Path):
    """Encode each knob of `group` in every option, write its file, yield (knob, its variants' metadata)."""
    from safetensors.numpy import save_file

    weights, hessian, importance = group_inputs(model, group, statistics, head)
    encoded = encode_group(weights, [(*k.options, *baseline_options(k)) for k in group], hessian, importance)
    for knob, weight, payloads in zip(group, weights, encoded):
        gradients = knob_gradients(knob, statistics, embed, head)
        terms = {label: proxy_terms(knob, decode(data, Option.parse(label), knob.shape) - weight, statistics, gradients, head) for label, data in payloads.items()}
        proxies = scaled_proxies(terms)
        meta = {label: {"bytes": stored_bytes(knob, Option.parse(label), payloads[label]), "proxy": proxies[label], "shaped": sh, "projection": pr} for label, (sh, pr) in terms.items()}
        _atomic_write(_knob_file(path, knob.tensor), lambda p, d=payloads, m=meta: save_file(d, str(p), metadata={"variants": json.dumps(m)}))
        yield knob, meta


def space_target(option: Option) -> str:
    from slimlm.search.compressed_tensors import TARGET, is_ct_type

    return TARGET if is_ct_type(option.type) else "gguf"


def _wait_for_others(path: Path, space: SearchSpace, variants: dict[str, list[Variant]], timeout_s: float = 86400) -> None:
    start = time.monotonic()
    while len(variants) < len(space.knobs):
        for knob in space.knobs:
            if knob.tensor not in variants:
                stored = _read_variants(path, knob)
                if stored is not None:
                    variants[knob.tensor] = stored
        if len(variants) < len(space.knobs):
            if time.monotonic() - start > timeout_s:
                raise SlimlmError("the other search processes did not finish their share of the database", "check their logs; rerun to resume")
            time.sleep(2)


def _weight(model: nn.Module, knob: Knob) -> torch.Tensor:
    from slimlm.models.adapters import linear_weight

    module = model.get_submodule(knob.module)
    return module.weight if knob.role != "linear" else linear_weight(module)


def describe(database: Database) -> dict:
    return {"path": str(database.path), "bytes": database.size_bytes(), "knobs": len(database.variants), "variants": sum(len(v) for v in database.variants.values()),
            "options": sorted({v.option.label for vs in database.variants.values() for v in vs})}

