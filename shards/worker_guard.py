"""Loader worker processes that cannot outlive, hang or litter their trainer.

The faults, each seen in real runs (issues #13, #20):

* **A worker dies** (the OOM killer, a segfault in a decoder) while its DALI pipeline is idle. DALI's pool then
  deadlocks the next ``run()``: its task queue's ``multiprocessing.Condition.notify`` waits for the dead
  sleeper to acknowledge, forever. ``dead_workers`` reads the workers' exit codes without blocking, so the
  loader checks before every ``run()`` and restarts the pipeline; ``RunWatchdog`` covers a death *during* a
  ``run()`` by interrupting the blocked call.
* **The trainer is SIGKILLed**: its workers must go too (``die_with_parent``: Linux's parent-death signal, set
  in each forked worker at birth by ``children_die_with_me``, in a spawned one at its first task).
* **A DataLoader worker dies** (``backend="torch"``). torch's SIGCHLD handler would raise "DataLoader worker
  ... is killed" in the main thread wherever it happens to be, usually inside the training step, where nothing
  can recover; ``detach_from_sigchld`` leaves the death to the loader instead, which reads the exit codes before
  every batch (the DataLoader's own liveness check covers a death while it waits, within 5 s) and restarts the
  workers at the same batch.
* **Plan folders** (``/tmp/usjepa-dali-<pid>-*``) of a killed trainer stay behind: the next loader removes
  those whose owner process is gone (``remove_stale_plan_dirs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PLAN_PREFIX = "usjepa-dali-"
_PLAN_RE = re.compile(rf"^{PLAN_PREFIX}(\d+)-")
_PR_SET_PDEATHSIG = 1


class LoaderWorkerError(RuntimeError):
    """A loader worker died and could not be replaced; the run stops (its last checkpoint is intact)."""


class WorkerDied(RuntimeError):
    """Raised inside the loader when a pipeline worker is found dead (the pipeline is then rebuilt)."""

    def __init__(self, dead: list[tuple[int, int]]):
        self.dead = dead
        super().__init__("; ".join(f"worker pid {pid} {describe_exit(code)}" for pid, code in dead))


def describe_exit(code: int | None) -> str:
    """multiprocessing exit code → words: -9 → 'was killed by SIGKILL', 3 → 'exited with status 3'."""
    if code is None:
        return "is still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def die_with_parent(parent_pid: int) -> None:
    """In a worker: have the kernel SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``), and exit
    now if the parent is already gone (it may have died before the call)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


_FORKING_FOR: int | None = None  # pid of the process while it forks loader workers (``children_die_with_me``)
_AT_FORK_REGISTERED = False


def _arm_forked_child() -> None:
    if _FORKING_FOR is not None:
        die_with_parent(_FORKING_FOR)


@contextlib.contextmanager
def children_die_with_me():
    """Processes forked inside this block are armed with ``die_with_parent`` at birth, before they run any task:
    a loader's workers start when it is built, and validation's sit idle until the first validation, so arming
    at the first task would let them outlive a SIGKILLed trainer."""
    global _FORKING_FOR, _AT_FORK_REGISTERED
    if not _AT_FORK_REGISTERED:
        os.register_at_fork(after_in_child=_arm_forked_child)
        _AT_FORK_REGISTERED = True
    _FORKING_FOR = os.getpid()
    try:
        yield
    finally:
        _FORKING_FOR = None


@contextlib.contextmanager
def spawn_without_main():
    """Children spawned inside this block do not re-import the parent's ``__main__``, as spawn otherwise does
    (for a trainer: torch, CUDA libraries, the models; seconds per child and a torch import the DALI workers
    never use; their callable is imported from usjepa by the unpickling)."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if main is not None and k in main.__dict__}
    if main is not None:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


def pipeline_workers(pipe) -> list:
    """The ``multiprocessing.Process`` objects of a built DALI pipeline's Python workers ([] before build)."""
    pool = getattr(pipe, "_py_pool", None)  # DALI 1.x/2.x: Pipeline._py_pool.pool._processes
    return list(getattr(getattr(pool, "pool", None), "_processes", []) or [])


