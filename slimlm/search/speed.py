"""Decode-speed and RAM constraints: priced by a cost model of llama.cpp's kernels measured on this machine
(`evaluate.llama_cpp_costs`), and checked by measuring the written file in llama.cpp.

A configuration's file holds every 2-D tensor at some type; the cost model predicts its decode tokens/s and peak RSS
from bytes per type and the number of blocks. The search treats a configuration the model prices outside the
constraints as not fitting (as if over the byte budget), and the chosen file is then measured: a constraint it does
not meet when measured is an error, not a footnote. The knapsack itself sees the limits through `Pricer.share`: a
type that decodes slowly per byte (Q4_1, Q5_0 on AVX2 here) costs more than its bytes, so the answer spends the
byte budget on fast types (Q4_0, Q8_0) instead of shrinking the file until a slow mixture fits.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimlmError
from slimlm.search.artifact import renumber
from slimlm.search.database import Database
from slimlm.search.rerank import Configuration


def require_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SlimlmError(
            "--min-decode-tps and --max-ram are measured in llama.cpp, which is not installed",
            "pip install -e '.[engines]' (compiles llama.cpp: ~20 min on 2 cores), or drop them to search on file size alone",
        ) from None


def cost_model_for(base, types: list[str], threads: int, cache: Path):
    """The cost model calibrated on this machine for `types` (cached beside the database: it takes minutes)."""
    from slimlm.evaluate.llama_cpp_costs import CostModel, measure_type_costs
    from slimlm.progress import stage

    ordered = ["q8_0", *sorted(t for t in types if t != "q8_0")]
    if cache.exists():
        model = CostModel.load(cache)
        if set(ordered) <= set(model.seconds_per_byte) and model.threads == threads and model.method == "side-by-side":
            return model  # one calibrated from separate runs priced the k-quants by the machine's drift: redone
    with stage(f"search: calibrating llama.cpp's decode costs for {', '.join(ordered)} ({threads} threads)"):
        model = measure_type_costs(base, ordered, threads=threads)
    model.save(cache)
    return model


@dataclass
class Pricer:
    """Predicted decode tokens/s and peak RSS of configurations, and whether they meet the constraints."""

    cost_model: object
    database: Database
    extra: dict[str, tuple[str, tuple[int, int]]]  # 2-D tensors the search does not choose: name -> (type, shape)
    min_decode_tps: float | None
    max_ram_bytes: int | None

    def tensor_types(self, configuration: Configuration) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
        types, shapes = {}, {}
        for knob, index in zip(self.database.space.knobs, configuration.choice):
            if knob.block in configuration.removed:
                continue
            name = renumber(knob.tensor, configuration.removed)
            types[name] = self.database.variants[knob.tensor][index].option.type
            shapes[name] = knob.shape
        for name, (type_, shape) in self.extra.items():
            if not (name.startswith("blk.") and int(name.split(".")[1]) in configuration.removed):
                types[renumber(name, configuration.removed)] = type_
                shapes[renumber(name, configuration.removed)] = shape
        return types, shapes

    def share(self, shape: tuple[int, int], type_: str) -> float:
        """What one tensor held as `type_` takes of the constraints' room: its predicted decode seconds per token
        over the seconds a token may take (1 / min_decode_tps), plus its predicted RSS over max_ram. The knapsack
        adds a multiple of it to the tensor's proxy KL (a Lagrangian relaxation of the speed and RAM limits)."""
        from slimlm.export.gguf_types import tensor_bytes

        held = tensor_bytes(type_, shape)
        total = 0.0
        if self.min_decode_tps is not None:
            total += held * self.cost_model.seconds_per_byte[type_] * self.min_decode_tps
        if self.max_ram_bytes is not None:
            total += held * self.cost_model.ram_per_byte[type_] / self.max_ram_bytes
        return total

    def predict(self, configuration: Configuration) -> dict:
        types, shapes = self.tensor_types(configuration)
        return {
            "decode_tokens_per_s": self.cost_model.predict_decode_tps(types, shapes),
            "peak_rss_bytes": self.cost_model.predict_ram_bytes(types, shapes),
        }

    def fits(self, configuration: Configuration) -> bool:
        predicted = self.predict(configuration)
        if self.min_decode_tps is not None and predicted["decode_tokens_per_s"] < self.min_decode_tps:
            return False
        return self.max_ram_bytes is None or predicted["peak_rss_bytes"] <= self.max_ram_bytes

    def check_written(self, path: Path, threads: int) -> dict:
        """Measure the written file in llama.cpp; refuse it when a constraint is not met."""
        measured = self.cost_model.check_file(path)
        problems = []
        if self.min_decode_tps is not None and measured["measured_decode_tokens_per_s"] < self.min_decode_tps:
            problems.append(
                f"decodes at {measured['measured_decode_tokens_per_s']:.1f} tok/s measured ({threads} threads), below --min-decode-tps {self.min_decode_tps:g} "
                f"(the cost model predicted {measured['predicted_decode_tokens_per_s']:.1f})"
            )
        if self.max_ram_bytes is not None and measured["measured_ram_bytes"] > self.max_ram_bytes:
            problems.append(
                f"peaks at {measured['measured_ram_bytes'] / 1e6:.1f} MB RSS measured, above --max-ram {self.max_ram_bytes / 1e6:.1f} MB"
            )
        measured["problems"] = problems
        return measured


def describe(measured: dict) -> str:
    return json.dumps({k: v for k, v in measured.items() if k != "problems"})


PROMPT_TOKENS, TIMED_TOKENS = 512, 64  # each point's timing: the cost model's context, half its decode (a dozen files)


def measure_points_decode(
    points: list,
    chosen,
    chosen_path: Path,
    write: Callable[[Configuration, Path], None],
    canonical: Callable[[Configuration], Configuration],
    threads: int,
    rounds: int,
) -> str:
    """Every point's decode tok/s in llama.cpp (`metrics["decode_tps"]`), all files measured side by side in one
    process (`llama_cpp_decode_rounds`: one file alone drifts by ~10% within minutes here, the ratios hold), so the
    report's quality-against-speed plot is drawn from measurements, not from the cost model. Points holding the
    same bytes share one file. Returns the protocol, for the report."""
    from slimlm.evaluate.llama_cpp import llama_cpp_decode_rounds
    from slimlm.progress import stage

    measured = [(p, canonical(p.configuration)) for p in points if p.configuration is not None]
    distinct = {key: p.configuration for p, key in measured}  # one configuration per file
    chosen_key = canonical(chosen.configuration)
    others = [key for key in distinct if key != chosen_key]
    with tempfile.TemporaryDirectory(prefix="slimlm-speed-") as scratch:
        files = {chosen_key: chosen_path} | {key: Path(scratch) / f"{i}.gguf" for i, key in enumerate(others)}
        with stage(f"search: writing {len(others)} more files to time"):
            for key in others:
                write(distinct[key], files[key])
        paths = list(files.values())
        rates = llama_cpp_decode_rounds(
            paths, threads=threads, prompt_tokens=PROMPT_TOKENS, new_tokens=TIMED_TOKENS, rounds=rounds, progress=True
        )
    by_path = {Path(r.path): r.decode_tokens_per_s for r in rates}
    for point, key in measured:
        point.metrics["decode_tps"] = by_path[files[key]]
    return (
        f"decode tok/s in llama.cpp, {threads} threads, {TIMED_TOKENS} new tokens after a {PROMPT_TOKENS}-token prompt, "
        f"{len(paths)} files side by side, median of {rounds} round{'s' if rounds > 1 else ''} after a warm-up"
    )
