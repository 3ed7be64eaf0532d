"""Quality and speed of a GGUF measured inside llama.cpp (llama-cpp-python, `pip install -e '.[engines]'`).

Quality: llama.cpp computes the logits of every position of exactly the token ids of an `EvalWindows` (the GPTQ
protocol of `slimlm.evaluate.perplexity`: each window alone, from an empty KV cache, no BOS added beyond what the
windows hold), and slimlm's own `QualityTally` turns them into perplexity, KL(reference || model) and top-1
agreement, so a row measured in llama.cpp and a row measured in transformers are directly comparable. The
reference can come from a Hugging Face model (`evaluate_quality(..., keep_reference=k)`) or from another GGUF
(`llama_cpp_quality(..., keep_reference=k)`).

Speed, measured like gpt-fast: a random prompt (content does not change the cost) decoded from an empty cache,
then `new_tokens` greedy tokens one `llama_decode` each; one warm-up round (pages the weights in, warms caches),
then the median of `repeats`. Prefill tok/s = prompt tokens / prompt time; decode tok/s = new tokens / decode time.
Several files side by side (`llama_cpp_decode_rounds`): one child holds them all and decodes each in turn, round
after round. On a shared machine one file's decode rate drifts by ~10% from one minute to the next, while the ratio
of two files measured in alternation stays within ~2%: compare files this way, not by separate runs.

Every measurement runs in a child process (`python -m slimlm.evaluate.llama_cpp REQUEST`): a crash inside
llama.cpp becomes a one-line error instead of killing the caller, the peak RSS is the child's own (llama.cpp, its
mmap'd weights, the KV cache and compute buffers, plus a bare Python: the speed child imports no torch), and the
parent's threads do not disturb the timings. The child calls llama.cpp's C API directly (not `llama_cpp.Llama`),
so nothing but `llama_decode` and an argmax sits in the decode loop.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slimlm.errors import SlimlmError

if TYPE_CHECKING:
    from slimlm.evaluate.perplexity import EvalWindows, QualityResult, ReferenceLogits

INSTALL_FIX = "pip install -e '.[engines]' (compiles llama.cpp: ~20 min on 2 cores)"
QUALITY_BATCH = 512  # positions per llama_decode call when scoring: bounds llama.cpp's logits buffer (V floats each)
SPEED_SEED = 0
ROUND_DONE = "slimlm: round done"  # the rounds child's progress line
GGML_LOG_WARN, GGML_LOG_CONT = 3, 5  # ggml.h enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT


def require_llama_cpp():
    """The `llama_cpp` module (llama-cpp-python), or a one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise SlimlmError("llama.cpp is not installed", INSTALL_FIX) from None
    return llama_cpp


@dataclass(frozen=True)
class LlamaCppSpeed:
    prefill_tokens_per_s: float  # prompt tokens / median prompt time, batch 1, from an empty KV cache
    decode_tokens_per_s: float  # new tokens / median decode time, batch 1, after the prompt
    decode_tokens_per_s_p10: float  # 1 / the 10th percentile of single-token latencies: near what an idle machine
    # gives when other processes preempt this one now and then (a shared box), where the median is not
    decode_cpu_tokens_per_s: float  # threads x new tokens / median CPU seconds of the decode (all threads): the rate
    # the work alone allows at perfect scaling; load-proof when threads sleep while waiting (OMP_WAIT_POLICY=passive)
    peak_rss_bytes: int  # the child's high-water RSS: llama.cpp, touched weight pages, KV cache, buffers, Python
    file_bytes: int
    threads: int
    llama_cpp: str  # llama-cpp-python's version and llama.cpp's CPU feature line
    prompt_tokens: int
    new_tokens: int
    repeats: int
    load: str  # the machine's load averages (1, 5, 15 min) when the measurement started: timings depend on it


