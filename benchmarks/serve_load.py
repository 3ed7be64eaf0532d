"""`slimlm serve` under load, as a user runs it: the real command in its own process, the real `openai` client.

    python benchmarks/serve_load.py --model smol-q8_0.gguf [--clients 16] [--seconds 60] [--max-tokens 16]

1. Expected answers: each of --clients prompts (own question, own seed, temperature 0.8) asked once, alone.
2. Load: --clients threads stream their prompt over and over for --seconds; every streamed answer must equal its
   expected answer (same prompt and seed => same text: a mixed-up stream shows), every request must succeed.
   The server's RSS is sampled every 0.5 s (bounded memory: the peak stays near the idle figure).
3. Streaming overhead: for single streamed requests, the client's span from first to last token against the
   decode time the server measured inside its worker (`timings.predicted_ms`); the difference per token is what
   HTTP + SSE add.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Name a colour.",
    "Say hello.",
    "What is 2 + 2?",
    "Name an animal.",
    "What is rain?",
    "Who wrote Hamlet?",
    "Name a fruit.",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--engine", default="auto")
    args = parser.parse_args()

    import openai
    import psutil

    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}:{os.environ.get('PYTHONPATH', '')}", "SLIMLM_QUIET": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "slimlm.cli", "serve", args.model, "--port", str(port), "--engine", args.engine],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        process = psutil.Process(server.pid)
        idle_rss = process.memory_info().rss / 2**20

        def request(index: int) -> dict:
            return dict(
                model="m",
                messages=[{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
                max_tokens=args.max_tokens,
                temperature=0.8,
                seed=index,
            )

        expected = [
            client.chat.completions.create(**request(i)).choices[0].message.content for i in range(args.clients)
        ]

        # streaming overhead, one request at a time
        overheads, client_rates = [], []
        for i in range(4):
            stamps, timings = [], None
            for chunk in client.chat.completions.create(
                **{**request(i), "max_tokens": 64, "temperature": 0}, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                if getattr(chunk, "timings", None):
                    timings = chunk.timings
            if len(stamps) > 2 and timings and timings["predicted_n"] > 1:
                client_span = stamps[-1] - stamps[0]
                overheads.append((client_span - timings["predicted_ms"] / 1000) / (timings["predicted_n"] - 1) * 1000)
                client_rates.append((len(stamps) - 1) / client_span)

        counts = {"requests": 0, "errors": 0, "mismatches": 0, "tokens": 0}
        lock, stop_at = threading.Lock(), time.monotonic() + args.seconds
        peak = [idle_rss]

        def sample_memory() -> None:
            while time.monotonic() < stop_at:
                peak[0] = max(peak[0], process.memory_info().rss / 2**20)
                time.sleep(0.5)

        def hammer(index: int) -> None:
            own = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
            while time.monotonic() < stop_at:
                try:
                    pieces = [
                        c.choices[0].delta.content or ""
                        for c in own.chat.completions.create(**request(index), stream=True)
                        if c.choices
                    ]
                    with lock:
                        counts["requests"] += 1
                        counts["tokens"] += len([p for p in pieces if p])
                        counts["mismatches"] += "".join(pieces) != expected[index]
                except openai.OpenAIError:
                    with lock:
                        counts["errors"] += 1

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(args.clients)] + [
            threading.Thread(target=sample_memory)
        ]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.monotonic() - start
        print(f"model {args.model} · load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            f"{args.clients} streaming clients for {wall:.0f} s: {counts['requests']} answers, {counts['errors']} errors, {counts['mismatches']} differing from the answer alone, {counts['tokens'] / wall:.1f} streamed pieces/s overall"
        )
        print(f"server RSS: idle {idle_rss:.0f} MiB, peak under load {peak[0]:.0f} MiB")
        if overheads:
            print(
                f"streaming overhead (client span − server decode time, per token): median {statistics.median(overheads):.2f} ms over {len(overheads)} answers; client-side {statistics.median(client_rates):.1f} tok/s"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
