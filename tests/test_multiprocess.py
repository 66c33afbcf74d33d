"""Data-parallel guide distillation: two CPU processes (gloo) launched by `accelerate launch`."""

import socket
import subprocess
import sys

import pytest
import torch

from conftest import distill_flags, subprocess_env
from pnpguide.distill_guidance import GuidanceDistillConfig, train_guide
from pnpguide.guide import GuideModel
from pnpguide.training import shard_rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(flags: list[str], log) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes. `--cpu` would start a single process (accelerate's
    simple launcher), so this is the multi-process launcher with ACCELERATE_USE_CPU=1 (gloo backend)."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
    ]
    command = launch + ["-m", "pnpguide.cli"] + flags
    return subprocess.run(command, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT, timeout=180)


def _max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture
def one_thread():
    """As the launched ranks run (`--threads 1`): same summation order, and no fight over two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _single_process_guide(tiny_base_dir, prompt_file, output_dir, batch_size: int) -> GuideModel:
    config = GuidanceDistillConfig(
        output_dir=str(output_dir), base=str(tiny_base_dir), source="trajectories", prompts=str(prompt_file), trajectories=8,
        trajectory_steps=4, max_steps=6, batch_size=batch_size, lr_warmup_steps=0, checkpointing_steps=3,
    )
    return train_guide(config)


@pytest.mark.usefixtures("one_thread")
def test_two_ranks_train_one_guide_on_disjoint_rows(tiny_base_dir, prompt_file, tmp_path):
    """Two ranks with batch 4 must do what one process with batch 8 does, not what one with batch 4 does.

    With `source=trajectories` a batch is only its rows (no noise is drawn), and DDP averages the two ranks'
    gradients, so two disjoint halves of one step's rows give the gradient of the 8-row batch. Ranks that
    trained on the same rows would instead reproduce the single-process batch-4 run.
    """
    run = tmp_path / "ddp"
    with open(tmp_path / "launch.log", "w") as log:
        result = _launch_two_ranks(distill_flags(tiny_base_dir, prompt_file, run), log)
    assert result.returncode == 0, (tmp_path / "launch.log").read_text()[-3000:]

    digests = [(run / f"weights-rank-{rank}.sha256").read_text() for rank in (0, 1)]
    assert digests[0] == digests[1]  # both ranks ended with identical weights
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in (run / "checkpoint-6").glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    two_ranks = GuideModel.from_pretrained(run / "guide")

    as_one_batch = _single_process_guide(tiny_base_dir, prompt_file, tmp_path / "b8", batch_size=8)
    as_duplicates = _single_process_guide(tiny_base_dir, prompt_file, tmp_path / "b4", batch_size=4)
    assert _max_difference(two_ranks, as_one_batch) < 1e-4
    assert _max_difference(two_ranks, as_duplicates) > 1e-3


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_get_disjoint_rows_that_together_are_one_bigger_batch(world_size):
    shards = [shard_rows(100, 12, step=5, seed=0, rank=r, world_size=world_size) for r in range(world_size)]
    rows = torch.cat(shards)
    assert all(len(s) == 12 for s in shards)
    assert len(set(rows.tolist())) == 12 * world_size and 0 <= rows.min() and rows.max() < 100
    assert torch.equal(rows, shard_rows(100, 12 * world_size, step=5, seed=0, rank=0, world_size=1))


def test_rows_are_a_pure_function_of_seed_and_step():
    assert torch.equal(shard_rows(50, 8, 3, 0, 1, 2), shard_rows(50, 8, 3, 0, 1, 2))
    assert not torch.equal(shard_rows(50, 8, 3, 0, 1, 2), shard_rows(50, 8, 4, 0, 1, 2))
    assert not torch.equal(shard_rows(50, 8, 3, 0, 1, 2), shard_rows(50, 8, 3, 1, 1, 2))


def test_a_small_pool_is_used_evenly_within_a_step():
    rows = torch.cat([shard_rows(10, 8, step=0, seed=0, rank=r, world_size=3) for r in range(3)])  # 24 rows from 10
    counts = torch.bincount(rows, minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3  # every row k or k + 1 times


@pytest.mark.parametrize("bad, match", [
    (dict(length=0), "empty pool"),
    (dict(rank=2), "0 <= rank < world_size"),
    (dict(batch_size=0), "batch_size >= 1"),
])
def test_bad_shard_arguments_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        shard_rows(**(dict(length=10, batch_size=4, step=0, seed=0, rank=0, world_size=2) | bad))