def load_average() -> str:
    """'1.23 0.80 0.50' (1, 5, 15 minutes), or 'unknown': every speed figure is labelled with it."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def llama_cpp_quality(
    path: str | Path,
    windows: EvalWindows,
    reference: ReferenceLogits | None = None,
    keep_reference: int = 0,
    threads: int | None = None,
) -> tuple[QualityResult, ReferenceLogits | None]:
    """Perplexity of the GGUF at `path` in llama.cpp on `windows`, and with `reference` the KL(reference || model)
    and top-1 agreement; `keep_reference=k` also returns this file's top-k log-probs of the first k windows (the
    reference for other files). Same arguments and figures as `evaluate_quality`; `threads` default: every core."""
    import torch

    from slimlm.evaluate.perplexity import KL_TOP_K, QualityResult, QualityTally, ReferenceLogits

    path = check_gguf(path)
    QualityTally(windows, reference, keep_reference)  # refuse mismatched windows before starting llama.cpp
    threads = threads or available_cores()
    with tempfile.TemporaryDirectory(prefix="slimlm-llama-") as scratch:
        scratch = Path(scratch)
        torch.save(
            {
                "windows": vars(windows),  # dataclass fields: tensors, strings, ints (weights_only loads them)
                "reference": None if reference is None else vars(reference),
                "keep_reference": keep_reference,
                "top_k": KL_TOP_K,
            },
            scratch / "windows.pt",
        )
        answer = _run_child({"kind": "quality", "path": str(path), "threads": threads}, scratch)
        result = QualityResult(**answer["result"])
        kept = None
        if keep_reference:
            kept = ReferenceLogits(**torch.load(scratch / "kept.pt", weights_only=True))
    return result, kept


def llama_cpp_speed(
    path: str | Path, threads: int = 2, prompt_tokens: int = 512, new_tokens: int = 128, repeats: int = 3
) -> LlamaCppSpeed:
    """Prefill and decode tokens/s of the GGUF at `path` in llama.cpp with `threads` threads (median of `repeats`
    after a warm-up), and the peak RSS of the process that ran it."""
    for name, value in (
        ("threads", threads),
        ("prompt_tokens", prompt_tokens),
        ("new_tokens", new_tokens),
        ("repeats", repeats),
    ):
        if value < 1:
            raise SlimlmError(f"{name} must be at least 1, got {value}", f"pass a positive {name}")
    path = check_gguf(path)
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="slimlm-llama-") as scratch:
        request = {
            "kind": "speed",
            "path": str(path),
            "threads": threads,
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "repeats": repeats,
        }
        answer = _run_child(request, Path(scratch))
    return LlamaCppSpeed(
        **answer["result"],
        file_bytes=path.stat().st_size,
        threads=threads,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        load=load,
    )


@dataclass(frozen=True)
class DecodeRounds:
    """One file's decode rate from `llama_cpp_decode_rounds`."""

    path: str
    decode_tokens_per_s: float  # new tokens / the median round's decode time
    decode_tokens_per_s_p10: float  # 1 / the 10th percentile of single-token latencies over all rounds
    decode_cpu_tokens_per_s: float  # threads x new tokens / the median round's CPU seconds
    rounds: list[float]  # each round's decode tok/s, in the order measured


MEMORY_PER_FILE_BYTE = 3  # peak RSS per byte of GGUF a loaded model can take (Q4_0 repacked for SIMD: ~2.3)


def llama_cpp_decode_rounds(
    paths: list[str | Path],
    threads: int = 2,
    prompt_tokens: int = 512,
    new_tokens: int = 128,
    rounds: int = 10,
    progress: bool = False,
) -> list[DecodeRounds]:
    """Decode tok/s of several GGUFs measured side by side, in the order of `paths`. Each file gets the same random
    prompt once, then `new_tokens` greedy tokens after it in every round, each file once per round (alternate
    rounds in reverse order, so a drift within a round evens out), after one warm-up round. Files that do not fit in
    half the free memory at once are measured in groups, each with the first file in it; a group's rates are scaled
    by the first file's rate in the first group over its rate in that group."""
    from slimlm.progress import progress_bar

    if rounds < 1 or new_tokens < 1 or prompt_tokens < 1 or threads < 1:
        raise SlimlmError(
            f"rounds, new_tokens, prompt_tokens and threads must be at least 1, got {rounds}, {new_tokens}, "
            f"{prompt_tokens}, {threads}",
            "pass positive counts",
        )
    checked = [check_gguf(path) for path in paths]
    if not checked:
        return []
    groups = _memory_groups(checked)
    measured: dict[str, DecodeRounds] = {}
    anchor_rate = None
    with progress_bar("decode side by side", rounds * len(groups), unit="rounds", show=progress) as advance:
        for group in groups:
            request = {
                "kind": "rounds",
                "paths": [str(path) for path in group],
                "path": str(group[0]),
                "threads": threads,
                "prompt_tokens": prompt_tokens,
                "new_tokens": new_tokens,
                "rounds": rounds,
            }
            with tempfile.TemporaryDirectory(prefix="slimlm-llama-") as scratch:
                answer = _run_child(request, Path(scratch), on_round=advance)
            results = [DecodeRounds(**row) for row in answer["result"]]
            anchor_rate = anchor_rate or results[0].decode_tokens_per_s
            scale = anchor_rate / results[0].decode_tokens_per_s
            for row in results:
                measured.setdefault(row.path, _scaled(row, scale))
    return [measured[str(path)] for path in checked]


