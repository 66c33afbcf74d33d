"""Training rows on disk: safetensors shards written once (resumably, split over ranks) and read a batch at a time.

A pool is `folder/shard-00000.safetensors, ...` plus `folder/index.json` (each shard's file and row count).
Each shard holds `latents` (rows, C, h, w) and `prompt_ids` (rows,), and optionally `timesteps` and
`guidance` (rows,), the teacher's `unconditional` and `conditional` outputs at each state (rows, C, h, w), and
`negative_ids` (rows,): the negative prompt the teacher's run put in CFG's unconditional half (its pass is then the
recorded `unconditional`).
Training reads only the rows of its batch (`safe_open(...).get_slice`), so memory does not grow with the number of
prompts, trajectories or images; a shard whose file exists with the same
`fingerprint` (its settings, in the safetensors metadata) is never computed again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "index.json"
FIELDS = ("latents", "prompt_ids", "timesteps", "guidance", "unconditional", "conditional", "negative_ids")


@dataclass
class Rows:
    """Rows of a pool: latents and the prompts they go with; trajectory states also carry their t and w."""

    latents: torch.Tensor  # (N, C, h, w): clean latents, or noisy states x_t when `timesteps` is set
    prompts: list[str]  # N prompts, encoded per batch
    timesteps: torch.Tensor | None = None  # (N,)
    guidance: torch.Tensor | None = None  # (N,) the w each trajectory was sampled with
    unconditional: torch.Tensor | None = None  # (N, C, h, w) the teacher's outputs at the states, recorded with them
    conditional: torch.Tensor | None = None
    negatives: list[str] | None = None  # N negative prompts the teacher ran with ("" for none), when recorded


class TensorPool:
    """Rows held in memory: small fixed data sets (the embedded model's shapes)."""

    def __init__(self, latents: torch.Tensor, prompt_ids: torch.Tensor, prompts: list[str]):
        self.latents, self.prompt_ids, self.prompts = latents, prompt_ids, prompts

    def __len__(self) -> int:
        return len(self.latents)

    def rows(self, index: torch.Tensor) -> Rows:
        return Rows(self.latents[index], [self.prompts[i] for i in self.prompt_ids[index].tolist()])


class ShardPool:
    """Rows streamed from a folder of shards; `prompts` is the table their `prompt_ids` index, `negatives` the one
    their `negative_ids` index (teacher runs with negative prompts)."""

    def __init__(self, folder: str | Path, prompts: list[str], negatives: list[str] | None = None):
        self.folder, self.prompts, self.negatives = Path(folder), prompts, negatives
        index = json.loads((self.folder / INDEX).read_text())
        self.files = [self.folder / shard["file"] for shard in index["shards"]]
        self.starts = torch.tensor([0] + [shard["rows"] for shard in index["shards"]]).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, index: torch.Tensor) -> Rows:
        shard_of = torch.searchsorted(self.starts, index, right=True) - 1
        parts: dict[str, list[torch.Tensor | None]] = {name: [None] * len(index) for name in FIELDS}
        for shard in shard_of.unique().tolist():
            positions = (shard_of == shard).nonzero().flatten().tolist()
            with safe_open(str(self.files[shard]), framework="pt") as f:
                for name in (n for n in FIELDS if n in f.keys()):
                    tensor = f.get_slice(name)
                    for position in positions:
                        row = int(index[position] - self.starts[shard])
                        parts[name][position] = tensor[row : row + 1]
        stacked = {name: torch.cat(values) if values[0] is not None else None for name, values in parts.items()}
        prompts = [self.prompts[i] for i in stacked["prompt_ids"].tolist()]
        negatives = None if stacked["negative_ids"] is None else [self.negatives[i] for i in stacked["negative_ids"].tolist()]
        return Rows(stacked["latents"], prompts, stacked["timesteps"], stacked["guidance"], stacked["unconditional"], stacked["conditional"],
                    negatives)

    def at_timesteps(self, timesteps: list[int]) -> "RowSubset":
        """The rows of teacher states at these timesteps only (a guide's step heads learn at their own steps)."""
        chosen = []
        for file, start in zip(self.files, self.starts.tolist()):
            with safe_open(str(file), framework="pt") as f:
                if "timesteps" not in f.keys():
                    raise ValueError(f"{self.folder} holds no teacher states with timesteps to choose from")
                at = torch.isin(f.get_tensor("timesteps").round().long(), torch.tensor(timesteps)).nonzero().flatten()
            chosen.append(at + start)
        index = torch.cat(chosen)
        if len(index) == 0:
            raise ValueError(f"the teacher states in {self.folder} have none at t = {timesteps}")
        return RowSubset(self, index)


class RowSubset:
    """Some rows of a pool, read as a pool of their own."""

    def __init__(self, pool, index: torch.Tensor):
        self.pool, self.index, self.prompts = pool, index, pool.prompts

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, index: torch.Tensor) -> Rows:
        return self.pool.rows(self.index[index])


def shard_path(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:05d}.safetensors"


def finished(path: Path, fingerprint: dict[str, str]) -> bool:
    """True when `path` is a complete shard written with these settings (shards are renamed into place whole)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() == fingerprint
    except Exception:  # a foreign or damaged file: compute the shard again
        return False


def write_shards(
    folder: str | Path,
    count: int,
    make_shard: Callable[[int], dict[str, torch.Tensor]],
    fingerprint: dict[str, str],
    accelerator,
) -> Path:
    """Write shards 0..count-1 that are not finished yet, then `index.json`; return the folder.

    Rank r writes shards r, r + world_size, ...; `make_shard(number)` must depend only on `number` (and the
    settings in `fingerprint`), so the shards are the same for any number of ranks and after a resume.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(accelerator.process_index, count, accelerator.num_processes):
        path = shard_path(folder, number)
        if finished(path, fingerprint | {"shard": str(number)}):
            continue
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tensors = {name: tensor.contiguous() for name, tensor in make_shard(number).items()}
        save_file(tensors, str(partial), metadata=fingerprint | {"shard": str(number)})
        os.replace(partial, path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = []
        for number in range(count):
            with safe_open(str(shard_path(folder, number)), framework="pt") as f:
                shards.append({"file": shard_path(folder, number).name, "rows": f.get_slice("prompt_ids").get_shape()[0]})
        (folder / INDEX).write_text(json.dumps({"fingerprint": fingerprint, "shards": shards}, indent=1))
    accelerator.wait_for_everyone()
    return folder
