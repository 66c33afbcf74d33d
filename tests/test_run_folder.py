"""An output folder belongs to one run: other runs are refused without touching a byte of it, a live run's lock
stops a second run at once, and a dead run's lock is taken over by exactly one newcomer."""

import hashlib
import json
import multiprocessing
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import distill_flags, subprocess_env
from pnpguide import distill_guidance
from pnpguide.cli import main
from pnpguide.run_folder import LOCK_NAME, LockHolder, RunLock, RunLockedError


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()  # earlier lines: the first run's progress bars
    return lines[-1]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Refused runs must fail before the (multi-GB, for a real model) base is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(distill_guidance, "load_pipeline", refuse)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _stale_lock(folder: Path, **changes) -> LockHolder:
    folder.mkdir(parents=True, exist_ok=True)
    holder = LockHolder(**(vars(LockHolder.this_process()) | {"pid": _dead_pid()} | changes))
    (folder / LOCK_NAME).write_text(json.dumps(vars(holder)))
    return holder


# ---------------------------------------------------------------------------------------------------------------
# another run into a used folder


def test_other_runs_into_a_used_folder_are_refused_and_leave_it_byte_identical(tiny_base_dir, prompt_file, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(distill_flags(tiny_base_dir, prompt_file, run)) == 0
    first_run = _digests(run)
    assert {"config.json", "log.jsonl", "checkpoint-6/step.json", "guide/config.json"} <= first_run.keys()
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(distill_guidance, "load_pipeline", lambda *a, **k: pytest.fail("the base was loaded"))
        refused = [
            (dict(learning_rate=0.002), "already holds a run with other settings (learning_rate 0.001 -> 0.002)"),
            (dict(), "already holds a run with these settings; pass --resume latest to continue it, --overwrite"),
            (dict(resume="latest", seed=1), "cannot resume the run in"),
        ]
        for flags, message in refused:
            assert main(distill_flags(tiny_base_dir, prompt_file, run, **flags)) == 2
            line = _last_error_line(capsys)
            assert line.startswith("pnpguide distill: error:") and message in line
        assert "seed 0 -> 1; only max_steps, max_minutes, checkpointing_steps, checkpoints_total_limit, log_every, validation_trajectories may change" in line
    assert _digests(run) == first_run


def test_resume_may_train_longer_and_continues_the_same_log(tiny_base_dir, prompt_file, tmp_path):
    run = tmp_path / "run"
    assert main(distill_flags(tiny_base_dir, prompt_file, run, log_every=3)) == 0
    assert main(distill_flags(tiny_base_dir, prompt_file, run, log_every=3, max_steps=9, resume="latest")) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 9


def test_a_run_stopped_by_max_minutes_resumes_with_another_budget(tiny_base_dir, prompt_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(distill_flags(tiny_base_dir, prompt_file, run, log_every=3, max_minutes=1e-9)) == 0
    assert "stopped at step 1" in capsys.readouterr().out
    assert main(distill_flags(tiny_base_dir, prompt_file, run, log_every=3, resume="latest")) == 0
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps[-1] == json.loads((run / "config.json").read_text())["max_steps"]


def test_a_folder_that_is_not_a_run_is_refused_and_overwrite_moves_it_aside(tiny_base_dir, prompt_file, tmp_path, capsys, no_model_loading):
    run = tmp_path / "run"
    (run / "notes").mkdir(parents=True)
    (run / "notes" / "thesis.txt").write_text("three years of work")
    before = _digests(run)
    assert main(distill_flags(tiny_base_dir, prompt_file, run)) == 2
    assert "is not empty and holds no pnpguide training run" in _last_error_line(capsys)
    assert _digests(run) == before and not list(tmp_path.glob("run.replaced-*"))


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(tiny_base_dir, prompt_file, tmp_path, caplog):
    run = tmp_path / "run"
    (run / "notes").mkdir(parents=True)
    (run / "notes" / "thesis.txt").write_text("three years of work")
    before = _digests(run)
    assert main(distill_flags(tiny_base_dir, prompt_file, run, overwrite=True)) == 0
    (aside,) = tmp_path.glob("run.replaced-*")
    assert _digests(aside) == before  # moved, not deleted
    assert (run / "guide" / "config.json").is_file() and not (run / "notes").exists()
    assert f"moved the previous contents of {run} to {aside}" in caplog.text


def test_overwrite_and_resume_together_are_refused(capsys):
    assert main(["distill", "--overwrite", "--resume", "latest"]) == 2
    assert "pass one of them" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# runs at the same time


HOLD_LOCK = "import sys, time; from pathlib import Path; from pnpguide.run_folder import RunLock; RunLock.acquire(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"


def test_a_run_into_a_folder_a_live_process_holds_fails_at_once_naming_it(tiny_base_dir, prompt_file, tmp_path, capsys, no_model_loading):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(distill_flags(tiny_base_dir, prompt_file, run)) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and f"is in use by another pnpguide run (PID {holder.pid} on {socket.gethostname()}, started " in line
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tiny_base_dir, prompt_file, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL: the lock stays behind
    holder.wait()
    assert (run / LOCK_NAME).is_file()
    assert main(distill_flags(tiny_base_dir, prompt_file, run)) == 0
    assert f"took over the lock of a run that is no longer running (PID {holder.pid} on" in caplog.text
    assert not list(run.glob(LOCK_NAME + "*"))  # released at the end


def test_two_training_processes_into_one_folder_never_mix(tiny_base_dir, prompt_file, tmp_path):
    """The same command twice at once (say, a job script that always passes --resume latest, started twice): the
    settings match, so only the lock tells them apart. One trains; the other stops at once."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pnpguide.cli"] + distill_flags(tiny_base_dir, prompt_file, run, max_steps=60, resume="latest", log_every=5)
    runs = [subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    (refusal,) = [err.strip().splitlines()[-1] for code, err in results if code == 2]
    assert refusal.startswith("pnpguide distill: error:") and "is in use by another pnpguide run (PID" in refusal
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 61, 5))  # one run's log, no step twice


def _race_for_the_lock(folder: Path, barrier, results, done) -> None:
    barrier.wait()
    try:
        lock = RunLock.acquire(folder)
    except RunLockedError:
        results.put("lost")
        return
    results.put("won")
    done.wait(60)  # hold the lock until every racer has tried
    lock.release()


@pytest.mark.parametrize("round_", range(4))
def test_racing_runs_take_a_stale_lock_over_exactly_once(tmp_path, round_):
    _stale_lock(tmp_path)
    context = multiprocessing.get_context("fork")
    racers = 6
    barrier, results, done = context.Barrier(racers), context.Queue(), context.Event()
    processes = [context.Process(target=_race_for_the_lock, args=(tmp_path, barrier, results, done)) for _ in range(racers)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    done.set()
    for process in processes:
        process.join(timeout=60)
    assert outcomes == ["lost"] * (racers - 1) + ["won"]


def test_a_lock_whose_pid_was_reused_is_stale_and_another_hosts_lock_is_not(tmp_path):
    (tmp_path / "a").mkdir()
    reused = LockHolder(**(vars(LockHolder.this_process()) | {"process_start": 12345.0}))  # our PID, another process
    (tmp_path / "a" / LOCK_NAME).write_text(json.dumps(vars(reused)))
    RunLock.acquire(tmp_path / "a").release()
    _stale_lock(tmp_path / "b", host="some-other-machine")
    with pytest.raises(RunLockedError, match="on some-other-machine, started"):
        RunLock.acquire(tmp_path / "b")


def test_an_interrupted_run_says_so_releases_its_lock_and_resumes(tiny_base_dir, prompt_file, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pnpguide.cli"] + distill_flags(tiny_base_dir, prompt_file, run, max_steps=60)
    # a shell's background job (`pytest ... &`) starts with SIGINT ignored, and a child would inherit that: Ctrl-C as in a terminal
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(run.glob("checkpoint-*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended (exit {process.returncode}) before Ctrl-C: {process.stderr.read()[-2000:]}"
    process.send_signal(signal.SIGINT)  # Ctrl-C
    returncode, stderr = process.wait(timeout=60), process.stderr.read()
    assert returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "pnpguide distill: interrupted"
    assert not (run / LOCK_NAME).exists()
    resumed = subprocess.run(command + ["--resume", "latest"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]


def test_a_run_saved_before_an_option_existed_resumes_and_a_changed_option_still_blocks(tmp_path):
    """A field the stored config.json lacks (added in a later version, off by default) is no difference; a set one is."""
    from pnpguide.distill_guidance import GuidanceDistillConfig
    from pnpguide.run_folder import OutputFolderError, check_folder_owner, config_as_json

    config = GuidanceDistillConfig(output_dir=str(tmp_path), resume="latest")
    older = {name: value for name, value in config_as_json(config).items() if name != "negative_prompts"}
    (tmp_path / "config.json").write_text(json.dumps(older))
    check_folder_owner(config, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(older | {"negative_prompts": "negatives.txt"}))
    with pytest.raises(OutputFolderError, match=r"negative_prompts 'negatives.txt' -> None"):
        check_folder_owner(config, tmp_path)
