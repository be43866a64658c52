"""StopRequest and RankWatchdog in-process (the end-to-end runs are in test_reliability_resume/_ranks)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from mixtrain.faults import RankWatchdog, StopRequest


def test_first_signal_is_recorded_second_one_acts():
    # Python's own SIGINT handler, whatever this process inherited (a shell starts background
    # jobs with SIGINT ignored, and Python then keeps it ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with StopRequest() as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.requested and stop.signal == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):  # a second signal restores the defaults and acts
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert signal.getsignal(signal.SIGTERM) == before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_after_an_honoured_stop_further_signals_are_ignored():
    before = {s: signal.getsignal(s) for s in StopRequest.SIGNALS}
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in StopRequest.SIGNALS)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this test process lives on
    finally:
        for s, h in before.items():
            signal.signal(s, h)


class DictStore:
    """The two store operations the watchdog uses, like torch.distributed's TCPStore.add."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}
        self.lock = threading.Lock()
        self.broken = False

    def add(self, key: str, n: int) -> int:
        if self.broken:
            raise RuntimeError("Connection reset by peer")
        with self.lock:
            self.data[key] = self.data.get(key, 0) + n
            return self.data[key]


def _watch(store, rank, world, timeout, verdicts):
    return RankWatchdog(store, rank, world, timeout, interval=0.05, on_dead=verdicts.append).start()


def test_watchdog_names_the_silent_rank_and_only_it():
    store, verdicts = DictStore(), []
    dogs = [_watch(store, r, 3, 0.6, verdicts) for r in range(3)]
    time.sleep(0.8)
    assert verdicts == []  # all alive: nobody is reported
    dogs[2].stop()  # rank 2 falls silent
    t0 = time.monotonic()
    while len(verdicts) < 2 and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    assert 0.25 < time.monotonic() - t0 < 2
    assert sorted(v.split(" stopped responding")[0] for v in verdicts) == ["rank 2", "rank 2"]
    assert any("rank 0 exits instead of waiting" in v for v in verdicts)
    for d in dogs[:2]:
        d.stop()


def test_watchdog_reports_a_store_that_stops_answering():
    store, verdicts = DictStore(), []
    dog = _watch(store, 1, 2, 0.4, verdicts)
    peer = _watch(store, 0, 2, 0.4, [])
    time.sleep(0.3)
    store.broken = True
    dog._thread.join(timeout=5)
    peer.stop()
    (v,) = verdicts
    assert v.startswith("the rendezvous store (hosted by rank 0 or the launcher) stopped answering for ")
    assert "RuntimeError: Connection reset by peer" in v and "rank 0 is missing" in v


def test_watchdog_forgives_a_store_outage_shorter_than_the_window():
    store, verdicts = DictStore(), []
    dogs = [_watch(store, r, 2, 0.8, verdicts) for r in range(2)]
    time.sleep(0.2)
    store.broken = True  # both ranks lose the store for most of the window...
    time.sleep(0.3)
    store.broken = False  # ...and get it back: neither rank is declared missing
    time.sleep(0.6)
    for d in dogs:
        d.stop()
    assert verdicts == []
