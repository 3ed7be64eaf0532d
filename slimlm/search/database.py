"""The database of compressed tensor variants: every knob encoded once per option, kept on disk, reused across
budgets (EvoPress's "layer database").

    DIR/database.json           what it was built from (model, calibration, options): a mismatch is refused
    DIR/tensors/<tensor>.safetensors   one uint8 entry per option: the exact bytes the GGUF file will hold,
                                rows in the model's order; its metadata holds each option's bytes and proxy KL

Each knob's file is written atomically when done, so an interrupted build resumes where it stopped. The work is
split over forked processes, one per core (`_encode_all`). Under `torchrun` every process builds its share (knob
group i goes to rank i mod world size) and rank 0 waits for the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimlm.calibration.hessian import single_threaded
from slimlm.errors import SlimlmError
from slimlm.progress import progress_bar
from slimlm.search.space import REFERENCE_TYPES, Knob, Option, SearchSpace
from slimlm.search.statistics import (
    SearchStatistics,
    embedding_importance,
    embedding_shaped_proxy,
    projection_proxy,
    rounding_proxy,
    shaped_proxy,
)

# 2: GPTQ codes at gguf_types.GGUF_GPTQ_DAMP (was GPTQ's 0.01); 3: exact reference codes reused, one thread;
# 4: the embedding's rounding weighted per element; 5: llama.cpp's activation rounding in the proxy, F16 linears
VERSION = 5
BASELINE_METHOD = "ref"  # llama.cpp's reference quantizer: always encoded (the presets use it)


@dataclass(frozen=True)
class Variant:
    option: Option
    bytes: int  # of the tensor's data in the file
    proxy: float  # additive proxy KL (nats per token) of this tensor alone, llama.cpp's input rounding included
    same_as: str | None = None  # the label of an earlier option with the very same bytes (stored once, scored once)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the architecture and every weight's bytes (float32): same model, same fingerprint."""
    digest = hashlib.sha256(model.config.model_type.encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --- encoding one tensor ---------------------------------------------------------------------------------------


def encode(
    weight: torch.Tensor, option: Option, hessian: torch.Tensor | None, importance: torch.Tensor | None
) -> np.ndarray:
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


def gptq_encode(
    weight: torch.Tensor, hessian: torch.Tensor, type_: str, importance: torch.Tensor | None = None
) -> np.ndarray:
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


def proxy_terms(
    knob: Knob, delta: torch.Tensor, statistics: SearchStatistics, gradients: torch.Tensor, head: str | None
) -> tuple[float, float]:
    """(shaped, projection) estimates of one tensor's KL (see `search.statistics`), `gradients` its
    `knob_gradients`; `head` names the output head a tied embedding also is."""
    if knob.role in ("linear", "output"):
        shaped = shaped_proxy(delta, statistics.hessians[knob.module], statistics.output_fisher[knob.module])
    else:
        shaped = embedding_shaped_proxy(delta, statistics)
        if head is not None:
            shaped += shaped_proxy(delta, statistics.hessians[head], statistics.output_fisher[head])
    return shaped, projection_proxy(delta, gradients, statistics.tokens)


def input_rounding_proxy(
    knob: Knob, weight: torch.Tensor, type_: str, statistics: SearchStatistics, head: str | None
) -> float:
    """The proxy KL of llama.cpp rounding the input of this tensor's matmul for a `type_` weight (0 for a lookup
    table, or where the statistics hold no noise: another target)."""
    from slimlm.export.gguf_types import TYPES

    module = head if knob.role == "embedding" else knob.module
    if module is None or type_ not in TYPES:
        return 0.0
    noise = statistics.activation_noise.get(module, {}).get(TYPES[type_].activations)
    return 0.0 if noise is None else rounding_proxy(weight, noise, statistics.output_fisher[module])


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

        variant = next(v for v in self.variants[tensor] if v.option == option)
        return load_file(str(_knob_file(self.path, tensor)))[variant.same_as or option.label]

    def canonical(self, configuration):
        """The configuration with every variant replaced by the first one holding the same bytes: equal
        configurations get one key (a model shipped in a type has its GPTQ and reference codes identical)."""
        choice = []
        for knob, index in zip(self.space.knobs, configuration.choice):
            variants = self.variants[knob.tensor]
            same_as = variants[index].same_as
            choice.append(next((i for i, v in enumerate(variants) if v.option.label == same_as), index))
        return dataclasses.replace(configuration, choice=tuple(choice))

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
    for key, what in (
        ("version", "format version"),
        ("model", "model weights"),
        ("calibration", "calibration tokens"),
        ("target", "target format"),
    ):
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
    return [
        Variant(Option.parse(label), meta[label]["bytes"], meta[label]["proxy"], meta[label].get("same_as"))
        for label in wanted
    ]


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
        for knob, found in _encode_all(model, todo, statistics, adapter.embed, head, path):
            variants[knob.tensor] = found
    if rank == 0 and world > 1:
        _wait_for_others(path, space, variants)
    return Database(path, space, variants)


MAX_WORKERS = 8  # forked encoders at most (each holds its own temporaries beside the shared statistics)


def _encode_all(
    model: nn.Module, groups: list[list[Knob]], statistics: SearchStatistics, embed: str, head: str | None, path: Path
):
    """Yield (knob, its variants) for every knob of `groups`, encoded by this process and by forked workers,
    one per core, each single-threaded (1.9x one process on 2 cores, measured). The workers share the
    statistics copy-on-write and write their knobs' files; whatever a worker leaves undone, this process encodes."""
    workers = _worker_count(len(groups))
    shares: list[list[list[Knob]]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for group in sorted(groups, key=_cost, reverse=True):  # the largest first, each to the least loaded share
        least = loads.index(min(loads))
        shares[least].append(group)
        loads[least] += _cost(group)

    def encode_share(share: list[list[Knob]]) -> None:
        for group in share:
            for _ in _encode_group(model, group, statistics, embed, head, path):
                pass

    children = {}
    for share in shares[1:]:
        pid = _fork(lambda share=share: encode_share(share))
        if pid is None:
            shares[0] += share
        else:
            children[pid] = [k for g in share for k in g]
    pending = [k for knobs in children.values() for k in knobs]

    def finished_by_workers():
        for knob in list(pending):
            found = _read_variants(path, knob)
            if found is not None:
                pending.remove(knob)
                yield knob, found

    def encoded():  # every knob once: this process's share, the workers' files as they appear, a dead worker's rest
        for group in shares[0]:
            for knob, meta in _encode_group(model, group, statistics, embed, head, path):
                yield knob, _variants(meta)
                yield from finished_by_workers()
        while children:
            for pid in [pid for pid in children if os.waitpid(pid, os.WNOHANG)[0]]:
                del children[pid]
            yield from finished_by_workers()
            time.sleep(0.2)
        yield from finished_by_workers()
        left = [[k for k in group if k in pending] for group in groups]
        for group in (g for g in left if g):
            for knob, meta in _encode_group(model, group, statistics, embed, head, path):
                yield knob, _variants(meta)

    try:
        with (
            progress_bar("search: encoding tensor variants", sum(map(len, groups)), unit="tensors") as advance,
            _counting(list(pending), path, advance) as count,
            single_threaded(),
        ):
            for knob, found in encoded():
                count(knob)
                yield knob, found
    finally:
        for pid in children:  # interrupted: stop the workers too (their finished files stay for the resume)
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


WATCH_EVERY_S = 0.5  # how often the encoding bar looks for the workers' finished files


@contextmanager
def _counting(watched: list[Knob], path: Path, advance: Callable[[], None]) -> Iterator[Callable[[Knob], None]]:
    """Yield `count(knob)`, which advances the bar once per knob, and meanwhile count the `watched` (the workers')
    knobs from a thread as their files appear: this process hands them over only between its own knobs, and its
    first, the embedding, takes 47 s on SmolLM2, which left a piped log at 0 that long. The lock also makes one
    `advance` at a time (a plain-line bar's count is not thread-safe). Enter it after forking the workers: a child
    forked while the thread holds a lock would wait on it forever."""
    counted: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def count(knob: Knob) -> None:
        with lock:
            if knob.tensor not in counted:
                counted.add(knob.tensor)
                advance()

    def watch() -> None:
        while not stop.wait(WATCH_EVERY_S):
            left = [k for k in watched if k.tensor not in counted]
            if not left:
                return
            for knob in left:
                if _read_variants(path, knob) is not None:
                    count(knob)

    thread = threading.Thread(target=watch, name="slimlm-encoding-progress", daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()


def _variants(meta: dict) -> list[Variant]:
    return [Variant(Option.parse(label), m["bytes"], m["proxy"], m.get("same_as")) for label, m in meta.items()]


def _cost(group: list[Knob]) -> int:
    """Work of encoding a group, roughly: weights × options that search (the reference rounding is cheap)."""
    return sum(k.shape[0] * k.shape[1] * max(1, sum(o.method != BASELINE_METHOD for o in k.options)) for k in group)


def _worker_count(groups: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, MAX_WORKERS, groups))


def _fork(run) -> int | None:
    """`run()` in a forked child process (its pid), or None where forking is unsafe: no fork on this platform, or
    CUDA initialised (a child cannot use the parent's CUDA context)."""
    if not hasattr(os, "fork") or torch.cuda.is_initialized():
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: encode its share, then leave without running the parent's exit handlers
        code = 1
        try:
            torch.set_num_threads(1)
            run()
            code = 0
        finally:
            os._exit(code)
    return pid


def shared_input_groups(space: SearchSpace) -> list[list[Knob]]:
    """Knobs that read the same input (q/k/v, gate/up of one block) together: GPTQ runs once on their stacked rows
    (rows are independent given H, so this equals one run each, with one factorization and one column loop)."""
    groups: dict[tuple, list[Knob]] = {}
    for knob in space.knobs:
        key = (knob.block, knob.shared) if knob.role == "linear" else (knob.tensor,)
        groups.setdefault(key, []).append(knob)
    return list(groups.values())


def group_inputs(
    model: nn.Module, group: list[Knob], statistics: SearchStatistics, head: str | None
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """(each knob's float32 weight, the Hessian and importance of the input the group reads)."""
    weights = [_weight(model, knob).detach().float().cpu() for knob in group]
    module = head if group[0].role == "embedding" else group[0].module
    hessian = statistics.hessians.get(module) if module else None
    if group[0].role == "embedding":
        return weights, hessian, embedding_importance(statistics, head)
    importance = statistics.importance(module) if module in statistics.hessians else None
    return weights, hessian, importance


def encode_group(
    weights: list[torch.Tensor],
    options: list[tuple[Option, ...]],
    hessian: torch.Tensor | None,
    importance: torch.Tensor | None,
) -> list[dict[str, np.ndarray]]:
    """Each weight's payload by option label. GPTQ runs once per type on the group's stacked rows; the database
    and a recipe's replay (`search.replay`) both encode through here, so they write the same bytes."""
    with single_threaded():
        return _encode_group_payloads(weights, options, hessian, importance)


def _encode_group_payloads(
    weights: list[torch.Tensor],
    options: list[tuple[Option, ...]],
    hessian: torch.Tensor | None,
    importance: torch.Tensor | None,
) -> list[dict[str, np.ndarray]]:
    stacked: dict[str, list[np.ndarray]] = {}  # GPTQ type -> each knob's rows
    exact: dict[str, list[np.ndarray] | None] = {}  # type -> the group's lossless reference codes, if they are
    encoded = []
    for position, (weight, wanted) in enumerate(zip(weights, options)):
        payloads = {}
        for option in wanted:
            if option.method != BASELINE_METHOD and space_target(option) == "gguf":
                if option.type not in exact:
                    exact[option.type] = lossless_reference(weights, option.type)
                if exact[option.type] is not None:
                    payloads[option.label] = exact[option.type][position]
                    continue
            if option.method == "gptq" and len(weights) > 1 and space_target(option) == "gguf":
                if option.type not in stacked:
                    rows = np.cumsum([w.shape[0] for w in weights])[:-1]
                    stacked[option.type] = np.split(
                        gptq_encode(torch.cat(weights), hessian, option.type, importance), rows
                    )
                data = stacked[option.type][position]
            else:
                data = encode(weight, option, hessian, importance)
            payloads[option.label] = np.ascontiguousarray(data)
        encoded.append(payloads)
    return encoded


def lossless_reference(weights: list[torch.Tensor], type_: str) -> list[np.ndarray] | None:
    """Each weight's reference codes of `type_` when they reproduce every weight of the group exactly (a model
    shipped in that type, as the embedded SmolLM2 is in Q4_1), else None. No method beats an exact encoding, so
    GPTQ and the rounding search reuse it instead of running (a quarter of the embedded model's database time)."""
    if type_ not in REFERENCE_TYPES or type_ == "f16":
        return None
    option, payloads = Option(type_, BASELINE_METHOD), []
    for weight in weights:
        data = encode(weight, option, None, None)
        if not torch.equal(decode(data, option, tuple(weight.shape)), weight):
            return None
        payloads.append(data)
    return payloads


def _encode_group(
    model: nn.Module, group: list[Knob], statistics: SearchStatistics, embed: str, head: str | None, path: Path
):
    """Encode each knob of `group` in every option, write its file, yield (knob, its variants' metadata)."""
    from safetensors.numpy import save_file

    weights, hessian, importance = group_inputs(model, group, statistics, head)
    encoded = encode_group(weights, [(*k.options, *baseline_options(k)) for k in group], hessian, importance)
    for knob, weight, payloads in zip(group, weights, encoded):
        gradients = knob_gradients(knob, statistics, embed, head)
        same_as = _duplicates(payloads)
        terms = {
            label: proxy_terms(
                knob, decode(data, Option.parse(label), knob.shape) - weight, statistics, gradients, head
            )
            for label, data in payloads.items()
            if label not in same_as
        }
        terms = {label: terms[same_as.get(label, label)] for label in payloads}
        proxies = scaled_proxies(terms)
        options = {label: Option.parse(label) for label in payloads}
        rounding = {o.type: input_rounding_proxy(knob, weight, o.type, statistics, head) for o in options.values()}
        meta = {
            label: {
                "bytes": stored_bytes(knob, options[label], payloads[label]),
                "proxy": proxies[label] + rounding[options[label].type],
                "shaped": sh,
                "projection": pr,
                "input_rounding": rounding[options[label].type],
            }
            for label, (sh, pr) in terms.items()
        }
        for label, first in same_as.items():
            meta[label]["same_as"] = first
        stored = {label: data for label, data in payloads.items() if label not in same_as}
        _atomic_write(
            _knob_file(path, knob.tensor),
            lambda p, d=stored, m=meta: save_file(d, str(p), metadata={"variants": json.dumps(m)}),
        )
        yield knob, meta


def _duplicates(payloads: dict[str, np.ndarray]) -> dict[str, str]:
    """label -> an earlier label of the same type holding identical bytes (the reference quantizer's first: what
    the codes are, whichever method asked for them)."""
    same_as: dict[str, str] = {}
    labels = sorted(payloads, key=lambda label: not label.endswith("/" + BASELINE_METHOD))
    for position, label in enumerate(labels):
        first = next(
            (
                e
                for e in labels[:position]
                if e not in same_as
                and e.split("/")[0] == label.split("/")[0]
                and np.array_equal(payloads[e], payloads[label])
            ),
            None,
        )
        if first is not None:
            same_as[label] = first
    return same_as


def space_target(option: Option) -> str:
    from slimlm.search.compressed_tensors import TARGET, is_ct_type

    return TARGET if is_ct_type(option.type) else "gguf"


def _wait_for_others(
    path: Path, space: SearchSpace, variants: dict[str, list[Variant]], timeout_s: float = 86400
) -> None:
    start = time.monotonic()
    while len(variants) < len(space.knobs):
        for knob in space.knobs:
            if knob.tensor not in variants:
                stored = _read_variants(path, knob)
                if stored is not None:
                    variants[knob.tensor] = stored
        if len(variants) < len(space.knobs):
            if time.monotonic() - start > timeout_s:
                raise SlimlmError(
                    "the other search processes did not finish their share of the database",
                    "check their logs; rerun to resume",
                )
            time.sleep(2)


def _weight(model: nn.Module, knob: Knob) -> torch.Tensor:
    from slimlm.models.adapters import linear_weight

    module = model.get_submodule(knob.module)
    return module.weight if knob.role != "linear" else linear_weight(module)


def describe(database: Database) -> dict:
    return {
        "path": str(database.path),
        "bytes": database.size_bytes(),
        "knobs": len(database.variants),
        "variants": sum(len(v) for v in database.variants.values()),
        "options": sorted({v.option.label for vs in database.variants.values() for v in vs}),
    }
