"""Starting a training process that cannot outlive its parent, and waiting for it.

The child is tied to ``qplan run`` twice over: on Linux the kernel sends it SIGKILL when
its parent dies (``prctl(PR_SET_PDEATHSIG)``), and everywhere a thread in the child reads
a pipe whose other end only the parent holds: end of file means the parent is gone, and
the child kills itself. It also inherits the run folder's lock, so the folder stays
locked until the child, too, has ended. No torch here.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

PARENT_PID_ENV = "QPLAN_PARENT_PID"
PARENT_FD_ENV = "QPLAN_PARENT_FD"
PR_SET_PDEATHSIG = 1


def start(spec_path: Path, env: dict[str, str], keep_fds: tuple[int, ...] = (),
          stdout: int | None = None) -> subprocess.Popen:
    """Start ``python -m qplan.runner.child spec_path``; ``keep_fds`` (the lock) are
    inherited, ``stdout`` is where it prints (None: here). The parent's end of the
    life-line pipe lives on ``proc.qplan_lifeline``."""
    r, w = os.pipe()
    env = {**env, PARENT_PID_ENV: str(os.getpid()), PARENT_FD_ENV: str(r)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "qplan.runner.child", str(spec_path)],
                                env=env, pass_fds=(r, *keep_fds), stdout=stdout)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    proc.qplan_lifeline = w  # type: ignore[attr-defined]
    return proc


def wait(proc: subprocess.Popen) -> int:
    """Wait for the child; forward SIGTERM to it, and let Ctrl-C reach it (same process
    group: it finishes the step and saves). Closes the life-line afterwards."""
    try:
        if threading.current_thread() is not threading.main_thread():
            return proc.wait()

        def on_term(signum, _frame):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        def on_int(signum, _frame):
            pass  # the child got the same Ctrl-C and stops cleanly

        old = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_term),
                                                   (signal.SIGINT, on_int))}
        try:
            return proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        os.close(proc.qplan_lifeline)  # type: ignore[attr-defined]


def start_ranks(spec_paths: list[Path], env: dict[str, str], keep_fds: tuple[int, ...] = (),
                stdout: int | None = None) -> list[subprocess.Popen]:
    """One training process per spec, as the ranks of one data-parallel group
    (``torch.distributed``'s environment: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT on a free local port)."""
    n = len(spec_paths)
    base = {**env, "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}
    # the cores shared out (torch would take them all in each process)
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    procs: list[subprocess.Popen] = []
    try:
        for k, path in enumerate(spec_paths):
            procs.append(start(path, {**base, "RANK": str(k), "LOCAL_RANK": str(k)}, keep_fds,
                               stdout=stdout if k == 0 else subprocess.DEVNULL))
    except BaseException:
        for q in procs:
            q.kill()
            os.close(q.qplan_lifeline)  # type: ignore[attr-defined]
        raise
    return procs


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_GRACE_S = 5.0


def _result_says_failed(path: Path | None) -> bool:
    """Whether a rank's result file (written atomically, just before it exits) says it
    ended other than well: only its status is read (run._status checks the whole file, once
    the ranks have ended)."""
    import json

    if path is None or not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("status") != "ok"
    except (OSError, ValueError, AttributeError):
        return False


def wait_ranks(procs: list[subprocess.Popen],
               results: list[Path] | None = None) -> tuple[list[int], int | None]:
    """Wait for every rank. When one ends badly the others are given RANK_GRACE_S to end
    (they wait for it in a collective), then killed. A rank ends badly when its process
    exits non-zero or, with ``results`` (each rank's result file), as soon as its result
    says so, should its process linger (its teardown could wait on collectives its peers
    will never join). Found on two H200s: rank 1 wrote its out-of-memory result and ended,
    rank 0 waited in an NCCL collective (which, unlike gloo's, does not fail when a peer
    goes), and this loop never looked at rank 1 again: both runs hung. Returns the exit
    codes (a rank killed here: -9, whatever its result says) and the rank that ended badly
    first (None when all ended well). Ctrl-C and SIGTERM reach every rank (same process
    group; SIGTERM is forwarded)."""
    import time

    def on_term(signum, _frame):
        for q in procs:
            if q.poll() is None:
                q.send_signal(signal.SIGTERM)

    main = threading.current_thread() is threading.main_thread()
    old = ({s: signal.signal(s, h) for s, h in ((signal.SIGTERM, on_term),
                                                (signal.SIGINT, lambda *_: None))}
           if main else {})
    first: int | None = None
    try:
        deadline = None
        # poll every rank each turn: any() over the polls stopped at the first rank still
        # running and never saw a later one's end (the H200 hang above)
        while [q.poll() for q in procs].count(None):
            if first is None:
                first = next((k for k, q in enumerate(procs)
                              if q.returncode not in (None, 0)
                              or (q.returncode is None and results is not None
                                  and _result_says_failed(results[k]))), None)
                if first is not None:
                    deadline = time.monotonic() + RANK_GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
            time.sleep(0.05)
        if first is None:
            first = next((k for k, q in enumerate(procs) if q.returncode != 0), None)
        return [q.returncode for q in procs], first
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for q in procs:
            os.close(q.qplan_lifeline)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# in the child
def rank() -> int:
    """This training process's data-parallel rank (:func:`start_ranks`), 0 when alone."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Its GPU on this host (:func:`start_ranks`), 0 when alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the pipe below still watches


def _watch(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    _die()  # end of file: the parent closed it or died


def watch_parent(environ=None) -> bool:
    """In the training process: die with the parent. False when started without one
    (by hand, for debugging)."""
    environ = os.environ if environ is None else environ
    pid = int(environ.get(PARENT_PID_ENV) or 0)
    if not pid:
        return False
    _set_parent_death_signal()
    if os.getppid() != pid:  # the parent died before the death signal was armed
        _die()
    fd = environ.get(PARENT_FD_ENV)
    if fd:
        threading.Thread(target=_watch, args=(int(fd),), daemon=True,
                         name="qplan-parent-watch").start()
    return True