def _scaled(row: DecodeRounds, scale: float) -> DecodeRounds:
    return DecodeRounds(
        row.path,
        row.decode_tokens_per_s * scale,
        row.decode_tokens_per_s_p10 * scale,
        row.decode_cpu_tokens_per_s * scale,
        [rate * scale for rate in row.rounds],
    )


def _memory_groups(paths: list[Path]) -> list[list[Path]]:
    """The paths in groups that fit in half the free memory at once; every group starts with paths[0]."""
    import torch

    from slimlm.calibration.sequential import free_memory

    budget = (free_memory(torch.device("cpu")) or 4 << 30) / 2  # 4 GiB where the host does not say
    groups: list[list[Path]] = [[paths[0]]]
    held = MEMORY_PER_FILE_BYTE * paths[0].stat().st_size
    for path in paths[1:]:
        need = MEMORY_PER_FILE_BYTE * path.stat().st_size
        if len(groups[-1]) > 1 and held + need > budget:
            groups.append([paths[0]])
            held = MEMORY_PER_FILE_BYTE * paths[0].stat().st_size
        groups[-1].append(path)
        held += need
    return groups


# --- the parent's side ------------------------------------------------------------------------------------------


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_gguf(path: str | Path) -> Path:
    """The path, checked to be a well-formed GGUF file, with llama.cpp installed; else a one-line error."""
    from slimlm.models.gguf_check import check_gguf_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise SlimlmError(f"'{path}' is not a file", "pass the path of a .gguf file to run in llama.cpp")
    check_gguf_file(path)  # not a GGUF, truncated, malformed: named before llama.cpp parses it
    require_llama_cpp()
    return path


def gguf_architecture(path: Path) -> str:
    from slimlm.models.gguf_check import check_gguf_file

    return str(check_gguf_file(path).get("general.architecture", "unknown"))


