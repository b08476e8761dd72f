"""A submitted job from the client's side: its logs as they come, its outcome, its summary path.

raybooth's job commands end by printing the path of what they wrote (`summary.json`,
`sweep.json`, `evaluation.json`) as their last line; `summary_path` finds that line in the logs.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# A line that is nothing but a path (or URI) to a .json file.
_SUMMARY_LINE = re.compile(r"^\s*((?:[a-z][a-z0-9+.-]*://)?[^\s]*[^\s/]\.json)\s*$")


def summary_path(logs: str) -> str | None:
    for line in reversed(logs.splitlines()):
        match = _SUMMARY_LINE.match(line)
        if match:
            return match.group(1)
    return None


def status_of(client: "JobSubmissionClient", job_id: str) -> str:
    return str(client.get_job_status(job_id).value)


def wait_terminal(client: "JobSubmissionClient", job_id: str, timeout_s: float, poll_s: float = 0.5) -> str:
    deadline = time.monotonic() + timeout_s
    status = status_of(client, job_id)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = status_of(client, job_id)
    return status


def stream_logs(client: "JobSubmissionClient", job_id: str, out: TextIO = sys.stdout) -> str:
    """Print the job's logs as they arrive until it ends; returns all of them.

    Ctrl-C raises KeyboardInterrupt out of here (the job keeps running)."""
    chunks: list[str] = []

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.append(chunk)
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError:
        # The log socket closed early (head restarted, proxy timeout): poll to the end instead.
        status = wait_terminal(client, job_id, timeout_s=float("inf"), poll_s=2.0)
        rest = client.get_job_logs(job_id)[len("".join(chunks)):]
        chunks.append(rest)
        out.write(rest)
        out.write(f"(log stream interrupted; job {status})\n")
    return "".join(chunks)


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """0 only for SUCCEEDED; the command's own status when it failed with one (2: a user error)."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and driver_exit_code and 0 < driver_exit_code < 126:
        return driver_exit_code
    return 1

