"""FSDP2 under torchrun on CPU (gloo, 2 processes) reproduces the single-process loss curve of the same global batch.

This file is also the worker: `torchrun --nproc_per_node 2 tests/test_fsdp.py OUT.json [CHECKPOINT_DIR STEPS]`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from slimlm.distill.data import TokenWindows
from slimlm.distill.losses import logit_distillation_loss
from slimlm.models.adapters import decoder_blocks
from slimlm.train.trainer import TrainConfig, train

STEPS = 4


def config(checkpoint_dir: str | None = None, steps: int = STEPS) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=1,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=2,
    )


def distillation(teacher):
    def loss_fn(student, batch):
        with torch.no_grad():
            target = teacher(batch["input_ids"], use_cache=False).logits
        return logit_distillation_loss(student(batch["input_ids"], use_cache=False).logits, target, temperature=2.0)

    return loss_fn


def source():
    return TokenWindows(
        torch.randint(3, 320, (64 * 16,), generator=torch.Generator().manual_seed(0)), 16, 0, "random ids"
    )


def run(checkpoint_dir: str | None = None, steps: int = STEPS) -> list[float]:
    """Distil a tiny Llama from another; sharded when launched by torchrun."""
    from slimlm.train.distributed import init_from_env, shard_

    place = init_from_env()
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    if place.size > 1:
        shard_(student, list(decoder_blocks(student)))
    return train(student, distillation(teacher), source(), config(checkpoint_dir, steps)).losses


def torchrun(tmp_path: Path, *args: str) -> list[float]:
    torchrun_bin = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = tmp_path / "losses.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMLM_QUIET": "1", "PYTHONPATH": str(Path(__file__).parent)}
    # its own session, so a hung run is ended with its worker processes (killing torchrun alone would orphan them)
    process = subprocess.Popen(
        [torchrun_bin, "--standalone", "--nproc_per_node", "2", __file__, str(out), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, output[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # a torchrun launch of 2 processes plus the single-process run: about 20 s on 2 busy cores
def test_fsdp_two_processes_match_one(tmp_path):
    single = run()
    sharded = torchrun(tmp_path)
    assert len(sharded) == STEPS
    assert sharded == pytest.approx(single, rel=1e-4)
    assert sharded[-1] < sharded[0]


@pytest.mark.slow
def test_fsdp_run_resumes_from_its_checkpoint(tmp_path):
    single = run()
    torchrun(tmp_path, str(tmp_path / "ckpt"), "2")  # the first 2 steps (a run with steps=2 has another schedule:
    # its checkpoint would be refused, so write it with the full run's config and stop at 2 instead)
    resumed = torchrun(tmp_path, str(tmp_path / "ckpt"), str(STEPS))
    assert resumed == pytest.approx(single, rel=1e-4)


@pytest.mark.slow  # two compress runs of a tiny model (one under torchrun): about 30 s
def test_cli_compress_under_torchrun_trains_sharded_and_saves_once(tmp_path):
    """`torchrun -m slimlm.cli compress` with a distill stage: the saved student equals the one-process result."""
    import yaml
    from conftest import TEXT, tiny_tokenizer
    from safetensors.torch import load_file

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    recipe = tmp_path / "kd.yaml"
    distill = {
        "method": "distill",
        "steps": 3,
        "batch_size": 4,
        "seqlen": 32,
        "lr": 1e-3,
        "warmup": 1,
        "data": str(tmp_path / "text.txt"),
    }
    recipe.write_text(
        yaml.safe_dump(
            {"name": "kd", "stages": [{"method": "width", "mlp": 0.25, "heads": 0.0, "multiple_of": 8}, distill]}
        )
    )
    common = [
        "compress",
        str(model_dir),
        "--recipe",
        str(recipe),
        "--no-eval",
        "--calib-data",
        str(tmp_path / "text.txt"),
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMLM_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun_bin = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    sharded = subprocess.run(
        [
            torchrun_bin,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "slimlm.cli",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,
    )
    assert sharded.returncode == 0, (sharded.stdout + sharded.stderr)[-3000:]
    assert (sharded.stdout + sharded.stderr).count("saved:") == 1  # rank 0 reports and saves
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    base = load_file(model_dir / "model.safetensors")
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5)
    assert not torch.equal(one["model.norm.weight"], base["model.norm.weight"])  # the distill stage trained it


def worker(checkpoint: str | None, stop: int) -> list[float]:
    """One torchrun process: the full run, or the full run's config stopped after `stop` steps (as an interruption
    would, after a checkpoint); returns the losses ([] when stopped)."""
    if stop == STEPS:
        return run(checkpoint, STEPS)
    from slimlm.train.distributed import shard_

    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    shard_(student, list(decoder_blocks(student)))
    calls = {"n": 0}
    inner = distillation(teacher)

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] > stop * 2:  # grad_accum micro-steps per step
            raise SystemExit(0)
        return inner(model, batch)

    try:
        train(student, loss_fn, source(), config(checkpoint))
    except SystemExit:
        pass
    return []


if __name__ == "__main__":
    import gc

    from slimlm.train.distributed import is_sharded, process_group

    with process_group() as place:
        losses = worker(sys.argv[2] if len(sys.argv) > 2 else None, int(sys.argv[3]) if len(sys.argv) > 3 else STEPS)
        if place.is_main:
            Path(sys.argv[1]).write_text(json.dumps(losses))
    # the sharded models (kept alive by reference cycles) went with the group, not at interpreter exit
    alive = sum(is_sharded(o) for o in gc.get_objects())
    if alive:
        sys.exit(f"{alive} FSDP modules outlived the process group")
