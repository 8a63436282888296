"""Progress of long model work (a first GGUF conversion takes tens of seconds): never silence.

A :class:`LoadProgress` names the phase the loader is in. It logs a line when a phase starts, then a heartbeat every
few seconds while the phase lasts (with a measure of how far it got, when the phase has one), and it keeps the
current phase as text, which the server reports to clients while they wait (ModelInfo.state_detail).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("linlens.models")

#: Seconds between heartbeat lines while one phase lasts.
HEARTBEAT_SECONDS = 5.0


class LoadProgress:
    """The phases of loading one model. Thread-safe; ``on_change`` sees the new description of every phase."""

    def __init__(
        self,
        name: str,
        *,
        interval: float = HEARTBEAT_SECONDS,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.interval = interval
        self.on_change = on_change
        self._lock = threading.Lock()
        self._phase = ""
        self._measure: Callable[[], str] | None = None
        self._phase_started = time.monotonic()
        self.started = time.monotonic()

    @property
    def current(self) -> str:
        """What is happening now, e.g. "converting the GGUF file to float32 (12 s)"; empty between phases."""
        with self._lock:
            if not self._phase:
                return ""
            elapsed = time.monotonic() - self._phase_started
            measure = self._measure() if self._measure is not None else ""
            return f"{self._phase} ({elapsed:.0f} s{', ' + measure if measure else ''})"

    @contextlib.contextmanager
    def phase(self, what: str, measure: Callable[[], str] | None = None) -> Iterator[None]:
        """Run a phase: a log line now, a heartbeat every ``interval`` seconds until it ends.

        ``measure`` tells how far the phase got (e.g. "310 of 540 MB written"); it is read for each heartbeat.
        """
        with self._lock:
            previous = (self._phase, self._measure, self._phase_started)
            self._phase, self._measure, self._phase_started = what, measure, time.monotonic()
        log.info("model %s: %s", self.name, what)
        self._changed()
        done = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(done,), name=f"linlens-progress-{self.name}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join()
            with self._lock:
                self._phase, self._measure, self._phase_started = previous
            self._changed()

    def _heartbeat(self, done: threading.Event) -> None:
        while not done.wait(self.interval):
            log.info("model %s: still %s", self.name, self.current)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change(self.current)
            except Exception:  # a listener must never break loading
                log.exception("load progress listener failed")


def disk_usage(folder: Callable[[], object], expected_bytes: int) -> Callable[[], str]:
    """A phase measure: megabytes written under ``folder()`` so far, of about ``expected_bytes``."""
    from pathlib import Path

    def measure() -> str:
        root = Path(str(folder()))
        try:
            written = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        except OSError:
            return ""
        return f"{written / 1e6:.0f} of ~{expected_bytes / 1e6:.0f} MB written"

    return measure


__all__ = ["HEARTBEAT_SECONDS", "LoadProgress", "disk_usage"]
