"""How a job ends on a signal. SIGTERM, SIGUSR1 (SLURM's warning before a time limit)
and SIGINT (Ctrl-C) in the step loop ask for a checkpoint at the next step boundary and
exit 3 (``Preempted``); during start-up they end the job at once (``Interrupted``, exit
128 + signal number, status failed: no step of this attempt was lost). A second SIGINT
more than ``ABORT_AFTER_S`` after the first aborts (KeyboardInterrupt, exit 130), for a
save that takes too long; other repeats change nothing (under torchrun one Ctrl-C can
reach a worker twice, from the terminal and forwarded by the agent).

Under torchrun the workers also die with their agent: its start-up sets
``PR_SET_PDEATHSIG`` (SIGKILL), so a SIGKILLed or OOM-killed agent leaves no orphan
holding the run dir's lock or a GPU."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

EXIT_PREEMPTED = 3  # stopped on a signal after a checkpoint; rerun to resume
ABORT_AFTER_S = 5.0


class Preempted(Exception):
    """Raised after the checkpoint that a signal asked for is complete."""

    def __init__(self, step: int, signal_name: str = ""):
        super().__init__(f"preempted at step {step}" + (f" on {signal_name}" if signal_name else ""))
        self.step, self.signal = step, signal_name


class Interrupted(BaseException):
    """A signal before the step loop: nothing to checkpoint, end now. A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, name: str, signum: int):
        super().__init__(f"{name} during start-up (before the first step of this attempt; no checkpoint written)")
        self.name, self.exit_code = name, 128 + signum


