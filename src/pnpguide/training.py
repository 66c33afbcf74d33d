"""What every training command shares: config fields, the accelerate loop, checkpoints, resume, logs.

Each stage (VAE, base UNet, fine-tune, guide distillation, step distillation) only supplies a
`make_batch(batch_index, generator)` and a `compute_loss(model, batch)`. Batches are a pure function of
(seed, batch index, rank), so a resumed run sees exactly the batches an uninterrupted run would have seen;
stages that sample rows of a pool use :func:`shard_rows`, so data-parallel ranks never train on the same rows
in the same step.

Every process writes `weights-rank-N.sha256` into the output folder, a digest of its final trained weights
(before any EMA copy): data-parallel ranks must end with identical weights, so differing files reveal a
broken all-reduce, and equal files across two runs prove they trained the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .config_checks import check_at_least, check_field_types

logger = logging.getLogger(__name__)

LR_SCHEDULERS = tuple(kind.value for kind in SchedulerType)
# Every int field of a training config (a stage's too) is a count that must be >= 1, except these.
NOT_COUNTS = ("lr_warmup_steps", "checkpoints_total_limit", "seed")


@dataclass
class TrainingConfig:
    """Loop settings shared by all training commands; stage configs inherit from it."""

    output_dir: str = "runs/train"  # where checkpoints, logs and the final weights go
    max_steps: int = 1000  # optimizer steps
    max_minutes: float | None = None  # also stop (checkpoint and save as usual) once the loop has run this long; the lr schedule still spans max_steps
    batch_size: int = 64  # samples per process per micro-batch
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 100
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16", passed to accelerate
    gradient_accumulation_steps: int = 1
    checkpointing_steps: int = 500  # save a resumable checkpoint every N steps
    checkpoints_total_limit: int = 2  # keep only the newest N checkpoints (0: keep all)
    resume: str | None = None  # "latest" (the newest checkpoint-N in output_dir; with none, says so and starts at step 0) or a checkpoint folder
    overwrite: bool = False  # start afresh in an output_dir that holds another run, moving its contents to <output_dir>.replaced-<time>
    use_ema: bool = False  # keep an exponential moving average of the weights (with warm-up)
    ema_decay: float = 0.999  # the EMA's final decay
    seed: int = 0
    log_every: int = 25  # steps between log lines

    def __post_init__(self):
        check_field_types(self)
        hints = typing.get_type_hints(type(self))
        check_at_least(self, 1, *(f.name for f in dataclasses.fields(self) if hints[f.name] is int and f.name not in NOT_COUNTS))
        check_at_least(self, 0, "lr_warmup_steps", "checkpoints_total_limit", "max_grad_norm")
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be between 0 and 1, got {self.ema_decay}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise ValueError(f"max_minutes must be a finite number of minutes > 0, got {self.max_minutes}")
        if self.overwrite and self.resume is not None:
            raise ValueError("--overwrite starts a new run and --resume continues the old one: pass one of them")


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, rank): batches reproduce across resumes."""
    return torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF_FFFF)


SHARED_RANK = -1  # step_generator's rank for draws that every rank must make identically


def shard_rows(length: int, batch_size: int, step: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """(batch_size,) row indices into a pool of `length` rows for `rank`'s batch at `step` (a batch index).

    Every rank draws the same permutation (it depends on seed and step only) and takes its own slice, so
    the ranks' batches are disjoint: together they are `batch_size * world_size` distinct rows, not
    `world_size` copies of one batch. When the pool is smaller than that, further permutations are
    appended (sampling without replacement, pass after pass), so within a step every row is used
    either k or k + 1 times; repeats are then unavoidable, but no row is favoured.
    """
    if length < 1:
        raise ValueError(f"cannot sample from an empty pool (length={length}); check the training data")
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size=}, {rank=}, {world_size=}")
    generator = step_generator(seed, step, SHARED_RANK)
    passes = -(-batch_size * world_size // length)  # ceil
    order = torch.cat([torch.randperm(length, generator=generator) for _ in range(passes)])
    return order[rank * batch_size : (rank + 1) * batch_size]


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes): equal digests mean equal weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bfloat16
    return digest.hexdigest()


class NonFiniteLossError(RuntimeError):
    pass


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = _checkpoints(Path(output_dir))
        return found[-1] if found else None
    return check_resume_path(resume)


