"""Start-up time of the command line: `slimlm --help`, `slimlm recipes` and `slimlm recipes --json`, each in a fresh
process (median of --repeat runs), and whether the process imported torch.

    python benchmarks/startup.py --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {"--help": ["--help"], "recipes": ["recipes"], "recipes --json": ["recipes", "--json"]}
TORCH_PROBE = "import sys, runpy; sys.argv = ['slimlm'] + sys.argv[1:]\ntry:\n    runpy.run_module('slimlm.cli', run_name='__main__')\nexcept SystemExit:\n    pass\nsys.stderr.write('torch imported: %s\\n' % ('torch' in sys.modules))"


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "slimlm.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    repeat = parser.parse_args().repeat
    for name, args in COMMANDS.items():
        times = [seconds(args) for _ in range(repeat)]
        probe = subprocess.run([sys.executable, "-c", TORCH_PROBE, *args], capture_output=True, text=True)
        imported = probe.stderr.strip().splitlines()[-1]
        print(
            f"slimlm {name:15s} median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}, n={repeat}) · {imported}"
        )


if __name__ == "__main__":
    main()
