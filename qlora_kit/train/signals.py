"""Stopping a run by signal: the first Ctrl-C (or SIGTERM) stops after the step with a checkpoint, a second at once."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from qlora_kit.train.dashboard import Dashboard


class StopOnSignal:
    """While training: the first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step, with a
    checkpoint; a second one stops at once (checkpoints are written atomically, so the last one stays whole).

    Python runs signal handlers only between bytecodes, so a step stuck in one long C call (attention over a huge
    sequence) would not hear either. A watcher thread sees every signal as it arrives (set_wakeup_fd); after the
    second, if the main thread has not stopped within GRACE_S, it ends the process as the second signal asks,
    which is as safe as a kill: the last checkpoint stays whole and resumes exactly."""

    GRACE_S = 3.0

    def __init__(self, dashboard: Dashboard, stopped_at_once=lambda: "Stopped at once."):
        self.dashboard, self.stopped_at_once, self.received, self.previous = dashboard, stopped_at_once, None, {}
        self.done, self.wakeup = threading.Event(), None

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python only delivers signals to the main thread
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            read, self.wakeup = os.pipe()
            os.set_blocking(self.wakeup, False)
            self.previous_wakeup = signal.set_wakeup_fd(self.wakeup, warn_on_full_buffer=False)
            threading.Thread(target=self._watch, args=(read,), daemon=True, name="qlora-kit-signals").start()
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        self.dashboard.note(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again to stop at once)."
        )

    def _watch(self, read: int) -> None:
        seen = []
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while not self.done.is_set():
                seen += [byte for byte in pipe.read(16) if byte in (signal.SIGINT, signal.SIGTERM)]
                if len(seen) >= 2 and not self.done.wait(self.GRACE_S):
                    self.dashboard.restore_terminal()
                    os.write(
                        2, f"\n{self.stopped_at_once()} (A long operation did not return to stop by itself.)\n".encode()
                    )
                    os._exit(128 + seen[-1])  # as a shell reports the signal that ended a process

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.wakeup is not None:
            signal.set_wakeup_fd(self.previous_wakeup)
            self.done.set()
            with contextlib.suppress(OSError):  # after a second signal the watcher may have ended already: EPIPE
                os.write(self.wakeup, b"\0")  # wakes the watcher, which then ends
            os.close(self.wakeup)
