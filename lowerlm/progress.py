"""Progress on stderr for the CLI's long steps (loading, converting, tracing, lowering, measuring).

A step is one line, ``lowerlm: <what> … 12 s``; on a terminal its elapsed time is kept up to date once a second,
so minutes of work are never silent, and the line is closed with the step's time when the next step starts or the
work ends. Steps are shown only when stderr is a terminal and ``--quiet`` is not given: a log or a pipe gets the
results, not the ticking. Warnings and notes (``line``) always print, one line each, after closing an open step.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO


class Progress:
    """Call it with a message to start a step (``progress(msg)``: the ``progress=`` hook of ``lowerlm.load`` and
    ``lowerlm.compile_model``); ``done()`` ends the open step; ``line(text)`` prints a line that must be seen."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, interval: float = 1.0):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._lock = threading.Lock()
        self._msg: str | None = None
        self._start = 0.0
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_terminal(cls, quiet: bool = False) -> Progress:
        """On when stderr is a terminal and not ``quiet``."""
        try:
            tty = sys.stderr.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(enabled=tty and not quiet)

    def __call__(self, msg: str) -> None:
        self.step(msg)

    def step(self, msg: str) -> None:
        """Start a step (ending the one before)."""
        if not self.enabled:
            return
        self.done()
        with self._lock:
            self._stop = stop = threading.Event()
            self._msg, self._start = msg, time.monotonic()
            self._render(final=False)
        self._thread = threading.Thread(target=self._tick, args=(stop,), daemon=True)
        self._thread.start()

    def done(self) -> None:
        """End the open step, if any: its line is left with the time it took. Safe to call at any point of
        ``step`` (a Ctrl-C can land anywhere): the line is open as soon as ``_msg`` is set."""
        if self._stop is not None:
            self._stop.set()
        # bounded waits: a ticker stuck writing to a stalled terminal must not keep an error or Ctrl-C from exiting
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2)
        if not self._lock.acquire(timeout=2):
            self._msg, self._thread, self._stop = None, None, None
            return
        try:
            if self._msg is not None:
                self._render(final=True)
            self._msg, self._thread, self._stop = None, None, None
        finally:
            self._lock.release()

    def line(self, text: str) -> None:
        """Print one line to stderr whatever the settings (a warning, a note): after the open step's line."""
        self.done()
        with self._lock:
            print(text, file=self.stream, flush=True)

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            with self._lock:
                if not stop.is_set():
                    self._render(final=False)

    def _render(self, final: bool) -> None:
        elapsed = time.monotonic() - self._start
        shown = f"{elapsed:.1f} s" if final else f"{elapsed:.0f} s"
        width = shutil.get_terminal_size((100, 24)).columns
        text = f"lowerlm: {self._msg} … "
        room = max(width - len(shown) - 2, 20)
        if len(text) > room:  # a wrapped line cannot be rewritten in place
            text = text[:room - 2] + "… "
        self.stream.write(f"\r{text}{shown}\x1b[K" + ("\n" if final else ""))
        self.stream.flush()
