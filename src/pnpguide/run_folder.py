"""An output folder belongs to one training run: checked before anything is loaded, locked for the run's life.

- An empty or new folder is claimed for the run; its `config.json` is written.
- A folder that holds another run (other settings, or no pnpguide `config.json`) is refused, and so is the same
  run again without `resume`: a second run would overwrite the first one's guide and mix its checkpoints.
- `resume` continues the run in the folder when the settings are the same, except those in
  :data:`RESUMABLE_CHANGES` (how long to train, how often to save and log); the error names the fields that differ.
- `overwrite` moves the old contents aside to `<folder>.replaced-<time>` and starts afresh; nothing is deleted.
- `.pnpguide.lock` (PID, host, start time) makes a second run into the folder fail at once, naming the holder.
  A lock whose process is gone (SIGKILL, a crash, a reboot) is taken over; see :class:`RunLock`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from accelerate.utils import get_int_from_env

logger = logging.getLogger(__name__)

LOCK_NAME = ".pnpguide.lock"
RUN_CONTROL = ("output_dir", "resume", "overwrite")  # how a run is started, not what it trains
RESUMABLE_CHANGES = ("max_steps", "max_minutes", "checkpointing_steps", "checkpoints_total_limit", "log_every", "validation_trajectories")  # a resumed run may change these (none changes what it trains)
TAKEOVER_ATTEMPTS = 20


class OutputFolderError(ValueError):
    """The output folder holds something this run must not mix with or overwrite."""


class RunLockedError(RuntimeError):
    """Another live run holds the output folder."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: enough to tell a live run from a dead one, and to name it in an error."""

    pid: int
    host: str
    started: str  # local time the run took the lock, for people
    process_start: float | None  # the process's creation time: a reused PID is another process
    token: str  # unique per lock, so a lock is never mistaken for another one with the same PID

    @classmethod
    def this_process(cls) -> "LockHolder":
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        return cls(os.getpid(), socket.gethostname(), started, psutil.Process().create_time(), uuid.uuid4().hex)

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host}, started {self.started}"

    def is_alive(self) -> bool:
        """False only when certain: same host, and no process with that PID and creation time (or a zombie)."""
        if self.host != socket.gethostname():
            return True  # another machine's processes cannot be checked from here
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            return self.process_start is None or abs(process.create_time() - self.process_start) < 1.0
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True


def read_holder(lock_path: Path) -> LockHolder | None:
    """The lock's holder, or None when there is no lock (or it is unreadable: see :meth:`RunLock.acquire`)."""
    try:
        return LockHolder(**json.loads(lock_path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """`.pnpguide.lock` in the output folder, held from the config check to the last saved file.

    The lock is written in full under a unique name and hard-linked into place: link() fails when the lock
    exists, atomically (as O_EXCL does), and no reader ever sees a half-written lock. A dead holder's lock is
    taken over by whoever first creates `.pnpguide.lock.takeover-<its token>` with O_EXCL; the winner re-reads
    the lock and removes it only if it is still that dead holder's, then competes for a new lock like anyone.
    Two runs that find the same stale lock therefore never both take it.
    """

    def __init__(self, path: Path, holder: LockHolder):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        path, holder = folder / LOCK_NAME, LockHolder.this_process()
        draft = folder / f"{LOCK_NAME}.{holder.token}"
        draft.write_text(json.dumps(dataclasses.asdict(holder)))
        try:
            for _ in range(TAKEOVER_ATTEMPTS):
                try:
                    os.link(draft, path)
                    return cls(path, holder)
                except FileExistsError:
                    current = read_holder(path)
                    if current is not None and current.is_alive():
                        raise RunLockedError(in_use_message(folder, current)) from None
                    if current is not None:
                        _take_over(path, current)
                    time.sleep(0.01)
            raise RunLockedError(f"could not take {path}; if no run is using {folder}, delete that file")
        finally:
            draft.unlink(missing_ok=True)

    def release(self) -> None:
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


def _take_over(path: Path, stale: LockHolder) -> None:
    claim = path.with_name(f"{LOCK_NAME}.takeover-{stale.token}")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # another run is taking it over; the caller retries and meets that run's lock
    try:
        current = read_holder(path)
        if current is not None and current.token == stale.token:
            path.unlink()
            logger.warning(f"took over the lock of a run that is no longer running ({stale.describe()})")
    finally:
        claim.unlink(missing_ok=True)


def in_use_message(folder: Path, holder: LockHolder) -> str:
    return f"{folder} is in use by another pnpguide run ({holder.describe()}); wait for it to end or pick another --output-dir"


# ----------------------------------------------------------------------------------------------------------------
# whose run is in the folder


def config_as_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as config.json stores them


def save_config(config, output_dir: Path) -> None:
    (output_dir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))


def _contents(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if not p.name.startswith(LOCK_NAME)]


def _stored_config(folder: Path) -> dict | None:
    """The folder's config.json if it is a pnpguide training run's, else None."""
    try:
        stored = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) and {"output_dir", "max_steps"} <= stored.keys() else None