class SignalHandler:
    """``phase``: "setup" (a signal raises ``Interrupted``), "loop" (it sets ``received``
    for the next step boundary: "loop" while a step runs, "busy" between steps (evaluation,
    logging, a periodic save), "stopping" once the loop acts on it) or "done" (noted,
    nothing more: the job is finishing). With ``stop_timeout_s`` set, a stop signal that
    the steps do not bring to a boundary within that many seconds of "loop" phase ends the
    job (exit 128 + signal, status failed): the watchdog ends the process for a start-up
    signal the main thread cannot hear, an aborting second SIGINT, and this deadline.

    Python runs signal handlers on the main thread between bytecodes, so a main thread
    blocked in C++ (waiting for a peer in the process-group rendezvous or a collective)
    would not see them. A watchdog thread learns of every signal at once (CPython's
    wakeup fd): when the main thread has not ended the process ``GRACE_S`` after a
    start-up signal, or after an aborting second SIGINT, the watchdog writes the status
    (``report``) and ends the process itself with the same exit code."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
    GRACE_S = 3.0

    def __init__(self, report: Optional[Callable] = None):
        self._loop_s, self._loop_from, self._phase = 0.0, 0.0, "setup"  # the phase: a property
        self._phase_lock = threading.Lock()  # the watchdog reads the three together
        self.received, self.name, self._first_at, self._old = False, "", 0.0, {}
        self.report = report  # report(state, exit_code, **fields): status.json (rank 0)
        self.exiting = False  # set by the entry point once it handles the stop: no forced exit
        # checkpoint.stop_timeout_s: seconds of "loop" phase (steps running) a stop signal may
        # wait for the next step boundary ("busy" between steps does not count).
        self.stop_timeout_s: Optional[float] = None
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (embedded use): leave signals alone
                pass
        self._handled = {int(sig) for sig in self._old}
        self._pipe = None
        if self._old:
            r, w = os.pipe()
            os.set_blocking(w, False)
            try:
                self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            except ValueError:
                os.close(r), os.close(w)
            else:
                self._pipe = (r, w)
                threading.Thread(target=self._watch, args=(r,), name="signal-watchdog", daemon=True).start()

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        with self._phase_lock:
            now = time.monotonic()
            if self._phase == "loop":
                self._loop_s += now - self._loop_from
            self._loop_from, self._phase = now, value

    def loop_seconds(self) -> float:
        """Seconds spent in "loop" phase so far (steps running), counted at each change of
        phase: the watchdog's deadline counts these, not time between steps."""
        with self._phase_lock:
            phase, since, total = self._phase, self._loop_from, self._loop_s
        return total + (time.monotonic() - since if phase == "loop" else 0.0)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.phase == "setup":
            raise Interrupted(name, signum)
        if not self.received:
            self.received, self.name, self._first_at = True, name, now
        elif signum == signal.SIGINT and self.phase in ("loop", "busy", "stopping") \
                and now - self._first_at > ABORT_AFTER_S:
            raise KeyboardInterrupt(f"second SIGINT {now - self._first_at:.0f} s after the first: aborting")

    def _watch(self, fd: int) -> None:
        first = None  # the watchdog's own record: the main thread may be blocked
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in self._handled:  # the wakeup fd also hears others' handlers (SIGCHLD)
                    continue
                now = time.monotonic()
                if self.phase == "setup":
                    self._force_exit(signum, 128 + signum)
                elif self.phase in ("loop", "busy", "stopping"):
                    if first is None:
                        first = now
                        if self.stop_timeout_s is not None and self.phase != "stopping":
                            threading.Thread(target=self._deadline, args=(signum,), name="stop-deadline",
                                             daemon=True).start()
                    elif signum == signal.SIGINT and now - first > ABORT_AFTER_S:
                        self._force_exit(signum, 130)

    def _deadline(self, signum: int, tick: float = 0.25) -> None:
        """A stop signal in the step loop: the job saves at the next step boundary. When the
        steps do not reach it within ``stop_timeout_s`` (a data read that never ends, a
        collective waiting for a peer that left), end the job rather than wait for ever."""
        start = self.loop_seconds()
        while self.loop_seconds() - start < self.stop_timeout_s:
            time.sleep(tick)
            if self.phase not in ("loop", "busy"):  # reached the boundary (stopping), or done
                return
        if self.phase != "loop":  # the step ended meanwhile: the boundary is being reached
            return
        name = signal.Signals(signum).name
        self._force_exit(signum, 128 + signum, f"{name}: no step boundary within checkpoint.stop_timeout_s="
                         f"{self.stop_timeout_s:g} s of training (the step was stuck: a data read that does not "
                         "end, a collective waiting for a peer); ended without a checkpoint, by the signal watchdog",
                         grace=0.0)

    def _force_exit(self, signum: int, code: int, msg: Optional[str] = None, grace: Optional[float] = None) -> None:
        time.sleep(self.GRACE_S if grace is None else grace)  # the main thread unwinds and exits meanwhile
        deadline = time.monotonic() + 30.0
        while self.exiting and time.monotonic() < deadline:  # it is on its way out: let it finish
            time.sleep(0.1)
        if self._pipe is None:  # restored: the job ended by itself
            return
        name = signal.Signals(signum).name
        msg = msg or (f"{name}: the main thread did not stop within {self.GRACE_S:.0f} s (it was in native code that "
                      "does not run Python's signal handlers: waiting for a peer or a collective, tokenizer "
                      "training, ...); ended by the signal watchdog")
        print(f"stopped: {msg}", file=sys.stderr, flush=True)
        if self.report is not None:
            try:
                self.report("failed", code, step=None, error=f"Interrupted: {msg}")
            except Exception as e:  # noqa: BLE001 (exiting anyway, but say the status is stale)
                try:
                    print(f"stopped: could not report the failure ({type(e).__name__}: {e})", file=sys.stderr,
                          flush=True)
                except Exception:  # noqa: BLE001
                    pass
        os._exit(code)

    def __getstate__(self) -> dict:
        # A copy in another process (cloudpickle carries a launcher job's globals by value)
        # owns none of this process's signal handlers and file descriptors.
        return {"received": False, "name": "", "_phase": "setup", "_loop_s": 0.0, "_loop_from": 0.0,
                "_first_at": 0.0, "_old": {}, "report": None, "exiting": False, "_handled": set(), "_pipe": None,
                "stop_timeout_s": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._phase_lock = threading.Lock()  # a lock is not carried: a fresh one

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


def die_with_parent() -> None:
    """Under torchrun: SIGKILL this process when the agent that started it dies. torchrun
    starts workers in sessions of their own, so nothing else ends them with it."""
    if not os.environ.get("TORCHELASTIC_RUN_ID") or not hasattr(os, "getppid"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the agent died before the prctl
        os._exit(1)
