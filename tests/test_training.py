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


def test_max_minutes_stops_with_a_checkpoint_that_resumes_to_the_uninterrupted_weights(tmp_path):
    straight = _regression()
    run_training(_config(tmp_path / "a"), straight, _make_batch, _loss)
    cut = _regression()
    run_training(_config(tmp_path / "b", max_minutes=1e-9), cut, _make_batch, _loss)  # spent after the first step
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-1"]
    assert [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()] == [1]
    resumed = _regression(seed=123)
    run_training(_config(tmp_path / "b", resume="latest"), resumed, _make_batch, _loss)
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)


@pytest.mark.parametrize("minutes", [0.0, -1.0, float("inf"), float("nan")])
def test_max_minutes_must_be_a_positive_finite_number(tmp_path, minutes):
    with pytest.raises(ValueError, match="max_minutes"):
        _config(tmp_path, max_minutes=minutes)


def test_ema_copies_are_made_after_prepare_moves_the_weights(tmp_path, monkeypatch):
    """On a GPU, prepare moves the weights; an EMA built before it kept CPU copies and its first step failed
    ("Expected all tensors to be on the same device"). A prepare that casts the weights stands in for the move."""
    from accelerate import Accelerator

    prepare = Accelerator.prepare

    def moving_prepare(self, model, *rest):
        return prepare(self, model.to(torch.float64), *rest)

    monkeypatch.setattr(Accelerator, "prepare", moving_prepare)
    model = _regression()
    _, ema = run_training(_config(tmp_path, max_steps=2, use_ema=True), model, _make_batch, lambda m, b: _loss(m, {k: v.double() for k, v in b.items()}))
    assert [p.dtype for p in ema.shadow_params] == [torch.float64, torch.float64]
