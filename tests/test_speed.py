"""Speed measurement (TTFT, TPOT, throughput, peak memory) and energy meters: honest numbers or "unavailable"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from slimlm.errors import SlimlmError
from slimlm.evaluate import energy
from slimlm.evaluate.speed import SpeedSettings, measure_speed

SMALL = SpeedSettings(
    prompt_tokens=16, new_tokens=4, repeats=2, batch_sizes=(1, 3), throughput_prompt_tokens=8, throughput_new_tokens=3
)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_measure_speed_reports_every_figure_with_its_device(arch):
    model = tiny_model(arch).train()
    speed = measure_speed(model, SMALL)
    assert model.training  # put back in the mode it was in
    assert speed.device.startswith("cpu (") and "threads" in speed.device
    assert speed.ttft_ms > 0 and speed.tpot_ms > 0
    assert speed.decode_tokens_per_s == pytest.approx(1000 / speed.tpot_ms)
    assert speed.prefill_tokens_per_s == pytest.approx(16 / (speed.ttft_ms / 1000))
    assert set(speed.throughput_tokens_per_s) == {1, 3} and min(speed.throughput_tokens_per_s.values()) > 0
    assert speed.cpu_peak_rss_mb > 0 and speed.cuda_max_allocated_mb is None
    assert (speed.energy_joules_per_token is None) == speed.energy_meter.startswith("unavailable")


def test_speed_settings_refuse_nonsense():
    with pytest.raises(SlimlmError, match="repeats must be at least 1"):
        SpeedSettings(repeats=0)
    with pytest.raises(SlimlmError, match="batch sizes"):
        SpeedSettings(batch_sizes=(1, 0))


def _zone(root, name: str, energy_uj: int, wrap: int = 1000):
    zone = root / name
    zone.mkdir()
    (zone / "energy_uj").write_text(str(energy_uj))
    (zone / "max_energy_range_uj").write_text(str(wrap))
    (zone / "name").write_text(f"package-{name[-1]}")
    return zone


def test_rapl_meter_sums_packages_and_survives_wraparound(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)
    first = _zone(tmp_path, "intel-rapl:0", 900)
    _zone(tmp_path, "intel-rapl:1", 100)
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subzone (core) of package 0: not counted twice
    meter, note = energy.energy_meter(torch.device("cpu"))
    assert note == "RAPL" and "package-0, package-1" in meter.name and "other processes included" in meter.name
    assert meter.read() == 0.0
    (first / "energy_uj").write_text("50")  # wrapped: 900 -> 1000 (max) -> 0 -> 50 is 151 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("400")
    assert meter.read() == pytest.approx((151 + 300) / 1e6)


def test_meters_say_why_they_are_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "POWERCAP", tmp_path / "none")
    meter, note = energy.energy_meter(torch.device("cpu"))
    assert meter is None and note.startswith("unavailable: no powercap/RAPL")
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)
    (tmp_path / "intel-rapl:0").mkdir()  # a zone without a readable counter
    meter, note = energy.energy_meter(torch.device("cpu"))
    assert meter is None and "is not readable" in note
    meter, note = energy._nvml_meter(torch.device("cuda:0"))  # no nvidia-ml-py, or no NVIDIA GPU here
    assert meter is None and note.startswith("unavailable")


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="huge pages only where asked for (madvise) show the setting",
)
@pytest.mark.parametrize("setting, huge", [(None, True), ("0", False)])
def test_the_command_line_puts_large_tensors_on_huge_pages_unless_turned_off(setting, huge):
    """slimlm's CLI turns on torch's huge-page allocator before torch loads (large activations otherwise fault in 4 KB
    pages); importing slimlm as a library does not touch the environment."""
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    probe = "from slimlm.cli import huge_pages_default; huge_pages_default(); import torch; x = torch.ones(16 << 20); print([l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])"
    huge_kb = int(
        subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    )
    assert (huge_kb > 0) == huge
