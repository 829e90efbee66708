"""SIGTERM/SIGINT during training: finish the step, checkpoint, stop (the CLI exits 128 + signal)."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop checks after each step (then checkpoints and stops).

    A second SIGINT (Ctrl-C twice) interrupts at once. Other repeats are ignored: launchers such as
    torchrun forward a SIGTERM to workers that already got the terminal's SIGINT.
    """

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        elif signum == signal.SIGINT and self.received == signal.SIGINT:
            self.__exit__()
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGTERM).name
