"""What a per-tensor GGUF mixture costs to run in llama.cpp on this machine: decode tokens/s and peak RAM,
predicted from a few files measured once (the format-true costs of a search over mixtures).

Model (per decoded token, batch 1, after `prompt_tokens` of context, `threads` threads; L = decoder blocks):

    seconds/token = fixed + L · per_block + Σ_t bytes_t · seconds_per_byte[t]    bytes_t: the 2-D tensors held as t
    peak RSS      = ram_fixed + L · ram_per_block + Σ_t bytes_t · ram_per_byte[t]

Decode on CPU streams every weight once per token, so its time is bytes over the speed at which each type's
kernel eats them (dequantize + dot product: Q4_0 is fewer bytes than Q8_0 but more work per byte); `per_block`
is what a block costs whatever its weights (attention over the KV cache, norms, RoPE, graph and thread overhead)
and `fixed` the rest. RAM: llama.cpp maps the file and touches every page, a type whose weights it repacks for
its SIMD kernels (Q4_0 on AVX2) may hold a second copy, and the KV cache grows with L.

Calibration (`measure_type_costs`), each file written by slimlm's GGUF writer: per type t, one file with every 2-D tensor in t and one with the block linears in t and the
embedding / output in `types[0]` (the reference); then the reference-type model with half its blocks removed and
with its MLPs half as wide. Mixtures of one model alone cannot separate a fixed cost from a per-byte cost (any
mixture's bytes are a blend of the uniform files'); fewer blocks and narrower MLPs can. The coefficients are the
least-squares fit over the distinct files (n + 3 unknowns for n types; a type no tensor of the embedding's shape
can hold makes "all-t" and "blocks-t" the same file, measured once); each file's residual is kept, and
`CostModel.check_file` measures a held-out file against its prediction.

Measurement: every file's peak RSS in a process of its own (`llama_cpp_speed`), and the decode rates of all of them
side by side (`llama_cpp_decode_rounds`): on a shared machine one file measured alone drifts by ~10% from one
minute to the next, which is as large as the per-type differences being fitted; files decoded in alternation, round
after round, keep their ratios within ~2%. A k-quant the 576-wide SmolLM2 holds only in ffn_down changes a file's
decode time by a few percent, so a fit from separate runs priced it by noise (session 26: Q2_K at 5x Q8_0 per byte).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.errors import SlimlmError
from slimlm.evaluate.llama_cpp import llama_cpp_decode_rounds, llama_cpp_speed

if TYPE_CHECKING:
    from slimlm.models.load import LoadedModel


@dataclass(frozen=True)
class CostMeasurement:
    """One measured file: what it holds and what llama.cpp made of it."""

    label: str
    blocks: int  # decoder blocks
    bytes_by_type: dict[str, int]  # bytes of the file's 2-D tensors per GGUF type
    file_bytes: int
    decode_tokens_per_s: float  # median of rounds
    decode_tokens_per_s_p10: float  # from the 10th percentile of token latencies (robust on a shared machine)
    decode_cpu_tokens_per_s: float  # from the CPU time of the decode (load-proof with OMP_WAIT_POLICY=passive)
    prefill_tokens_per_s: float
    peak_rss_bytes: int
    load: str  # load averages when it was measured
    rounds: list[float] = field(default_factory=list)  # each round's decode tok/s (side by side with the others)


@dataclass(frozen=True)
class CostModel:
    fixed_seconds: float  # per decoded token, whatever the weights
    seconds_per_block: float  # per decoded token and decoder block, whatever its weights
    seconds_per_byte: dict[str, float]  # per GGUF type
    ram_fixed_bytes: float
    ram_per_block: float
    ram_per_byte: dict[str, float]
    shapes: dict[str, list[int]]  # the calibrated model's 2-D tensors: GGUF name -> (rows, row length)
    threads: int
    prompt_tokens: int  # decode measured after this much context
    new_tokens: int
    repeats: int  # rounds of decoding every calibration file, side by side
    statistic: str  # the decode figure fitted and checked: "median" (of rounds), "p10" (token latencies), "cpu"
    machine: str  # CPU, cores, OS
    llama_cpp: str  # llama-cpp-python version and llama.cpp's CPU features
    model: str  # what it was calibrated on
    created: str
    measurements: list[CostMeasurement] = field(default_factory=list)
    method: str = "separate"  # "side-by-side": decode rates from llama_cpp_decode_rounds; "separate": one run each

    def _bytes_by_type(
        self, tensor_types: Mapping[str, str], shapes: Mapping[str, Sequence[int]] | None
    ) -> dict[str, int]:
        from slimlm.export.gguf_types import tensor_bytes

        shapes = self.shapes if shapes is None else shapes
        unknown = [name for name in tensor_types if name not in shapes]
        if unknown:
            raise SlimlmError(
                f"no shape for tensor '{unknown[0]}' ({len(unknown)} tensors without one)",
                "pass shapes for every tensor in tensor_types (GGUF name -> (rows, row length))",
            )
        missing = [name for name in shapes if name not in tensor_types]
        if missing:
            raise SlimlmError(
                f"tensor '{missing[0]}' has no type ({len(missing)} of {len(shapes)} tensors without one)",
                "give every 2-D tensor of the model a type: the cost is of the whole file",
            )
        totals: dict[str, int] = {}
        for name, kind in tensor_types.items():
            if kind not in self.seconds_per_byte:
                raise SlimlmError(
                    f"type '{kind}' of {name} was not calibrated on this machine",
                    f"calibrated types: {', '.join(self.seconds_per_byte)}; add it to measure_type_costs(types=...)",
                )
            totals[kind] = totals.get(kind, 0) + tensor_bytes(kind, shapes[name])
        return totals

    def predict_decode_seconds(
        self, tensor_types: Mapping[str, str], shapes: Mapping[str, Sequence[int]] | None = None
    ) -> float:
        totals = self._bytes_by_type(tensor_types, shapes)
        return (
            self.fixed_seconds
            + blocks_of(tensor_types) * self.seconds_per_block
            + sum(count * self.seconds_per_byte[kind] for kind, count in totals.items())
        )

    def predict_decode_tps(
        self, tensor_types: Mapping[str, str], shapes: Mapping[str, Sequence[int]] | None = None
    ) -> float:
        """Decode tokens/s of a file whose 2-D tensors have these types (GGUF names, e.g. blk.3.ffn_down.weight);
        `shapes` (GGUF name -> (rows, row length)) default: the calibrated model's. Blocks are counted from the
        names, so a depth-pruned mixture (blocks renumbered 0..L-1) or a narrower one (its own shapes) is priced too."""
        return 1.0 / self.predict_decode_seconds(tensor_types, shapes)

    def predict_ram_bytes(
        self, tensor_types: Mapping[str, str], shapes: Mapping[str, Sequence[int]] | None = None
    ) -> float:
        """Peak RSS of llama.cpp running that file (weights, repacked copies, KV cache at the calibrated context)."""
        totals = self._bytes_by_type(tensor_types, shapes)
        return (
            self.ram_fixed_bytes
            + blocks_of(tensor_types) * self.ram_per_block
            + sum(count * self.ram_per_byte[kind] for kind, count in totals.items())
        )

    def check_file(self, path: str | Path, repeats: int | None = None) -> dict:
        """Measure a GGUF in llama.cpp (same settings as the calibration) against this model's prediction."""
        types, shapes = gguf_tensor_types(path)
        speed = llama_cpp_speed(path, self.threads, self.prompt_tokens, self.new_tokens, repeats=1)
        (decode,) = llama_cpp_decode_rounds(
            [path], self.threads, self.prompt_tokens, self.new_tokens, repeats or self.repeats
        )
        predicted_tps, predicted_ram = self.predict_decode_tps(types, shapes), self.predict_ram_bytes(types, shapes)
        measured = decode_rate(decode, self.statistic)
        return {
            "file": str(path),
            "predicted_decode_tokens_per_s": predicted_tps,
            "measured_decode_tokens_per_s": measured,
            "measured_decode_tokens_per_s_median": decode.decode_tokens_per_s,
            "decode_error": predicted_tps / measured - 1,
            "predicted_ram_bytes": predicted_ram,
            "measured_ram_bytes": speed.peak_rss_bytes,
            "ram_error": predicted_ram / speed.peak_rss_bytes - 1,
            "load": speed.load,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> CostModel:
        data = dict(data)
        data["measurements"] = [CostMeasurement(**m) for m in data.get("measurements", [])]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


def gguf_tensor_types(path: str | Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """A GGUF's 2-D tensors: name -> type ("q4_0", "f16", ...) and name -> (rows, row length)."""
    from gguf import GGUFReader

    types, shapes = {}, {}
    for tensor in GGUFReader(str(path)).tensors:
        if len(tensor.shape) == 2:
            types[tensor.name] = tensor.tensor_type.name.lower()
            shapes[tensor.name] = [int(n) for n in reversed(tensor.shape)]  # GGUF lists the row length first
    return types, shapes


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def blocks_of(tensor_types: Mapping[str, str]) -> int:
    """Decoder blocks a file has: distinct blk.N of its tensor names."""
    return len({name.split(".")[1] for name in tensor_types if name.startswith("blk.")})


STATISTICS = {"median": "decode_tokens_per_s", "p10": "decode_tokens_per_s_p10", "cpu": "decode_cpu_tokens_per_s"}


def decode_rate(measurement, statistic: str) -> float:
    """The decode figure `statistic` names, from a CostMeasurement or a LlamaCppSpeed."""
    return getattr(measurement, STATISTICS[statistic])


def fit(
    measurements: Sequence[CostMeasurement], types: Sequence[str], statistic: str = "median"
) -> tuple[list[float], list[float]]:
    """Least squares of seconds/token and of peak RSS on [1, blocks, bytes per type]: the two coefficient lists."""
    import numpy as np

    x = np.array(
        [[1.0, m.blocks] + [m.bytes_by_type.get(t, 0) for t in types] for m in measurements]
    )  # (files, 2 + types)
    scale = np.abs(x).max(axis=0)  # the columns on one footing for the rank test and the solve
    scale[scale == 0] = 1.0
    if np.linalg.matrix_rank(x / scale) < x.shape[1]:
        raise SlimlmError(
            f"{len(measurements)} calibration files cannot separate {len(types)} types, a per-block and a fixed cost",
            "calibrate at least two types that the model's tensors can hold",
        )
    seconds = (
        np.linalg.lstsq(x / scale, np.array([1.0 / decode_rate(m, statistic) for m in measurements]), rcond=None)[0]
        / scale
    )
    ram = np.linalg.lstsq(x / scale, np.array([float(m.peak_rss_bytes) for m in measurements]), rcond=None)[0] / scale
    return seconds.tolist(), ram.tolist()


def calibration_files(shapes: Mapping[str, Sequence[int]], types: Sequence[str]) -> dict[str, dict[str, str]]:
    """label -> per-tensor types: per type t, all 2-D tensors in t ("all-t") and the block linears in t with the
    embedding / output in types[0] ("blocks-t"); a tensor whose rows t cannot split stays in types[0]."""
    from slimlm.export.gguf_types import types_for_shape

    reference = types[0]
    files = {}
    for kind in types:

        def pick(name: str, wanted: str) -> str:
            return wanted if wanted in types_for_shape(shapes[name]) else reference

        files[f"all-{kind}"] = {name: pick(name, kind) for name in shapes}
        if kind != reference:
            files[f"blocks-{kind}"] = {
                name: pick(name, kind if name.startswith("blk.") else reference) for name in shapes
            }
    return files


def measure_type_costs(
    model_or_dir: str | Path | LoadedModel,
    types: list[str],
    threads: int = 2,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    repeats: int = 10,
    work_dir: str | Path | None = None,
    progress: bool = True,
    statistic: str = "median",
) -> CostModel:
    """Calibrate the cost model on this machine: write the model's GGUF once per calibration file (see the module
    docstring) into `work_dir` (default: a temporary directory, removed after; it holds every file at once), measure
    each one's peak RSS alone and all their decode rates side by side (`repeats` rounds), fit.
    `types[0]` is the reference type the mixed files keep for the embedding (q8_0 is a good one). `statistic`
    "p10" fits the decode rate from the 10th percentile of token latencies instead of the median of rounds, "cpu"
    from the decode's CPU time (threads x tokens / CPU seconds): on a machine other processes share, those stay
    nearer the idle machine's figure than the median (cpu only when waiting threads sleep: OMP_WAIT_POLICY=passive)."""
    from slimlm.export.gguf import GGUF_TYPES, write_gguf
    from slimlm.models.load import LoadedModel, load_model
    from slimlm.progress import progress_bar

    if statistic not in STATISTICS:
        raise SlimlmError(f"unknown decode statistic '{statistic}'", f"use one of: {', '.join(STATISTICS)}")
    if len(set(types)) < 2:
        raise SlimlmError(
            f"the cost model needs at least two types, got {types}", "pass e.g. types=['q8_0', 'q4_0', 'f16']"
        )
    bad = [t for t in types if t not in GGUF_TYPES]
    if bad:
        raise SlimlmError(f"slimlm cannot write GGUF type '{bad[0]}'", f"use types among: {', '.join(GGUF_TYPES)}")
    loaded = model_or_dir if isinstance(model_or_dir, LoadedModel) else load_model(str(model_or_dir), device="cpu")
    reference = types[0]
    with tempfile.TemporaryDirectory(prefix="slimlm-costs-") as scratch:
        folder = Path(work_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)
        probe = write_gguf(loaded.model, loaded.tokenizer, folder / "probe.gguf", reference, overwrite=True)
        (folder / "probe.gguf").unlink()
        shapes = {t["name"]: t["shape"] for t in probe.tensors if len(t["shape"]) == 2}
        distinct: dict[tuple, str] = {}  # the same per-tensor types under two labels: one file
        for label, tensor_types in calibration_files(shapes, types).items():
            distinct.setdefault(tuple(sorted(tensor_types.items())), label)
        jobs = [(label, lambda: loaded.model, dict(key)) for key, label in distinct.items()]
        jobs += [
            (f"half-depth-{reference}", lambda: _pruned(loaded.model, "depth"), None),
            (f"half-mlp-{reference}", lambda: _pruned(loaded.model, "width"), None),
        ]
        files, alone, engine = [], [], ""
        with progress_bar("cost model: files written, peak RAM", len(jobs), unit="files", show=progress) as advance:
            for label, build, tensor_types in jobs:
                path = folder / f"{label}.gguf"
                model = build()
                summary = write_gguf(
                    model, loaded.tokenizer, path, reference, overwrite=True, tensor_types=tensor_types
                )
                del model
                speed = llama_cpp_speed(path, threads, prompt_tokens, new_tokens, repeats=1)
                engine = speed.llama_cpp
                files.append((label, path, summary.tensors))
                alone.append(speed)
                advance()
        decodes = llama_cpp_decode_rounds(
            [path for _, path, _ in files], threads, prompt_tokens, new_tokens, repeats, progress=progress
        )
        measurements = [
            _measurement(label, tensors, speed, decode)
            for (label, _, tensors), speed, decode in zip(files, alone, decodes)
        ]
        if work_dir is None:
            for _, path, _ in files:
                path.unlink()
    seconds, ram = fit(measurements, list(dict.fromkeys(types)), statistic)
    return CostModel(
        fixed_seconds=seconds[0],
        seconds_per_block=seconds[1],
        seconds_per_byte=dict(zip(dict.fromkeys(types), seconds[2:])),
        ram_fixed_bytes=ram[0],
        ram_per_block=ram[1],
        ram_per_byte=dict(zip(dict.fromkeys(types), ram[2:])),
        shapes=shapes,
        threads=threads,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        statistic=statistic,
        machine=machine_description(),
        llama_cpp=engine,
        model=loaded.source,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        measurements=measurements,
        method="side-by-side",
    )


def _pruned(model, how: str):
    """A copy with half its blocks removed, or with MLPs half as wide: which ones does not change the cost."""
    import copy

    import torch

    from slimlm.prune.depth import DepthConfig, prune_depth_
    from slimlm.prune.width import WidthConfig, prune_width_

    pruned = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    if how == "depth":
        prune_depth_(pruned, DepthConfig(fraction=0.5), ids)
    else:
        prune_width_(pruned, WidthConfig(mlp=0.5, multiple_of=32), ids)
    return pruned


def _measurement(label: str, tensors: list[dict], speed, decode) -> CostMeasurement:
    """A file's measurement: bytes per type of its 2-D tensors, peak RSS and prefill from its own run (`speed`),
    decode rates from the side-by-side rounds (`decode`)."""
    bytes_by_type: dict[str, int] = {}
    for tensor in tensors:
        if len(tensor["shape"]) == 2:
            bytes_by_type[tensor["type"]] = bytes_by_type.get(tensor["type"], 0) + tensor["bytes"]
    return CostMeasurement(
        label,
        blocks_of({tensor["name"]: tensor["type"] for tensor in tensors}),
        bytes_by_type,
        speed.file_bytes,
        decode.decode_tokens_per_s,
        decode.decode_tokens_per_s_p10,
        decode.decode_cpu_tokens_per_s,
        speed.prefill_tokens_per_s,
        speed.peak_rss_bytes,
        speed.load,
        decode.rounds,
    )
