"""Per-step training metrics in the run directory (`metrics.jsonl`), and the driver's progress
line that follows them.

The rank-0 worker appends one JSON line per optimizer step (and one per event: started,
resumed). A restarted worker group appends the steps after its checkpoint again, so a reader
keeps the last line of each step: `step_metrics` does.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
METRIC_KEYS = (
    "loss", "instance_loss", "prior_loss", "lr", "steps_per_second", "samples_per_second", "peak_memory_mb",
)


# Events the rank-0 worker writes between step records; the last of these tells how the most
# recent attempt of the run ended (a resumed run starts with `resumed`/`started` again).
STARTED_EVENTS = ("started", "resumed")
DIVERGED_EVENT = "diverged"


class MetricsLog:
    """Appends records to <run_dir>/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.path, "a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())

    def event(self, name: str, **fields: Any) -> None:
        self.write([{"event": name, "time": time.time(), **fields}])


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed worker
    return out


def step_metrics(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """The metrics of each step, the last record of a step winning (a restart re-runs steps)."""
    steps: dict[int, dict[str, Any]] = {}
    for record in read_records(run_dir):
        if "event" not in record and "step" in record:
            steps[int(record["step"])] = record
    return dict(sorted(steps.items()))


def divergence(run_dir: str | Path) -> dict[str, Any] | None:
    """The `diverged` event of the run's latest attempt (None when it did not diverge)."""
    latest = None
    for record in read_records(run_dir):
        if record.get("event") in (*STARTED_EVENTS, DIVERGED_EVENT):
            latest = record
    return latest if latest is not None and latest["event"] == DIVERGED_EVENT else None


class ProgressPrinter:
    """Follows metrics.jsonl from a background thread and prints one line per record."""

    def __init__(self, run_dir: Path, max_steps: int, out: TextIO = sys.stdout, interval_s: float = 0.5):
        self.path = Path(run_dir) / METRICS_FILE
        self.max_steps = max_steps
        self.out = out
        self.interval_s = interval_s
        self._offset = self.path.stat().st_size if self.path.is_file() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raybooth-progress", daemon=True)

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            with open(self.path) as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]  # leave a half-written last line for later
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            text = format_record(record, self.max_steps)
            if text:
                print(text, file=self.out, flush=True)


def format_record(record: dict[str, Any], max_steps: int) -> str:
    if record.get("event") == "started":
        return f"training: {record.get('world_size')} worker(s), step {record.get('step', 0)} -> {max_steps}"
    if record.get("event") == "resumed":
        return f"training: resumed from {record.get('checkpoint')} at step {record.get('step')}"
    if "step" in record and "loss" in record:
        return (
            f"step {record['step']:>5}/{max_steps}  loss {record['loss']:.4f}  "
            f"(instance {record['instance_loss']:.4f}, prior {record['prior_loss']:.4f})  "
            f"lr {record['lr']:.2e}  {record['steps_per_second']:.2f} steps/s"
        )
    return ""