def _differences(stored: dict, ours: dict, shown: int = 6) -> list[str]:
    """`field old -> new` for the settings that must match, a few of them (another command's run differs in many). A
    field the stored run lacks counts as None: options added since then (off by default) do not block its resume."""
    ignored = RUN_CONTROL + RESUMABLE_CHANGES
    names = [n for n in {**stored, **ours} if n not in ignored and stored.get(n) != ours.get(n)]
    found = [f"{n} {stored.get(n)!r} -> {ours.get(n)!r}" for n in names[:shown]]
    return found + ([f"and {len(names) - shown} more"] if len(names) > shown else [])


def check_folder_owner(config, folder: Path) -> None:
    """Raise unless `folder` is empty, or holds this very run and `config.resume` asks to continue it."""
    if not _contents(folder):
        return
    stored = _stored_config(folder)
    if stored is None:
        raise OutputFolderError(
            f"{folder} is not empty and holds no pnpguide training run (no config.json of one); "
            "pick an empty --output-dir, or pass --overwrite to move its contents aside"
        )
    differences = _differences(stored, config_as_json(config))
    if config.resume is None:
        kind = f"a run with other settings ({', '.join(differences)})" if differences else "a run with these settings"
        raise OutputFolderError(
            f"{folder} already holds {kind}; pass --resume latest to continue it, --overwrite to move it aside and "
            "start again, or pick another --output-dir"
        )
    if differences:
        raise OutputFolderError(
            f"cannot resume the run in {folder} with other settings: {', '.join(differences)}; "
            f"only {', '.join(n for n in RESUMABLE_CHANGES if hasattr(config, n))} may change when resuming"
        )


def _move_aside(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder.with_name(f"{folder.name}.replaced-{stamp}")
    number = 1
    while aside.exists():
        number += 1
        aside = folder.with_name(f"{folder.name}.replaced-{stamp}-{number}")
    os.rename(folder, aside)
    folder.mkdir()
    logger.warning(f"--overwrite: moved the previous contents of {folder} to {aside}")
    return aside


def _replace_contents(folder: Path, lock: RunLock) -> RunLock:
    """Move the folder aside while holding its lock (no run can be using it), then lock the new empty folder."""
    aside = _move_aside(folder)
    try:
        return RunLock.acquire(folder)
    finally:
        RunLock(aside / LOCK_NAME, lock.holder).release()


@contextmanager
def claim_output_dir(config):
    """Check, lock and claim `config.output_dir` for this run; release the lock when the run ends, however.

    Under `accelerate launch` only the main process claims the folder; the others write nothing before the
    first collective call, which the main process reaches only after its claim. The rank is read from the
    launcher's environment: creating accelerate's state here would fix its settings before the run's own.
    """
    if get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) != 0:
        yield
        return
    folder = Path(config.output_dir)
    holder = read_holder(folder / LOCK_NAME)
    if holder is not None and holder.is_alive():
        raise RunLockedError(in_use_message(folder, holder))
    if not config.overwrite:
        check_folder_owner(config, folder)  # before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(folder)
    try:
        if config.overwrite and _contents(folder):
            lock = _replace_contents(folder, lock)
        check_folder_owner(config, folder)  # again under the lock: a run may have started since the first check
        save_config(config, folder)
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------
# a training command: inputs checked, then the folder claimed, before any model is loaded


def _input_checks() -> dict:
    """Config field name -> the check of the file or folder it names (imported here: those modules import us)."""
    from .loading import check_model_dir
    from .sources import read_image_folder, read_prompt_file
    from .loading import check_guide_dir
    from .training import check_resume_path

    return {
        "base": check_model_dir,
        "prompts": read_prompt_file,
        "images": read_image_folder,
        "init_guide": check_guide_dir,
        "guide": check_guide_dir,
        "vae_dir": check_vae_dir,
        "resume": check_resume_path,
    }


def check_vae_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a saved model folder (no config.json); train a VAE with `pnpguide train-vae` first")
    return path


def check_input_paths(config) -> None:
    """Every file or folder a training config names, before a model is loaded or anything is written."""
    for name, check in _input_checks().items():
        value = getattr(config, name, None)
        if value is not None:
            check(value)
    if getattr(config, "resolution", None) is not None:  # a stage with a data source: the base's VAE and UNet fix the multiple
        from .sources import check_resolution

        check_resolution(config.base, config.resolution)


def training_run(train):
    """Decorate a stage's `train(config)`: check its input files, then hold `config.output_dir` while it runs."""

    @functools.wraps(train)
    def run(config, *args, **kwargs):
        check_input_paths(config)
        with claim_output_dir(config):
            return train(config, *args, **kwargs)

    return run