def _run_child(request: dict, scratch: Path, on_round=None) -> dict:
    """Run one request in `python -m slimlm.evaluate.llama_cpp`; its answer, or a one-line error. The child prints
    ROUND_DONE after each round of a "rounds" request; `on_round` is called for each."""
    (scratch / "request.json").write_text(json.dumps(request))
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this very slimlm
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(request["threads"]),
        "MKL_NUM_THREADS": str(request["threads"]),
    }
    output = []
    with subprocess.Popen(
        [sys.executable, "-m", "slimlm.evaluate.llama_cpp", str(scratch)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as done:
        for line in done.stdout:
            if line.strip() == ROUND_DONE:
                if on_round is not None:
                    on_round()
            else:
                output.append(line)
    answer_file = scratch / "answer.json"
    answer = json.loads(answer_file.read_text()) if answer_file.exists() else None
    path = request["path"]
    if answer is not None and "problem" in answer:
        problem = answer["problem"]
        if answer.get("load_failed"):
            arch = gguf_architecture(Path(path))
            problem = f"llama.cpp could not load '{path}' (architecture '{arch}'): {problem}"
            answer["fix"] = (
                "llama.cpp runs only the architectures and tensor types its build knows: run this file with "
                "--engine transformers, or update llama-cpp-python"
            )
        raise SlimlmError(problem, answer.get("fix"))
    if done.returncode != 0 or answer is None:
        how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit status {done.returncode}"
        tail = ("".join(output).strip().splitlines() or ["no output"])[-1][:200]
        raise SlimlmError(
            f"llama.cpp crashed ({how}) running '{path}': {tail}",
            "the file may use a layout this llama.cpp build mishandles; try another --gguf-type, or --engine transformers",
        )
    return answer


# --- the child's side: llama.cpp's C API through llama-cpp-python's ctypes bindings --------------------------------


class _Engine:
    """One model and one context in llama.cpp, CPU only; `decode` feeds tokens at positions and returns logits."""

    def __init__(self, path: str, n_ctx: int, n_batch: int, threads: int):
        self.lib = lib = require_llama_cpp()
        self.errors: list[str] = []

        kept = [False]  # whether the last message was kept, for its continuation lines

        @lib.llama_log_callback
        def collect(level, text, user_data):  # keep llama.cpp's own warnings and errors for the message; print nothing
            if level == GGML_LOG_CONT:
                level = GGML_LOG_WARN if kept[0] else 0
            kept[0] = level >= GGML_LOG_WARN
            if kept[0] and text.strip():
                self.errors.append(text.decode("utf-8", "replace").strip())

        self._callback = collect  # held: ctypes must not free it while llama.cpp can call it
        lib.llama_log_set(collect, None)
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(path.encode(), model_params)
        if not self.model:
            raise _LoadError(" · ".join(self.errors)[:300] or "no reason given")
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, min(n_batch, 512)
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise _LoadError(" · ".join(self.errors)[:300] or f"could not create a context of {n_ctx} tokens")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch

    def clear(self) -> None:
        """Empty the KV cache: the next token is at position 0 of a new sequence."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens, start: int, all_logits: bool):
        """Feed `tokens` (at most n_batch) at positions start.., return their logits (n, V), or the last one's (1, V)."""
        import numpy as np

        batch, n = self.batch, len(tokens)
        batch.n_tokens = n
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == n - 1
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        rows = n if all_logits else 1
        pointer = self.lib.llama_get_logits(self.ctx) if all_logits else self.lib.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(rows, self.vocab))

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


class _LoadError(Exception):
    pass


def _quality_child(request: dict, scratch: Path) -> dict:
    import numpy as np
    import torch

    from slimlm.evaluate.perplexity import EvalWindows, QualityTally, ReferenceLogits

    torch.set_num_threads(request["threads"])
    saved = torch.load(scratch / "windows.pt", weights_only=True)
    windows = EvalWindows(**saved["windows"])
    reference = ReferenceLogits(**saved["reference"]) if saved["reference"] is not None else None
    tally = QualityTally(windows, reference, saved["keep_reference"], saved["top_k"])
    n, seqlen = windows.input_ids.shape
    engine = _Engine(request["path"], seqlen, min(seqlen, QUALITY_BATCH), request["threads"])
    lib = engine.lib
    if int(windows.input_ids.max()) >= engine.vocab:
        raise SlimlmError(
            f"the windows hold token id {int(windows.input_ids.max())}, beyond the GGUF's {engine.vocab}-token vocabulary",
            "tokenize with the tokenizer of the model the GGUF was made from",
        )
    logits = np.empty((seqlen, engine.vocab), dtype=np.float32)  # (L, V)
    for i in range(n):
        ids = windows.input_ids[i].tolist()
        engine.clear()
        for start in range(0, seqlen, engine.n_batch):
            part = ids[start : start + engine.n_batch]
            logits[start : start + len(part)] = engine.decode(part, start, all_logits=True)
        tally.add(i, torch.from_numpy(logits))
    version = f"llama-cpp-python {getattr(lib, '__version__', '?')}"
    threads = f"{request['threads']} thread" + ("s" if request["threads"] > 1 else "")
    result, kept = tally.result(f"logits from llama.cpp ({version}, {threads}), each window from an empty KV cache")
    engine.close()
    if kept is not None:
        torch.save(vars(kept), scratch / "kept.pt")
    return {"result": asdict(result)}


def _speed_child(request: dict) -> dict:
    import numpy as np

    prompt_tokens, new_tokens, repeats = request["prompt_tokens"], request["new_tokens"], request["repeats"]
    engine = _Engine(request["path"], prompt_tokens + new_tokens + 1, max(prompt_tokens, 1), request["threads"])
    lib = engine.lib
    prompt = np.random.default_rng(SPEED_SEED).integers(0, engine.vocab, prompt_tokens).tolist()
    prompt_times, decode_times, token_times, cpu_times = [], [], [], []
    for attempt in range(repeats + 1):  # the first round pages the weights in and warms the caches
        engine.clear()
        start = time.perf_counter()
        logits = engine.decode(prompt, 0, all_logits=False)
        token = int(logits[0].argmax())
        prompt_seconds = time.perf_counter() - start
        latencies, decode_seconds, decode_cpu = _timed_decode(engine, token, prompt_tokens, new_tokens)
        if attempt:
            prompt_times.append(prompt_seconds)
            token_times.extend(latencies)
            decode_times.append(decode_seconds)
            cpu_times.append(decode_cpu)
    info = lib.llama_print_system_info().decode("utf-8", "replace").strip()
    engine.close()
    return {
        "result": {
            "prefill_tokens_per_s": prompt_tokens / statistics.median(prompt_times),
            **_decode_rates(new_tokens, request["threads"], decode_times, token_times, cpu_times),
            "peak_rss_bytes": _peak_rss_bytes(),
            "llama_cpp": f"llama-cpp-python {getattr(lib, '__version__', '?')}; {info}" + _wait_policy(),
        }
    }


def _rounds_child(request: dict) -> dict:
    import numpy as np

    prompt_tokens, new_tokens, rounds = request["prompt_tokens"], request["new_tokens"], request["rounds"]
    engines = [
        _Engine(path, prompt_tokens + new_tokens + 1, prompt_tokens, request["threads"]) for path in request["paths"]
    ]
    lib = engines[0].lib
    firsts = []
    for engine in engines:  # every file's KV cache holds the same prompt; each round decodes after it
        prompt = np.random.default_rng(SPEED_SEED).integers(0, engine.vocab, prompt_tokens).tolist()
        engine.clear()
        firsts.append(int(engine.decode(prompt, 0, all_logits=False)[0].argmax()))
    seconds = [[] for _ in engines]
    cpu = [[] for _ in engines]
    tokens = [[] for _ in engines]
    for round_ in range(rounds + 1):  # round 0 pages the weights in and warms the caches
        order = range(len(engines)) if round_ % 2 else reversed(range(len(engines)))
        for i in order:
            engine, token = engines[i], firsts[i]
            lib.llama_memory_seq_rm(lib.llama_get_memory(engine.ctx), 0, prompt_tokens, -1)
            latencies, decode_seconds, decode_cpu = _timed_decode(engine, token, prompt_tokens, new_tokens)
            if round_:
                tokens[i].extend(latencies)
                seconds[i].append(decode_seconds)
                cpu[i].append(decode_cpu)
        if round_:
            print(ROUND_DONE, flush=True)
    for engine in engines:
        engine.close()
    return {
        "result": [
            {
                "path": path,
                **_decode_rates(new_tokens, request["threads"], seconds[i], tokens[i], cpu[i]),
                "rounds": [new_tokens / t for t in seconds[i]],
            }
            for i, path in enumerate(request["paths"])
        ]
    }


def _timed_decode(engine: _Engine, token: int, position: int, count: int) -> tuple[list[float], float, float]:
    """Greedy-decode `count` tokens after `token`, one llama_decode each from `position`: (each token's seconds,
    the wall seconds, the CPU seconds of all this process's threads)."""
    cpu_start = time.process_time()
    start = last = time.perf_counter()
    latencies = []
    for at in range(position, position + count):
        token = int(engine.decode([token], at, all_logits=False)[0].argmax())
        now = time.perf_counter()
        latencies.append(now - last)
        last = now
    return latencies, time.perf_counter() - start, time.process_time() - cpu_start


def _decode_rates(
    new_tokens: int, threads: int, seconds: list[float], latencies: list[float], cpu: list[float]
) -> dict[str, float]:
    """The decode figures of repeated runs of `new_tokens` tokens: from the median run's wall time, from the 10th
    percentile of single-token latencies, and from the median run's CPU time."""
    return {
        "decode_tokens_per_s": new_tokens / statistics.median(seconds),
        "decode_tokens_per_s_p10": 1 / statistics.quantiles(latencies, n=10)[0]
        if len(latencies) > 1
        else new_tokens / seconds[0],
        "decode_cpu_tokens_per_s": threads * new_tokens / max(statistics.median(cpu), 1e-9),
    }


def _wait_policy() -> str:
    """OpenMP's wait policy when set: on a machine busier than its cores, llama.cpp's spinning threads wait for
    each other a whole time slice per barrier (SmolLM2 at 2 threads under load 7 on 2 cores: 0.4 tok/s decode;
    13 tok/s with OMP_WAIT_POLICY=passive, 13 with 1 thread), so a figure says which policy it ran with."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"; OMP_WAIT_POLICY={policy}" if policy else ""


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def _child_main(scratch: Path) -> None:
    request = json.loads((scratch / "request.json").read_text())
    try:
        if request["kind"] == "quality":
            answer = _quality_child(request, scratch)
        elif request["kind"] == "speed":
            answer = _speed_child(request)
        else:
            answer = _rounds_child(request)
    except _LoadError as err:
        answer = {"problem": str(err), "load_failed": True}
    except SlimlmError as err:
        answer = {"problem": err.problem, "fix": err.fix}
    (scratch / "answer.json").write_text(json.dumps(answer))


if __name__ == "__main__":
    _child_main(Path(sys.argv[1]))
