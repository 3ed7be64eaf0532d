"""Loading the embedded GGUF: transformers' GGUF loader against slimlm's `load_model` with an empty cache (its own
one-parse reader, transformers' tokenizer, the dense copy written) and with the dense copy cached. Each in a fresh
process, the three alternated --repeat times.

    python benchmarks/gguf_load.py --repeat 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

TRANSFORMERS = """
import time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from slimlm.models.load import quiet_transformers, resolve_alias
path = resolve_alias("smollm2-135m")
start = time.perf_counter()
with quiet_transformers():
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
print(time.perf_counter() - start)
"""
SLIMLM = """
import time
from slimlm.models.load import load_model
start = time.perf_counter()
load_model("smollm2-135m", device="cpu")
print(time.perf_counter() - start)
"""


def seconds(code: str, cache: str) -> float:
    env = {**os.environ, "SLIMLM_CACHE": cache}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rows: dict[str, list[float]] = {"transformers' GGUF loader": [], "load_model, cold": [], "load_model, warm": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            rows["transformers' GGUF loader"].append(seconds(TRANSFORMERS, cache))
            rows["load_model, cold"].append(seconds(SLIMLM, cache))
            rows["load_model, warm"].append(seconds(SLIMLM, cache))
    for name, times in rows.items():
        print(f"{name:28s} {', '.join(f'{t:.1f} s' for t in times)}")


if __name__ == "__main__":
    main()
