"""The buffered sender on its own, against a store that fails and then comes back: put never
blocks, nothing is lost or reordered across an outage, refused items do not block the queue,
memory stays bounded, and a closed sender gives up on a store that never returns.

The store here is a plain object with a `deliver(batch)` method (no MLflow involved): the sender
is generic, MLflow is only one of its users (raybooth.platform.mlflow.runs).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from raybooth.platform.mlflow.sender import Sender


class Refused(Exception):
    """What the fake store raises for an item it will never take (like an HTTP 4xx)."""


class FakeStore:
    """A store that can be taken down and brought back; it records what it took, in order."""

    def __init__(self, refuse: set = frozenset()):
        self.up = True
        self.received: list = []
        self.calls = 0
        self.refuse = set(refuse)
        self.lock = threading.Lock()

    def deliver(self, batch: list) -> None:
        with self.lock:
            self.calls += 1
            if not self.up:
                raise ConnectionError("store is down")
            bad = [item for item in batch if item in self.refuse]
            if bad:
                raise Refused(f"refused {bad}")  # all or nothing, like one log_batch request
            self.received.extend(batch)


def _sender(store: FakeStore, **kwargs) -> Sender:
    options = dict(destination="fake store", batch_size=10, retry_min_s=0.01, retry_max_s=0.05,
                   refused=lambda exc: isinstance(exc, Refused))
    options.update(kwargs)
    return Sender(store.deliver, **options)


@pytest.mark.timeout(30)
def test_everything_arrives_once_in_order_across_an_outage(caplog):
    store = FakeStore()
    sender = _sender(store)
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        sender.put_many(range(25))
        assert sender.flush(5)
        store.up = False
        slowest = 0.0
        for i in range(25, 100):
            t0 = time.perf_counter()
            sender.put(i)
            slowest = max(slowest, time.perf_counter() - t0)
        assert not sender.flush(0.3)  # undelivered while the store is away, and it says so
        assert sender.pending() == 75
        store.up = True
        assert sender.flush(5)
    assert store.received == list(range(100))
    assert slowest < 0.05, f"put blocked for {slowest:.3f} s"
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed" in m and "buffered and retried" in m for m in messages)
    assert any("is back" in m for m in messages)
    assert any("not yet delivered" in m and "still retrying" in m for m in messages)
    assert sender.close(1)


@pytest.mark.timeout(30)
def test_backs_off_while_the_store_is_down():
    store = FakeStore()
    store.up = False
    sender = _sender(store, retry_min_s=0.05, retry_max_s=0.2)
    sender.put(1)
    time.sleep(1.0)
    # 0.05 + 0.1 + 0.2 + 0.2 + ... : a handful of tries, not a busy loop.
    assert 3 <= store.calls <= 10
    store.up = True
    assert sender.flush(5) and store.received == [1]


@pytest.mark.timeout(30)
def test_a_refused_item_is_dropped_and_does_not_block_the_rest(caplog):
    store = FakeStore(refuse={"bad"})
    sender = _sender(store, describe=lambda item: f"item {item!r}")
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        sender.put_many(["a", "bad", "b", "c"])
        assert sender.flush(5)
    assert store.received == ["a", "b", "c"]
    assert sender.dropped == 1
    assert any("refused item 'bad'" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_a_long_outage_drops_the_oldest_droppable_items_only(caplog):
    store = FakeStore()
    store.up = False
    # Strings are precious (like params), ints may go (like metric points).
    sender = _sender(store, max_buffered=10, droppable=lambda item: isinstance(item, int))
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        sender.put("first")
        sender.put_many(range(30))
        sender.put("last")
    assert sender.pending() <= 11
    store.up = True
    assert sender.flush(5)
    # The in-flight front may have been kept; otherwise only the newest points survive.
    assert store.received[0] == "first" and store.received[-1] == "last"
    points = [i for i in store.received if isinstance(i, int)]
    assert points == sorted(points) and points[-1] == 29 and len(points) <= 10
    assert any("buffer full" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_closed_sender_gives_up_on_a_store_that_never_returns(caplog):
    store = FakeStore()
    store.up = False
    sender = _sender(store, give_up_after_close_s=0.3)
    sender.put_many(range(5))
    with caplog.at_level(logging.WARNING, logger="raybooth.mlflow"):
        assert not sender.close(0.2)
        deadline = time.monotonic() + 5
        while sender.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sender.pending() == 0 and store.received == []
    assert any("giving up on 5 undelivered items" in r.getMessage() for r in caplog.records)
    sender.put(6)  # a closed sender takes nothing more, and does not raise
    assert sender.pending() == 0
    sender._thread.join(5)
    assert not sender._thread.is_alive()


@pytest.mark.timeout(30)
def test_close_delivers_what_is_buffered_and_ends_the_thread():
    store = FakeStore()
    sender = _sender(store)
    sender.put_many(range(50))
    assert sender.close(5)
    assert store.received == list(range(50))
    sender._thread.join(5)
    assert not sender._thread.is_alive()


@pytest.mark.timeout(60)
def test_a_process_that_exits_without_closing_still_delivers(tmp_path):
    # The store is a file that the child process appends to; the first tries fail (the store is
    # "down" for 0.3 s), and the child exits at once without flush or close: atexit delivers.
    import subprocess
    import sys

    out = tmp_path / "received.txt"
    child = f"""
import time
from raybooth.platform.mlflow.sender import Sender
up_at = time.monotonic() + 0.3
def deliver(batch):
    if time.monotonic() < up_at:
        raise ConnectionError("down")
    with open({str(out)!r}, "a") as fh:
        fh.write("".join(f"{{i}}\\n" for i in batch))
sender = Sender(deliver, destination="file", retry_min_s=0.05, retry_max_s=0.1)
sender.put_many(range(20))
"""
    subprocess.run([sys.executable, "-c", child], check=True, timeout=50)
    assert out.read_text().split() == [str(i) for i in range(20)]


@pytest.mark.timeout(60)
def test_a_probe_resumes_delivery_as_soon_as_the_store_is_back():
    """A long back-off (here 4 s) is cut short when the `reachable` probe sees the store come
    back: delivery resumes within a probe interval. Without a probe it waits the back-off out."""
    from raybooth.platform.mlflow.sender import PROBE_EVERY_S

    def resumed_after(probe: bool) -> float:
        store = FakeStore()
        store.up = False
        sender = _sender(store, retry_min_s=4.0, retry_max_s=4.0,
                         reachable=(lambda: store.up) if probe else None)
        sender.put_many(range(3))
        deadline = time.monotonic() + 5
        while store.calls == 0 and time.monotonic() < deadline:  # the first try failed: backing off
            time.sleep(0.01)
        time.sleep(0.3)
        store.up = True
        back = time.monotonic()
        assert sender.flush(15)
        assert store.received == [0, 1, 2]
        sender.close(1)
        return time.monotonic() - back

    assert resumed_after(probe=True) <= PROBE_EVERY_S + 1.0
    assert resumed_after(probe=False) >= 3.0


@pytest.mark.timeout(30)
def test_a_store_that_answers_the_probe_but_fails_keeps_the_full_back_off():
    """Up to the probe, failing deliveries (a 5xx): no retry faster than the back-off."""
    store = FakeStore()
    store.up = False
    sender = _sender(store, retry_min_s=1.0, retry_max_s=1.0, reachable=lambda: True)
    sender.put(1)
    time.sleep(2.2)
    assert store.calls <= 3  # the first try, then one a second; not one a probe interval (0.5 s)
    store.up = True
    assert sender.flush(5) and store.received == [1]
    sender.close(1)
