"""Faults of the supervising process: ``qplan run`` itself killed with SIGKILL (at a random
step and at exact points), two runs on one folder, a lock left by a dead run, a double
Ctrl-C. Real CPU runs of the tiny Llama; ``qplan run`` is a subprocess here so that it can
be killed. Exact points come from the ``hang`` failpoint (the training process sleeps
there and says so on stderr).

Set QPLAN_FAULT_SEED to replay the random step of a failed run (the seed is in the
assertion message).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from fixtures.run_checks import assert_each_step_once
from qplan.cli import cli
from qplan.runner import checkpoint as CK
from qplan.runner.rundir import LOCK_FILE
from qplan.runner.run import run
from qplan.runner.types import RunRequest

pytestmark = pytest.mark.slow

STEPS = 8
ARGS = ["--cpu", "--seq", "32", "--batch", "2", "--grad-accum", "2", "--rank", "8",
        "--no-grad-ckpt", "--max-steps", str(STEPS), "--save-steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def data(text_data):
    return text_data


class Parent:
    """``qplan run`` in a subprocess, its log, and its run folder."""

    def __init__(self, out: Path, args: list, failpoints: str = ""):
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        env = {**os.environ, "QPLAN_FAILPOINTS": failpoints}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "qplan", "run", *map(str, args)],
                                         stdout=f, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, cond, what: str, timeout: float = 240) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"qplan run ended ({self.proc.returncode}) before {what}:\n"
                                     + self.text()[-3000:])
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-3000:]}")

    def steps(self, attempt: int = 1) -> int:
        p = self.out / "attempts" / str(attempt) / "steps.jsonl"
        return len(p.read_text().splitlines()) if p.is_file() else 0

    def holder(self) -> dict:
        return json.loads((self.out / LOCK_FILE).read_text() or "{}")

    def kill9(self) -> int:
        """SIGKILL ``qplan run``; the pid of its training process, which must die too."""
        assert self.proc.poll() is None, "qplan run ended before the kill:\n" + self.text()[-2000:]
        child = self.holder().get("child_pid")
        assert child, self.holder()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        return child


def _ended(pid: int) -> bool:
    """No thread of ``pid`` runs (a zombie nobody reaped yet counts as ended; its main
    thread alone being a zombie does not: the others may still hold its files)."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            return False
        tasks = Path(f"/proc/{pid}/task")
        return not tasks.is_dir() or all(
            (t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" for t in tasks.iterdir())
    except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
        return True


def holding(folder: Path) -> list[int]:
    """Processes with a file under ``folder`` open."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        if any(f.startswith(str(folder)) for f in fds):
            out.append(int(proc.name))
    return out


def gone(pid: int, folder: Path, timeout: float = 20) -> bool:
    """``pid`` ended, and no process works in ``folder`` any more."""
    end = time.time() + timeout
    while time.time() < end:
        if _ended(pid) and not holding(folder):
            return True
        time.sleep(0.2)
    return False


def lock_is_free(out: Path) -> bool:
    """Nobody holds the run folder's lock (checked without touching its record)."""
    import fcntl

    fd = os.open(out / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def resume(out: Path) -> tuple:
    messages: list[str] = []
    rep = run(RunRequest(resume=str(out), progress=False), notify=messages.append)
    return rep, messages


# ---------------------------------------------------------------------------
def test_kill_9_of_qplan_run_at_a_random_step(model_dir, data, tmp_path):
    seed = int(os.environ.get("QPLAN_FAULT_SEED", time.time_ns() % 1_000_000))
    k = random.Random(seed).randint(1, STEPS - 1)
    out = tmp_path / "o"
    # the hang after the last step only keeps a slow test machine from finishing first
    p = Parent(out, ["--model", model_dir, "--data", data, "--output", out, *ARGS],
               "hang@attempt=1,phase=end")
    p.wait_for(lambda: p.steps() >= k, f"step {k} (QPLAN_FAULT_SEED={seed})")
    child = p.kill9()
    assert gone(child, out), f"the training process {child} outlived qplan run (seed {seed})"
    assert lock_is_free(out)
    done_before = p.steps()
    rep, messages = resume(out)
    assert rep.status == "ok", (seed, rep.message)
    assert_each_step_once(rep)
    first = rep.attempts[0]
    assert first.ended == "killed" and first.exit_code is None and "supervising" in first.error
    assert rep.attempts[-1].ended == "ok" and len(rep.attempts) == 2
    # attempt 1's record is kept, not reused: its steps are all still there
    assert p.steps(1) == done_before
    assert any("lock left by `qplan run` pid" in m for m in messages)
    assert rep.message.startswith(f"done: {STEPS}/{STEPS} steps")


@pytest.mark.parametrize("failpoint, wait_for_checkpoint", [
    ("hang@attempt=1,phase=load", None),  # model loaded, no step done yet
    ("hang@attempt=1,step=4,phase=save", None),  # checkpoint 4 renamed, not marked COMPLETE
    ("hang@attempt=1,phase=end", STEPS),  # every step done and saved, adapter not yet
], ids=["load", "save", "end"])
def test_kill_9_of_qplan_run_at_exact_points(model_dir, data, tmp_path, failpoint,
                                             wait_for_checkpoint):
    out = tmp_path / "o"
    p = Parent(out, ["--model", model_dir, "--data", data, "--output", out, *ARGS], failpoint)
    p.wait_for(lambda: "QPLAN_FAILPOINTS: hanging" in p.text(), failpoint)
    if wait_for_checkpoint:
        assert CK.is_complete(out / "checkpoints" / CK.name_for(wait_for_checkpoint))
    child = p.kill9()
    assert gone(child, out) and lock_is_free(out)
    rep, _ = resume(out)
    assert rep.status == "ok", rep.message
    assert_each_step_once(rep)
    assert (out / "adapter_model.safetensors").is_file()


def test_a_second_run_on_one_folder_is_refused(model_dir, data, tmp_path):
    out = tmp_path / "o"
    p = Parent(out, ["--model", model_dir, "--data", data, "--output", out, *ARGS],
               "hang@attempt=1,step=2")
    p.wait_for(lambda: "QPLAN_FAILPOINTS: hanging" in p.text(), "the hang at step 2")
    h = p.holder()
    r = CliRunner().invoke(cli, ["run", "--resume", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "in use by another `qplan run`" in r.output and f"pid {h['pid']}" in r.output
    assert f"training process is pid {h['child_pid']}" in r.output
    assert f"kill {h['pid']}" in r.output
    r = CliRunner().invoke(cli, ["run", "--model", str(model_dir), "--data", str(data),
                                 "--output", str(out), *ARGS])
    assert r.exit_code == 2 and "already holds a run" in r.output
    child = p.kill9()
    assert gone(child, out) and lock_is_free(out)


def test_double_ctrl_c_says_that_no_checkpoint_was_saved(model_dir, data, tmp_path):
    out = tmp_path / "o"
    p = Parent(out, ["--model", model_dir, "--data", data, "--output", out, *ARGS],
               "hang@attempt=1,step=3")
    p.wait_for(lambda: "QPLAN_FAILPOINTS: hanging" in p.text(), "the hang at step 3")
    child = p.holder()["child_pid"]
    os.kill(child, signal.SIGINT)
    p.wait_for(lambda: "Ctrl-C again stops at once" in p.text(), "the first Ctrl-C")
    os.kill(child, signal.SIGINT)
    assert p.proc.wait(timeout=60) == 130
    text = p.text()
    assert "without saving a checkpoint" in text and "last checkpoint is step 2" in text
    assert "checkpoint saved. Continue" not in text
    assert "qplan run --resume" in text
    rep, _ = resume(out)
    assert rep.status == "ok"
    assert_each_step_once(rep)
    assert [a.ended for a in rep.attempts] == ["interrupted", "ok"]
