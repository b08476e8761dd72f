"""A buffered sender: `put` returns at once, a background thread delivers in order, in batches.

Knows nothing about MLflow: it is handed a `deliver(batch)` callable (the store) and retries it.

- A store that is away (`deliver` raises) is warned about once and retried with back-off; what
  was buffered arrives, in order, once the store answers again ("is back" is logged). With a
  `reachable()` probe (an HTTP store's /health), a back-off wait is cut short when the store is
  seen coming back, so delivery resumes within a probe interval, not after up to RETRY_MAX_S.
- A store that refuses items for good (`refused(exc)` is true: a 4xx) must not block what is
  queued behind them: the batch is retried item by item and the refused ones are dropped, warned.
- Memory is bounded: beyond `max_buffered` items the oldest droppable ones that are not in flight
  are dropped (warned once), so a long outage cannot grow the buffer without limit.
- After `close`, what is still undelivered is retried for `give_up_after_close_s`, then dropped
  (warned): a long-lived process (many Tune trials) must not keep threads for a store that is gone.
- At interpreter exit every open sender gets a short flush.

Delivery is at least once: a batch that failed part-way is sent again, so `deliver` must be
idempotent (or skip what the store already has).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger("raybooth.mlflow")

T = TypeVar("T")

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
PROBE_EVERY_S = 0.5
GIVE_UP_AFTER_CLOSE_S = 600.0
AT_EXIT_FLUSH_S = 10.0

_OPEN: weakref.WeakSet[Sender] = weakref.WeakSet()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Sender(Generic[T]):
    """Delivers `put` items through `deliver` from a background thread; never raises to `put`."""

    def __init__(
        self,
        deliver: Callable[[list[T]], None],
        *,
        destination: str,
        batch_size: int = 1000,
        max_buffered: int = 200_000,
        refused: Callable[[BaseException], bool] = lambda exc: False,
        droppable: Callable[[T], bool] = lambda item: True,
        describe: Callable[[T], str] = repr,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
        give_up_after_close_s: float = GIVE_UP_AFTER_CLOSE_S,
        reachable: Callable[[], bool] | None = None,
    ):
        self.destination = destination  # for messages: "MLflow tracking at http://..."
        self._deliver_batch = deliver
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        self._refused = refused
        self._droppable = droppable
        self._describe = describe
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._give_up_after_close_s = give_up_after_close_s
        self._reachable = reachable
        self._queue: list[T] = []
        self._inflight = 0  # items at the front of _queue being delivered now
        self._cond = threading.Condition()
        self._down_since: float | None = None
        self._closed_at: float | None = None
        self.delivered = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="raybooth-sender", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    # ------------------------------------------------------------------ the caller's side

    @property
    def closed(self) -> bool:
        return self._closed_at is not None

    def put(self, item: T) -> None:
        self.put_many([item])

    def put_many(self, items: Iterable[T]) -> None:
        items = list(items)
        if not items or self.closed:
            return
        with self._cond:
            self._queue.extend(items)
            overflow = len(self._queue) - self._max_buffered
            if overflow > 0:
                self._drop_oldest(overflow)
            self._cond.notify_all()

    def pending(self) -> int:
        """Items not yet delivered (including those being delivered now)."""
        with self._cond:
            return len(self._queue)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to `timeout_s` for everything put so far to be delivered. True when it was; on
        timeout, warns (what is left keeps being retried in the background)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "%d items not yet delivered to %s after %.0f s; still retrying in the background",
                        len(self._queue), self.destination, timeout_s,
                    )
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Flush, then accept nothing more. The thread ends once the buffer is empty, or gives up
        `give_up_after_close_s` later."""
        if self.closed:
            return not self.pending()
        done = self.flush(timeout_s)
        with self._cond:
            self._closed_at = time.monotonic()
            self._cond.notify_all()
        return done

    # ------------------------------------------------------------------ the background thread

    def _drop_oldest(self, count: int) -> None:
        # Called with the lock held. Never the in-flight front: it may be arriving right now.
        kept, dropped = self._queue[: self._inflight], 0
        for item in self._queue[self._inflight :]:
            if dropped < count and self._droppable(item):
                dropped += 1
            else:
                kept.append(item)
        self._queue = kept
        if dropped and self.dropped == 0:
            log.warning("%s: buffer full, dropping the oldest undelivered items", self.destination)
        self.dropped += dropped

    def _run(self) -> None:
        delay = self._retry_min_s
        while True:
            with self._cond:
                while not self._queue:
                    if self.closed:
                        _OPEN.discard(self)
                        return
                    self._cond.wait(1.0)
                batch = self._queue[: self._batch_size]
                self._inflight = len(batch)
            try:
                self._deliver(batch)
            except Exception as exc:
                with self._cond:
                    self._inflight = 0
                    self._cond.notify_all()
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("%s failed (%s: %s); delivery is buffered and retried",
                                self.destination, type(exc).__name__, first_line(exc))
                if self._gave_up():
                    return
                # The full delay, even when new items arrive: no busy loop against a dead store.
                self._back_off(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            if self._down_since is not None:
                log.warning("%s is back after %.0f s; buffered items delivered",
                            self.destination, time.monotonic() - self._down_since)
                self._down_since = None
            delay = self._retry_min_s
            with self._cond:
                del self._queue[: len(batch)]
                self._inflight = 0
                self._cond.notify_all()

    def _back_off(self, delay: float) -> None:
        """Sleep `delay`; with a probe, end early once the store is seen down and then up again
        (a store that answers the probe but fails deliveries keeps the full back-off)."""
        if self._reachable is None:
            time.sleep(delay)
            return
        deadline = time.monotonic() + delay
        seen_down = not self._probe()  # right after the failure: is it the store that is away?
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(PROBE_EVERY_S, left))
            if not self._probe():
                seen_down = True
            elif seen_down:
                return

    def _probe(self) -> bool:
        try:
            return bool(self._reachable())  # type: ignore[misc]
        except Exception:
            return False

    def _deliver(self, batch: list[T]) -> None:
        """deliver(batch); a refusal for good is narrowed down to the refused items, which are
        dropped. Anything else (the store is away) raises, and the whole batch is retried."""
        try:
            self._deliver_batch(batch)
            self.delivered += len(batch)
            return
        except Exception as exc:
            if not self._refused(exc):
                raise
            if len(batch) == 1:
                log.warning("%s: the store refused %s (%s); dropped",
                            self.destination, self._describe(batch[0]), first_line(exc))
                self.dropped += 1
                return
        for item in batch:  # find the refused ones
            self._deliver([item])

    def _gave_up(self) -> bool:
        with self._cond:
            if self._closed_at is None or time.monotonic() - self._closed_at <= self._give_up_after_close_s:
                return False
            log.warning("%s: giving up on %d undelivered items", self.destination, len(self._queue))
            self.dropped += len(self._queue)
            self._queue = []
            self._cond.notify_all()
        _OPEN.discard(self)
        return True


@atexit.register
def _flush_at_exit() -> None:
    # A process that ends without close() still gets a short chance to deliver.
    for sender in list(_OPEN):
        if not sender.closed:
            try:
                sender.flush(timeout_s=AT_EXIT_FLUSH_S)
            except Exception:
                pass
