import json

import pytest
import torch

from pnpguide.training import NonFiniteLossError, TrainingConfig, run_training


def _regression(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 1)


def _make_batch(step, generator):
    x = torch.randn(16, 4, generator=generator)
    return {"x": x, "y": x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])}


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def _config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=12, learning_rate=0.05, lr_warmup_steps=0, checkpointing_steps=4, log_every=4)
    return TrainingConfig(**(settings | overrides))


def test_training_lowers_the_loss_and_logs(tmp_path):
    model = _regression()
    fixed = _make_batch(0, torch.Generator().manual_seed(99))
    before = _loss(model, fixed).item()
    run_training(_config(tmp_path, max_steps=60), model, _make_batch, _loss)
    assert _loss(model, fixed).item() < 0.5 * before
    lines = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 60 and set(lines[-1]) == {"step", "loss", "lr", "elapsed_s"}


def test_checkpoints_rotate_and_are_complete(tmp_path):
    run_training(_config(tmp_path, checkpoints_total_limit=2), _regression(), _make_batch, _loss)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-12", "checkpoint-8"]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no half-written folders left
    assert (tmp_path / "checkpoint-12" / "model.safetensors").is_file()


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path):
    straight = _regression()
    run_training(_config(tmp_path / "a"), straight, _make_batch, _loss)
    first_half = _regression()
    run_training(_config(tmp_path / "b", max_steps=12), first_half, _make_batch, _loss)
    for name in ("checkpoint-12",):  # drop the end, as if the process died after step 8
        import shutil
        shutil.rmtree(tmp_path / "b" / name)
    resumed = _regression(seed=123)  # different init: everything must come from the checkpoint
    run_training(_config(tmp_path / "b", resume="latest"), resumed, _make_batch, _loss)
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    def exploding(model, batch):
        return _loss(model, batch) * (float("nan") if batch["step"] == 3 else 1.0)

    with pytest.raises(NonFiniteLossError, match="at step 3"):
        run_training(_config(tmp_path), _regression(), lambda s, g: _make_batch(s, g) | {"step": s}, exploding)


def test_missing_resume_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_training(_config(tmp_path, resume=str(tmp_path / "checkpoint-99")), _regression(), _make_batch, _loss)