def exited(processes, wait_s: float = 0.0) -> list[tuple[int, int]]:
    """(pid, exit code) of every ``multiprocessing.Process`` in ``processes`` that has exited; with ``wait_s`` > 0,
    waits up to that long for one to exit (a worker killed a moment ago may not be reapable yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(p.pid, p.exitcode) for p in processes if p.exitcode is not None]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.02)


def dead_workers(pipe) -> list[tuple[int, int]]:
    """(pid, exit code) of every worker of ``pipe`` that has exited; never blocks."""
    return exited(pipeline_workers(pipe))


def dataloader_workers(batches) -> list:
    """The worker processes of a live ``DataLoader`` iterator ([] without workers or after its shutdown)."""
    return list(getattr(batches, "_workers", None) or [])


def detach_from_sigchld(batches) -> None:
    """Unregister a ``DataLoader`` iterator's workers from torch's SIGCHLD handler (see the module docstring)."""
    if getattr(batches, "_worker_pids_set", False):
        from torch.utils.data import _utils

        _utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False  # its shutdown would unregister them again, and fail


def stop_dataloader(batches) -> None:
    """Stop a ``DataLoader`` iterator's workers now (the dead ones included) rather than at garbage collection."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class RunWatchdog:
    """While a thread is inside a pipeline call, a watchdog thread polls the workers every ``poll_s``; when one
    is dead and the call is still blocked ``grace_s`` later, the call is interrupted with ``WorkerDied`` (a real
    signal, SIGUSR1, breaks the blocked semaphore wait). Off the main thread, where Python takes no signals, or
    when the call is still blocked ``hard_s`` after the signal, the process stops with a clear message instead
    of hanging (its checkpoints are intact). One per process (``run_watchdog()``)."""

    def __init__(self, poll_s: float = 0.2, grace_s: float = 2.0, hard_s: float = 10.0):
        self.poll_s, self.grace_s, self.hard_s = poll_s, grace_s, hard_s
        self._pipe = None
        self._signalled = 0.0
        self._caller = None
        self._since = 0.0
        self._dead: list[tuple[int, int]] = []
        self._lock = threading.RLock()  # re-entrant: the signal handler runs on the main thread, maybe inside _leave
        self._previous = None
        self._handler = threading.current_thread() is threading.main_thread()
        if self._handler:
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
        threading.Thread(target=self._watch, name="usjepa-loader-watchdog", daemon=True).start()

    def guard(self, pipe) -> "_Guarded":
        """``with run_watchdog().guard(pipe): pipe.run()``; raises ``WorkerDied`` at once if one is dead."""
        dead = dead_workers(pipe)
        if dead:
            raise WorkerDied(dead)
        return _Guarded(self, pipe)

    def _enter(self, pipe) -> None:
        with self._lock:
            self._pipe, self._caller, self._since, self._dead = pipe, threading.get_ident(), time.monotonic(), []

    def _leave(self) -> None:
        with self._lock:
            self._pipe, self._dead = None, []

    def _on_signal(self, signum, frame):
        with self._lock:  # only while the call is still guarded: it may have returned since the watchdog looked
            dead = self._dead if self._pipe is not None else []
        if dead:
            raise WorkerDied(dead)
        if callable(self._previous):
            self._previous(signum, frame)

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while True:
            time.sleep(self.poll_s)
            with self._lock:
                pipe, caller, now = self._pipe, self._caller, time.monotonic()
                if pipe is None or now - self._since < self.grace_s:
                    continue
                if self._dead and now - self._signalled < self.hard_s:
                    continue
                dead = self._dead or dead_workers(pipe)
                if not dead:
                    continue
                first, self._dead, self._signalled = not self._dead, dead, now
            if first and self._handler and caller == main:
                signal.pthread_kill(main, signal.SIGUSR1)
            else:  # not interruptible (another thread, or the signal did not break the wait): never hang
                log.error("loader %s while the pipeline waited on it; stopping this process", WorkerDied(dead))
                logging.shutdown()
                os._exit(1)


class _Guarded:
    def __init__(self, watchdog: RunWatchdog, pipe):
        self.watchdog, self.pipe = watchdog, pipe

    def __enter__(self):
        self.watchdog._enter(self.pipe)

    def __exit__(self, *exc) -> bool:
        self.watchdog._leave()
        return False


_WATCHDOG: RunWatchdog | None = None


def run_watchdog() -> RunWatchdog:
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = RunWatchdog()
    return _WATCHDOG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_plan_dirs(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Delete ``usjepa-dali-<pid>-*`` folders whose owner process no longer exists; returns what was removed."""
    removed = []
    root = Path(tmp or tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for p in root.iterdir():
            m = _PLAN_RE.match(p.name)
            if m and p.is_dir() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if removed:
        log.info("removed %d plan folder(s) left by killed runs: %s", len(removed), [str(p) for p in removed])
    return removed


def make_plan_dir(tmp: str | os.PathLike | None = None) -> str:
    """A fresh plan folder named after this process (so a later run can tell it is stale), after removing the
    stale ones."""
    remove_stale_plan_dirs(tmp)
    return tempfile.mkdtemp(prefix=f"{PLAN_PREFIX}{os.getpid()}-", dir=tmp)
