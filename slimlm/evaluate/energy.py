"""Energy meters read from hardware counters, or an honest "unavailable" (never an estimate).

- NVIDIA GPUs: NVML's total energy counter (`nvmlDeviceGetTotalEnergyConsumption`, millijoules since the driver
  loaded; Volta and newer), through the `nvidia-ml-py` package when installed.
- CPUs on Linux: powercap / RAPL package counters, `/sys/class/powercap/intel-rapl:N/energy_uj` (microjoules,
  wrapping at `max_energy_range_uj`), summed over packages. Usually readable by root only. They count the whole
  package: other processes' work is included, which the meter's description says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

POWERCAP = Path("/sys/class/powercap")


@dataclass(eq=False)
class EnergyMeter:
    """A cumulative counter in joules; `read()` handles counter wrap-around."""

    name: str  # what is measured, e.g. "NVML GPU 0 (NVIDIA H100)" or "RAPL package-0 (whole CPU package)"
    _read: Callable[[], float]

    def read(self) -> float:
        return self._read()


def energy_meter(device: torch.device) -> tuple[EnergyMeter | None, str]:
    """The meter for `device`, or None and why there is none."""
    if device.type == "cuda":
        return _nvml_meter(device)
    return _rapl_meter()


def _nvml_meter(device: torch.device) -> tuple[EnergyMeter | None, str]:
    try:
        import pynvml  # the `nvidia-ml-py` package
    except ImportError:
        return None, "unavailable: NVML energy needs the nvidia-ml-py package (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises NotSupported on pre-Volta GPUs
    except pynvml.NVMLError as err:
        return None, f"unavailable: NVML has no energy counter here ({err})"
    name = name.decode() if isinstance(name, bytes) else name
    return EnergyMeter(
        f"NVML GPU {index} ({name}), whole GPU", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
    ), "NVML"


def _rapl_meter() -> tuple[EnergyMeter | None, str]:
    zones = sorted(p for p in POWERCAP.glob("intel-rapl:*") if p.name.count(":") == 1)  # packages, not their subzones
    if not zones:
        return None, "unavailable: no powercap/RAPL counters on this machine (/sys/class/powercap/intel-rapl:*)"
    counters, labels = [], []
    for zone in zones:
        try:
            value = int((zone / "energy_uj").read_text())
            wrap = int((zone / "max_energy_range_uj").read_text())
            labels.append((zone / "name").read_text().strip())
        except (OSError, ValueError) as err:
            return (
                None,
                f"unavailable: {zone / 'energy_uj'} is not readable ({err.__class__.__name__}; RAPL usually needs root)",
            )
        counters.append(_WrappingCounter(zone / "energy_uj", wrap, value))
    return EnergyMeter(
        f"RAPL {', '.join(labels)} (whole CPU package, other processes included)",
        lambda: sum(c.joules() for c in counters),
    ), "RAPL"


class _WrappingCounter:
    """A microjoule counter that wraps at `wrap`; `joules()` is the energy since it was created."""

    def __init__(self, path: Path, wrap: int, start: int):
        self.path, self.wrap, self.last, self.total = path, wrap, start, 0

    def joules(self) -> float:
        value = int(self.path.read_text())
        self.total += (value - self.last) % (self.wrap + 1)  # one wrap at most between reads
        self.last = value
        return self.total / 1e6