def check_resume_path(resume: str) -> Path | None:
    """An explicit checkpoint folder must exist and be one (`latest` is looked up when the run starts)."""
    if resume == "latest":
        return None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {resume!r} does not exist; pass 'latest' or a checkpoint-N folder")
    if not (path / "step.json").is_file():
        raise FileNotFoundError(f"{resume!r} is not a checkpoint folder (no step.json); pass 'latest' or a checkpoint-N folder")
    return path


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """Write to a temporary folder and rename it, so a crash never leaves a half-written checkpoint."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=True)
    accelerator.wait_for_everyone()  # every rank writes its own RNG state into `partial` before the rename
    if accelerator.is_main_process:
        (partial / "step.json").write_text(json.dumps({"step": step}))
        if final.exists():  # a rerun of the same step replaces it
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in _checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def run_training(
    config: TrainingConfig,
    model: torch.nn.Module,
    make_batch: Callable[[int, torch.Generator], dict],
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor],
    accelerator: Accelerator | None = None,
    description: str = "training",
    validate: Callable[[torch.nn.Module], float] | None = None,
) -> tuple[torch.nn.Module, EMAModel | None]:
    """Train `model`'s parameters that require grad; return the unwrapped model and its EMA.

    `make_batch(step, generator)` builds the batch for an optimizer step; `compute_loss(model, batch)`
    returns a scalar loss. The loop checkpoints with `accelerator.save_state`, resumes from
    `config.resume`, clips gradients and stops with :class:`NonFiniteLossError` on NaN/inf.
    `validate(model)`, if given, returns a held-out loss: logged before the first step and at every checkpoint
    (of the EMA weights with `use_ema`, the ones that are saved), on the main process.
    """
    accelerator = accelerator or make_accelerator(config)
    output_dir = Path(config.output_dir)
    set_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # made after prepare, so its copies live where the weights now do (a GPU), not where they were built
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3) if config.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    step = 0
    checkpoint = resolve_resume(output_dir, config.resume)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        if ema is not None:  # accelerate loads registered objects' state onto the CPU
            ema.to(device=params[0].device)
        step = json.loads((checkpoint / "step.json").read_text())["step"]
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    elif config.resume == "latest" and accelerator.is_main_process:
        logger.warning(f"--resume latest: no checkpoint in {output_dir} yet; starting from step 0")

    log_path = output_dir / "log.jsonl"
    progress = tqdm(total=config.max_steps, initial=step, desc=description, disable=not accelerator.is_local_main_process)
    started = time.time()

    def log_validation() -> None:
        if validate is not None and accelerator.is_main_process:
            loss = _validation_loss(validate, accelerator.unwrap_model(model), params, ema)
            _append_log(log_path, step, time.time() - started, validation_loss=loss)
            progress.write(f"step {step}: validation loss {loss:.4f}")

    if step == 0:
        log_validation()
    try:  # closed before an error or Ctrl-C is reported, not redrawn after it at exit
        while step < config.max_steps:
            for micro in range(config.gradient_accumulation_steps):
                batch_index = step * config.gradient_accumulation_steps + micro
                generator = step_generator(config.seed, batch_index, accelerator.process_index)
                with accelerator.accumulate(model):
                    loss = compute_loss(model, make_batch(batch_index, generator))
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss became {loss.item()} at step {step}; lower --learning-rate or check the data "
                            f"(the last good checkpoint, if any, is in {output_dir})"
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema.step(params)
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            out_of_time = step < config.max_steps and _out_of_time(accelerator, started, config.max_minutes)
            if accelerator.is_main_process and (step % config.log_every == 0 or step == config.max_steps or out_of_time):
                _append_log(log_path, step, time.time() - started, loss=loss.item(), lr=lr_scheduler.get_last_lr()[0])
            if step % config.checkpointing_steps == 0 or step == config.max_steps or out_of_time:
                _save_checkpoint(accelerator, output_dir, step, config.checkpoints_total_limit)
                log_validation()
            if out_of_time:
                accelerator.print(f"stopped at step {step} of {config.max_steps}: --max-minutes {config.max_minutes} reached")
                break
    finally:
        progress.close()
    model = accelerator.unwrap_model(model)
    (output_dir / f"weights-rank-{accelerator.process_index}.sha256").write_text(weights_digest(model) + "\n")
    return model, ema


def make_accelerator(config: TrainingConfig) -> Accelerator:
    return Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,
    )


def _out_of_time(accelerator: Accelerator, started: float, max_minutes: float | None) -> bool:
    """Whether the wall-clock budget is spent; the main process decides, so every rank stops at the same step."""
    if max_minutes is None:
        return False
    spent = torch.tensor(float(time.time() - started >= 60 * max_minutes), device=accelerator.device)
    return bool(broadcast(spent).item())


def _validation_loss(validate: Callable[[torch.nn.Module], float], model: torch.nn.Module, params: list, ema: EMAModel | None) -> float:
    """validate(model) in eval mode without gradients, with the EMA's weights swapped in when there is one."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    model.eval()
    try:
        with torch.no_grad():
            return validate(model)
    finally:
        model.train()
        if ema is not None:
            ema.restore(params)


def _append_log(path: Path, step: int, elapsed: float, **figures: float) -> None:
    """One line of log.jsonl: a training step's loss and lr, or a held-out figure (validation_loss)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"step": step} | figures | {"elapsed_s": round(elapsed, 1)}) + "\n")


def copy_ema_into(model: torch.nn.Module, ema: EMAModel | None) -> torch.nn.Module:
    """Put the EMA weights into `model` (if EMA was used) before it is saved."""
    if ema is not None:
        ema.copy_to([p for p in model.parameters() if p.requires_grad])
    return model
