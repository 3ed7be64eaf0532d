"""The API's typed settings and their defaults, declared once: `slimlm.api` takes them, `slimlm.cli` derives its
options' defaults from them. Torch-free, so the CLI can build its help without importing torch.

Each settings class checks itself when built and refuses a bad value with a `SettingError` that names the field;
the CLI names the flag the user typed instead (`SettingError.for_flag`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.evaluate.speed import SpeedSettings
    from slimlm.quantize.kv_cache import KVCacheConfig

DEFAULT_MODEL = "smollm2-135m"
# The main job's rows: slimlm's best calibrated recipe of each kind that fits ~10 minutes on 2 CPU cores with
# RUN_CALIBRATION, and what each row is for (shown in the report).
DEFAULT_RUN_RECIPES = {
    "awq-gptq-w4-g64": "smallest at near-base quality: 4-bit weights, AWQ scales then GPTQ rounding",
    "smoothquant-w8a8": "near-lossless 8-bit weights and activations (int8 matmuls), SmoothQuant-balanced",
    "sparsegpt-50": "pruning: half the weights zeroed by SparseGPT's second-order update",
    "rtn-w4-g64": "the same 4-bit format with no calibration: what AWQ + GPTQ buy over plain rounding",
}
DEFAULT_SENSITIVITY_STAGE = {"method": "rtn", "bits": 4, "group_size": 64}


class SettingError(SlimlmError):
    """A setting outside what it allows; keeps which field of which settings class, so a caller can name it as the
    user wrote it (a CLI flag)."""

    def __init__(self, owner: str, field: str, value: object, requirement: str, example: str):
        self.owner, self.field, self.value, self.requirement, self.example = owner, field, value, requirement, example
        super().__init__(f"{owner}.{field} is {value!r}: {requirement}", f"pass {field}={example}")

    def for_flag(self, flag: str) -> SlimlmError:
        """The same error, naming the command-line flag that set the field."""
        return SlimlmError(f"{flag} {self.value!r}: {self.requirement}", f"pass e.g. {flag} {self.example}")


def _at_least(settings: object, name: str, low: int, example: str, optional: bool = False) -> None:
    value = getattr(settings, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < low:
        raise SettingError(type(settings).__name__, name, value, f"must be at least {low}", example)


@dataclass(frozen=True)
class EvalSettings:
    """What quality is measured on. Defaults: every 2048-token window of the offline default corpus."""

    data: str = "default"  # "default", a .txt/.jsonl file, "wikitext2:DIR" or "hf:NAME[:CONFIG]"
    split: str = "evaluation"
    seqlen: int = 2048
    max_windows: int | None = None  # None: every window of the text
    kl_windows: int = 4  # windows of base log-probs kept for KL/top-1 (top-4096 per position: 64 MB per 2048 tokens)
    kv_cache: KVCacheConfig | None = None  # `evaluate` only: through this quantized KV cache, not the model's own
    chunk_size: int | None = None  # `evaluate` only: tokens per forward through a KV cache; None: one forward per
    # window (128 with a KV cache)
    perplexity: bool = True  # `evaluate` only: False skips perplexity (e.g. when only zero-shot tasks are wanted)
    tasks: tuple[str, ...] = ()  # zero-shot tasks ("hellaswag", "piqa:PATH", ...; see slimlm.evaluate.tasks.TASKS)
    task_limit: int | None = None  # examples per task, a seeded subset; None: all
    task_seed: int = 0
    task_data: str | None = None  # folder holding the tasks' files (default: $SLIMLM_DATA or a shared/data nearby)
    speed: SpeedSettings | None = None  # latency / throughput / memory / energy; None: not measured

    def __post_init__(self) -> None:
        _at_least(self, "seqlen", 2, "2048 (GPTQ's window)")
        _at_least(self, "max_windows", 1, "8, or none for every window", optional=True)
        _at_least(self, "kl_windows", 0, "4")
        _at_least(self, "chunk_size", 1, "128", optional=True)
        _at_least(self, "task_limit", 1, "500, or none for all", optional=True)


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration windows drawn for stages that need statistics (GPTQ's protocol: 128 × 2048 tokens)."""

    data: str = "default"  # same forms as EvalSettings.data; read with the "calibration" split
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        _at_least(self, "samples", 1, "128 (GPTQ's count; fewer is faster on CPU)")
        _at_least(self, "seqlen", 2, "2048 (GPTQ's window)")


# The defaults each verb starts from (the CLI shows and uses the same ones).
COMPRESS_EVALUATION = EvalSettings(max_windows=8)  # a quick before/after check
FAST_EVALUATION = EvalSettings(seqlen=512, max_windows=4, kl_windows=2)  # `slimlm run --fast`
SENSITIVITY_EVALUATION = EvalSettings(seqlen=512, max_windows=2)
SENSITIVITY_CALIBRATION = CalibrationSettings(samples=16, seqlen=512)
RUN_CALIBRATION = CalibrationSettings(samples=32, seqlen=512)  # 16k tokens: the main job's calibrated rows fit its time


# --- search ------------------------------------------------------------------------------------------------------

SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str, flag: str) -> int:
    """'92MB' (decimal, as file managers and llama.cpp's tables count), '87.5MiB', '96000000' -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in SIZE_UNITS:
        raise SlimlmError(
            f"{flag} {text!r} is not a size",
            f"pass e.g. {flag} 92MB (units: {', '.join(u.upper() for u in SIZE_UNITS)})",
        )
    return int(float(match.group(1)) * SIZE_UNITS[unit])


@dataclass(frozen=True)
class Constraints:
    """What the user's device allows; any subset. Sizes are file bytes, RAM the engine's peak resident memory."""

    max_size: str | None = None  # "92MB", or a preset name ("q4_0"): the size of that llama.cpp preset for this model
    max_ram: str | None = None
    min_decode_tps: float | None = None  # measured in llama.cpp with `threads` threads
    threads: int = 2
    max_kl: float | None = None  # mean KL to the base on the held-out calibration windows, nats per token

    def __post_init__(self) -> None:
        _at_least(self, "threads", 1, "2")
        _at_least(self, "min_decode_tps", 0, "100", optional=True)
        _at_least(self, "max_kl", 0, "0.05", optional=True)


@dataclass(frozen=True)
class SearchSettings:
    """How hard the search looks. Defaults fit the main job (~10 minutes for SmolLM2-135M on 2 CPU cores)."""

    target: str = "gguf"
    methods: tuple[str, ...] = ("gptq", "ref")  # add "rtn" for importance-weighted rounding (slower)
    # Block-linear types searched (None: every type slimlm writes, Q2_K/Q3_K included). Q4_1 stays in: a model
    # shipped as Q4_1 (the embedded SmolLM2 is) gets its own codes back from Q4_1's reference rounding, losslessly.
    # Q2_K/Q3_K: below Q4_0's size they replace removed blocks (SmolLM2 at 75 MB, --fast: KL 0.374 -> 0.159).
    # F16: the one type whose input llama.cpp does not round to 8 bits, where spare bytes buy most there.
    types: tuple[str, ...] | None = (
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q8_0",
        "f16",
        "q2_k",
        "q3_k",
        "q4_k",
        "q5_k",
        "q6_k",
    )
    statistics: CalibrationSettings = CalibrationSettings(samples=8, seqlen=512)  # Hessians, Fishers, GPTQ
    rerank_windows: int = 4  # held-out calibration windows that score whole configurations (the first: the quick stage)
    generations: int = 12  # re-ranking generations at the chosen budget (0: the knapsack's answer as it is)
    # at each other budget of the front, the best seed as it is: on SmolLM2 (llama.cpp's input rounding modelled) one
    # generation at each of the main job's 7 front budgets changed no point's KL in its 4th digit and took 3.5 minutes
    front_generations: int = 0
    patience: int = 4  # re-ranking stops after this many generations in a row without a 1% better child
    offspring: int = 8
    survivors: int = 2
    depth_candidates: int = 3  # blocks that may be removed whole (those whose removal costs least KL)
    # rounds of every point's decode timed side by side in llama.cpp, for the quality-against-speed plot (0: not
    # timed); each round, and a warm-up, decodes 64 tokens from each distinct file (~0.7 s apiece for SmolLM2 here)
    speed_rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (
            ("rerank_windows", 1),
            ("generations", 0),
            ("front_generations", 0),
            ("patience", 1),
            ("offspring", 1),
            ("survivors", 1),
            ("depth_candidates", 0),
            ("speed_rounds", 0),
        ):
            _at_least(self, name, low, "4")


# Types of `slimlm search --target compressed-tensors` (slimlm.search.compressed_tensors); "-asym" types only when asked.
CT_SEARCH_TYPES = ("int4-g32", "int4-g64", "int4-g128", "int8-g128", "int8-channel", "dense")
FAST_CT_SEARCH_TYPES = ("int4-g32", "int4-g64", "int8-channel", "dense")
DEFAULT_SEARCH = SearchSettings()
# `--fast`: one 5-bit type, F16 (what spare bytes buy above Q4_1's size: without it the embedded model's front
# stopped at its own Q4_1 codes up to 111.6 MB), GPTQ on fewer windows, no re-ranking generations (the seeds scored
# by true KL, the best kept: on SmolLM2 the one generation --fast ran left the KL at 0.0082 and took 19 s), a third
# of the held-out tokens
FAST_SEARCH = SearchSettings(
    types=("q4_0", "q4_1", "q5_1", "q8_0", "f16"),
    statistics=CalibrationSettings(samples=4, seqlen=512),
    rerank_windows=2,
    generations=0,
    front_generations=0,
    offspring=6,
    depth_candidates=2,
    speed_rounds=0,  # one round of 8 files took 36 s, a fifth of the job
)
SEARCH_EVALUATION = EvalSettings(seqlen=512, max_windows=6, kl_windows=6)  # held-out figures of every front point
FAST_SEARCH_EVALUATION = EvalSettings(seqlen=512, max_windows=2, kl_windows=2)
DEFAULT_CONSTRAINTS = Constraints(max_size="q4_0")  # the main job: the best model at the size of llama.cpp's Q4_0


def cache_root() -> Path:
    """$SLIMLM_CACHE (default ~/.cache/slimlm): the search databases and the embedded model's dense copy."""
    import os

    return Path(os.environ.get("SLIMLM_CACHE", "~/.cache/slimlm")).expanduser()
