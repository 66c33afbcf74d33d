"""A training process killed at any moment resumes to exactly the weights of an uninterrupted run."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import distill_flags, subprocess_env
from pnpguide.training import TrainingConfig, resolve_resume, run_training

# Flags shared by the killed, resumed and uninterrupted runs: with EMA, so that its state must resume too.
RUN = dict(max_steps=80, checkpointing_steps=5, checkpoints_total_limit=2, use_ema=True, log_every=5)


def _distill(tiny_base_dir, prompt_file, output_dir, **flags) -> list[str]:
    return [sys.executable, "-m", "pnpguide.cli"] + distill_flags(tiny_base_dir, prompt_file, output_dir, **(RUN | flags))


def _kill_after_first_checkpoint(command: list[str], output_dir: Path, log) -> None:
    process = subprocess.Popen(command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list(output_dir.glob("checkpoint-*")):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler, no cleanup, as in a preempted job or an OOM kill
    process.wait()


def _assert_loadable(checkpoint: Path) -> None:
    """What `--resume` reads: step.json, the model's safetensors and accelerate's state files."""
    assert json.loads((checkpoint / "step.json").read_text())["step"] == int(checkpoint.name.split("-")[1])
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
        assert any(key.startswith("output_head.conv_out") for key in weights.keys())  # the default design: an output guide
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"):  # the last: EMA
        assert (checkpoint / name).is_file(), name


def test_a_killed_distillation_resumes_to_the_uninterrupted_weights(tiny_base_dir, prompt_file, tmp_path):
    """Exact equality holds because every batch is a function of (seed, step, rank) and the checkpoint holds
    the rest of the state: weights, AdamW moments, LR schedule, EMA (with its step count) and RNG states."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    with open(tmp_path / "killed.log", "w") as log:
        _kill_after_first_checkpoint(_distill(tiny_base_dir, prompt_file, killed), killed, log)
    left = sorted(killed.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert left and not (killed / "guide").exists(), "the run was not interrupted"
    assert len(left) <= RUN["checkpoints_total_limit"]
    for checkpoint in left:
        _assert_loadable(checkpoint)

    resumed = subprocess.run(
        _distill(tiny_base_dir, prompt_file, killed, resume="latest"), env=subprocess_env(), capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {left[-1]} at step {left[-1].name.split('-')[1]}" in resumed.stdout + resumed.stderr
    uninterrupted = subprocess.run(_distill(tiny_base_dir, prompt_file, straight), env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    assert (killed / "weights-rank-0.sha256").read_text() == (straight / "weights-rank-0.sha256").read_text()  # trained weights
    ema_a, ema_b = (load_file(run / "guide" / "diffusion_pytorch_model.safetensors") for run in (killed, straight))  # saved EMA
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-75", "checkpoint-80"]  # the total limit
    assert not list(killed.glob(".checkpoint-*"))


class _Crash(Exception):
    pass


def _regression():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def _batch(batch_index, generator):
    x = torch.randn(8, 4, generator=generator)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _config(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), max_steps=12, learning_rate=0.05, lr_warmup_steps=0, checkpointing_steps=4)
    return TrainingConfig(**(settings | overrides))


def test_a_crash_while_saving_leaves_no_checkpoint_folder(tmp_path, monkeypatch):
    """Kill the save of checkpoint-8 half-way: only a `.partial` folder remains, `latest` skips it, and the rerun
    replaces it. (A SIGKILL rarely lands inside the few milliseconds of a save, so the crash is simulated here.)"""
    real_save = Accelerator.save_state

    def save_then_die_at_step_8(self, output_dir, **kwargs):
        real_save(self, output_dir, **kwargs)
        if "checkpoint-8" in output_dir:
            (Path(output_dir) / "model.safetensors").write_bytes(b"half-written")
            raise _Crash

    monkeypatch.setattr(Accelerator, "save_state", save_then_die_at_step_8)
    with pytest.raises(_Crash):
        run_training(_config(tmp_path / "run"), _regression(), _batch, _loss)
    monkeypatch.setattr(Accelerator, "save_state", real_save)

    assert sorted(p.name for p in (tmp_path / "run").glob("*checkpoint-*")) == [".checkpoint-8.partial", "checkpoint-4"]
    assert resolve_resume(tmp_path / "run", "latest").name == "checkpoint-4"
    resumed = run_training(_config(tmp_path / "run", resume="latest"), torch.nn.Linear(4, 1), _batch, _loss)[0]
    straight = run_training(_config(tmp_path / "straight"), _regression(), _batch, _loss)[0]
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert not list((tmp_path / "run").glob(".checkpoint-*"))
