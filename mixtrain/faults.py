"""Surviving faults: preemption signals, a wall-clock limit, and a rank that stops responding.

* :class:`StopRequest` turns the first ``SIGTERM`` / ``SIGINT`` into a request the loop honours at
  the end of the current optimizer step (checkpoint, message, exit code
  :data:`EXIT_PREEMPTED`); a second signal falls back to the default action (interrupt now).
* :func:`parse_duration` reads ``train.time_limit`` (``"3h50m"``, ``"90s"``, ``"45m"``, ``"1d2h"``).
* :class:`RankWatchdog`: every rank bumps a heartbeat counter in the rendezvous key-value store
  once a second from a daemon thread, and watches the others' counters. A rank whose counter has
  not moved for ``timeout / 2`` seconds (or a store that no longer answers) is reported by rank
  number and the process exits with :data:`EXIT_DEAD_RANK`, even while the main thread is blocked
  inside a collective (gloo waits release the GIL). The process-group timeout
  (``train.dist_timeout``) bounds the collectives themselves.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = [
    "EXIT_DEAD_RANK",
    "EXIT_PREEMPTED",
    "RankWatchdog",
    "StopRequest",
    "parse_duration",
]

log = logging.getLogger("mixtrain")

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by SIGTERM/SIGINT or ``train.time_limit`` after writing a
checkpoint (``EX_TEMPFAIL`` of sysexits.h: run the same command again to continue)."""

EXIT_DEAD_RANK = 69
"""Exit code when another rank stopped responding (``EX_UNAVAILABLE``); resume with the same
command once every node is back."""

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str, where: str = "duration") -> float:
    """Seconds in ``text``: one or more of ``<int>d``, ``<int>h``, ``<int>m``, ``<number>s`` in
    this order (``"3h50m"``, ``"90s"``, ``"1d"``, ``"2m30s"``); the total must be > 0.

    Raises:
        ValueError: anything else (the message names ``where``, the value and the format).
    """
    if isinstance(text, str):
        m = _DURATION.fullmatch(text.strip())
        if m and text.strip() and any(g is not None for g in m.groups()):
            d, h, mi, s = m.groups()
            total = int(d or 0) * 86400 + int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)
            if total > 0:
                return total
    raise ValueError(
        f"{where}: got {text!r}, expected a positive duration such as '3h50m', '45m', '90s' or '1d2h' "
        "(units d, h, m, s in that order)"
    )


class StopRequest:
    """Record SIGTERM/SIGINT instead of dying; the loop polls :attr:`requested` once per step.

    Use as a context manager (handlers are installed only in the main thread and restored on
    exit). A second signal restores the default handlers and re-delivers itself. Once a stop was
    requested, leaving the context ignores further SIGTERM/SIGINT instead: the process is on its
    way out after its checkpoint, and a launcher that signals every rank when one exits (torchrun)
    must not turn the documented exit code into a kill.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A stop signal arrived."""
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # second signal: the user insists
            self.restore()
            signal.raise_signal(signum)
            return
        self.signal = signum
        # logging from a signal handler can deadlock on the handler's lock: write directly
        sys.stderr.write(f"[mixtrain] {signal.Signals(signum).name} received: finishing the current "
                         "step, then writing a checkpoint (send it again to stop now)\n")
        sys.stderr.flush()

    def __enter__(self) -> StopRequest:  # noqa: PYI034 - final class in practice
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __exit__(self, *exc: object) -> None:
        stopping = self.requested and bool(self._old)
        self.restore()
        if stopping:
            for s in self.SIGNALS:
                signal.signal(s, signal.SIG_IGN)


class RankWatchdog:
    """Heartbeats through the rendezvous store; names a silent rank and exits the process.

    Args:
        store: a ``torch.distributed`` store shared by all ranks (``add`` must not block).
        rank, world_size: this process and the group size.
        timeout: seconds (``train.dist_timeout``); a rank silent for ``timeout / 2`` is missing.
        interval: seconds between heartbeats.
        on_dead: called with the message instead of exiting (tests).
    """

    def __init__(self, store: Any, rank: int, world_size: int, timeout: float, *, interval: float = 1.0,
                 on_dead: Callable[[str], None] | None = None, prefix: str = "mixtrain/heartbeat") -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.silence = max(2 * interval, timeout / 2)
        self.interval = interval
        self.on_dead = on_dead
        self.prefix = prefix
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mixtrain-rank-watchdog", daemon=True)

    def start(self) -> RankWatchdog:
        """Start the daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the last heartbeat stays in the store)."""
        self._stop.set()
        self._thread.join(timeout=5 * self.interval)

    def join_verdict(self) -> None:
        """Wait (up to the silence window) for the watchdog to declare a missing rank: called when
        a collective failed, so the error names the rank rather than a socket."""
        self._thread.join(timeout=self.silence + 3 * self.interval)

    def _dead(self, msg: str) -> None:
        if self._stop.is_set():
            return
        if self.on_dead is not None:
            self.on_dead(msg)
            return
        sys.stderr.write(f"error: {msg}\n")
        sys.stderr.flush()
        os._exit(EXIT_DEAD_RANK)

    def _run(self) -> None:
        last: dict[int, int] = {}
        seen: dict[int, float] = {}
        start = time.monotonic()
        store_ok, store_failed = start, False
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self.store.add(f"{self.prefix}/{self.rank}", 1)
                for r in range(self.world_size):
                    if r == self.rank:
                        continue
                    v = int(self.store.add(f"{self.prefix}/{r}", 0))
                    # a new heartbeat, or the store is back after failing: that silence was the
                    # store's, not the rank's
                    if v != last.get(r) or store_failed:
                        last[r], seen[r] = v, now
                store_ok, store_failed = now, False
            except Exception as e:  # noqa: BLE001 - a store that fails is the symptom we watch for
                store_failed = True
                if now - store_ok > self.silence:
                    self._dead(f"the rendezvous store (hosted by rank 0 or the launcher) stopped answering for "
                               f"{now - store_ok:.0f}s ({type(e).__name__}: {e}); rank 0 is missing. Run the same "
                               "command to resume from the last checkpoint")
                    return
                # Heartbeats cannot be read while the store fails: judge the store, not the ranks.
                self._stop.wait(self.interval)
                continue
            missing = [r for r in range(self.world_size)
                       if r != self.rank and now - seen.get(r, start) > self.silence]
            if missing:
                names = ", ".join(str(r) for r in missing)
                self._dead(f"rank {names} stopped responding (no heartbeat for {self.silence:.0f}s; killed, hung "
                           f"or its node is down); rank {self.rank} exits instead of waiting. Run the same command "
                           "to resume from the last checkpoint")
                return
            self._stop.wait(self.interval)


def dist_timeout(seconds: float) -> timedelta:
    """``timedelta`` for the process-group timeout."""
    return timedelta(seconds=float(seconds))
