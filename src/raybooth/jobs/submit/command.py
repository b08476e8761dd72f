"""`raybooth submit …` and `raybooth jobs list|logs|stop`: raybooth's job commands on a Ray cluster.

    raybooth submit train --config configs/train/sd15.yaml --set run.storage_path=/mnt/shared/runs \
        --address http://HEAD:8265

runs `raybooth train --config configs/train/sd15.yaml --set …` as a Ray job (Jobs SDK) on the
cluster's own raybooth, after checking that the cluster's Ray and raybooth are this client's. It
follows the logs (Ctrl-C detaches; the job keeps running), exits with the job's outcome and prints
the summary path the job printed as its last line.
"""

from __future__ import annotations

import argparse
import secrets
import shlex
import sys
import time
from typing import Any

from raybooth.platform.errors import UserError

# What `submit` runs on the cluster: `raybooth <command> --config …`. tune and evaluate are
# accepted before this client has them: the cluster's raybooth (checked equal) parses them.
SUBMITTABLE = ("train", "tune", "evaluate", "priors")
WITH_SUMMARY = ("train", "tune", "evaluate")
PROBE_TIMEOUT_S = 120.0
PROBE_PREFIX = "raybooth-versions-"
STOP_TIMEOUT_S = 60.0


def _log(message: str) -> None:
    print(f"raybooth: {message}", file=sys.stderr, flush=True)


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="the cluster's Ray dashboard URL, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                        "or RAY_ADDRESS when it is an http URL). Token: RAY_AUTH_TOKEN or ~/.ray/auth_token")


# ---------------------------------------------------------------------------------------------
# raybooth submit


def register_submit(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run train/tune/evaluate/priors as a Ray job on a cluster (follows its logs)",
        description="Run `raybooth COMMAND --config FILE --set …` as a Ray job on the cluster at "
        "--address. The cluster runs its installed raybooth (the image from docker/Dockerfile), which "
        "must be the same raybooth and Ray as this client's; the working directory (the config and "
        "the files it names by relative path) is uploaded with the job. Exits with the job's "
        "outcome; Ctrl-C detaches (the job keeps running: raybooth jobs stop ID).",
    )
    p.add_argument("job_command", metavar="COMMAND", choices=SUBMITTABLE, help=" | ".join(SUBMITTABLE))
    p.add_argument("--config", required=True, help="the command's config file, inside the working directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (passed to the command as is)")
    _address_arg(p)
    p.add_argument("--working-dir", default=".",
                   help="uploaded with the job; the job runs in it, so relative paths in the config "
                        "resolve as here (default: the current directory; .gitignore'd files are skipped)")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="an environment variable for the job (MLFLOW_TRACKING_URI, HF_HUB_OFFLINE, "
                        "TRANSFORMERS_OFFLINE and HF_ENDPOINT pass through when set)")
    p.add_argument("--no-follow", action="store_true", help="submit, print the job id and return")
    p.add_argument("args", nargs="*", metavar="-- ARG", help="further arguments for the command, after --")
    p.set_defaults(func=cmd_submit)


def entrypoint(command: str, config: str, overrides: list[str], extra: list[str]) -> str:
    words = ["raybooth", command, "--config", config]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words + list(extra))


def cluster_versions(client, address: str):
    """The cluster's versions, read by a short probe job (deleted afterwards)."""
    from raybooth.jobs.submit.follow import TERMINAL, wait_terminal
    from raybooth.jobs.submit.runtime_env import ALWAYS
    from raybooth.jobs.submit.versions import parse_probe_output, probe_entrypoint

    job_id = client.submit_job(
        entrypoint=probe_entrypoint(),
        submission_id=f"{PROBE_PREFIX}{secrets.token_hex(4)}",
        runtime_env={"env_vars": dict(ALWAYS)},
        metadata={"raybooth.command": "version-probe"},
    )
    status = wait_terminal(client, job_id, PROBE_TIMEOUT_S)
    logs = client.get_job_logs(job_id)
    if status not in TERMINAL:
        client.stop_job(job_id)
    # Not deleted: Ray's delete can leave a half-record behind; `raybooth jobs list` hides probes.
    versions = parse_probe_output(logs)
    if versions is None:
        raise UserError(
            f"the cluster at {address} did not report its versions (probe job {job_id}: {status}); "
            f"its `python` printed: {logs.strip()[-800:] or '(nothing)'}",
            field="address",
        )
    return versions


def cmd_submit(args: argparse.Namespace) -> int:
    from raybooth.jobs.submit import runtime_env
    from raybooth.jobs.submit.client import connect
    from raybooth.jobs.submit.follow import exit_code, stream_logs, summary_path, wait_terminal
    from raybooth.jobs.submit.versions import check_match, local_versions

    # Everything that needs no cluster first: a typo costs nothing.
    root = runtime_env.working_dir(args.working_dir)
    config = runtime_env.config_in_working_dir(args.config, root)
    variables = runtime_env.env_vars(args.env)
    address, client = connect(args.address)
    note = runtime_env.local_tracking_note(variables, address)
    if note:
        _log(f"note: {note}")

    cluster = cluster_versions(client, address)
    check_match(local_versions(), cluster, address)

    command = entrypoint(args.job_command, config, args.overrides, args.args)
    submission_id = f"raybooth-{args.job_command}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    try:
        job_id = client.submit_job(
            entrypoint=command,
            submission_id=submission_id,
            runtime_env=runtime_env.build(root, variables),
            metadata={"raybooth.command": args.job_command, "raybooth.config": config,
                      "raybooth.version": str(cluster.raybooth)},
        )
    except Exception as exc:  # the upload (size limit, unreadable file) or the Jobs API refused it
        raise UserError(f"the cluster at {address} did not accept the job (working directory {root}): "
                        f"{exc}", field="working_dir") from None

    stop_hint = f"raybooth jobs stop {job_id} --address {address}"
    _log(f"job {job_id} submitted to {address} ({cluster.describe()})")
    _log(f"  runs: {command}")
    _log(f"  stop it: {stop_hint}")
    if args.no_follow:
        _log(f"  follow: raybooth jobs logs {job_id} --follow --address {address}")
        print(job_id)
        return 0

    started = time.monotonic()
    try:
        logs = stream_logs(client, job_id)
        status = wait_terminal(client, job_id, timeout_s=30)
    except KeyboardInterrupt:
        _log(f"detached from job {job_id}; it keeps running on the cluster.")
        _log(f"  follow again: raybooth jobs logs {job_id} --follow --address {address}")
        _log(f"  stop it: {stop_hint}")
        return 130
    info = client.get_job_info(job_id)
    code = exit_code(status, info.driver_exit_code)
    took = f"{time.monotonic() - started:.0f} s"
    if status == "SUCCEEDED":
        _log(f"job {job_id} SUCCEEDED in {took}")
    else:
        _log(f"job {job_id} {status} after {took}: {(info.message or '').strip()[:2000]}")
    path = summary_path(logs) if status == "SUCCEEDED" and args.job_command in WITH_SUMMARY else None
    if path:
        _log(f"summary (on the cluster): {path}")
        print(path)
    return code


# ---------------------------------------------------------------------------------------------
# raybooth jobs list | logs | stop


def register_jobs(subparsers: Any) -> None:
    p = subparsers.add_parser("jobs", help="list, follow and stop the jobs on a Ray cluster",
                              description="The jobs on the cluster at --address (any Ray job; "
                              "raybooth's show their command).")
    sub = p.add_subparsers(dest="jobs_command", required=True)

    ls = sub.add_parser("list", help="every job on the cluster, newest last")
    ls.add_argument("--all", action="store_true", help="also submit's version probes")
    _address_arg(ls)
    ls.set_defaults(func=cmd_jobs_list)

    logs = sub.add_parser("logs", help="a job's logs (--follow: until it ends, exiting with its outcome)")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("--follow", "-f", action="store_true")
    _address_arg(logs)
    logs.set_defaults(func=cmd_jobs_logs)

    stop = sub.add_parser("stop", help="stop a running job and wait until it has stopped")
    stop.add_argument("job_id", metavar="ID")
    _address_arg(stop)
    stop.set_defaults(func=cmd_jobs_stop)


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from raybooth.jobs.submit.client import connect

    _, client = connect(args.address)
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    if not args.all:
        jobs = [j for j in jobs if not (j.submission_id or "").startswith(PROBE_PREFIX)]
    rows = [("ID", "STATUS", "STARTED", "SECONDS", "COMMAND")]
    for job in jobs:
        end = job.end_time or (time.time() * 1000 if job.start_time else None)
        seconds = f"{(end - job.start_time) / 1000:.0f}" if job.start_time and end else "-"
        what = job.entrypoint if len(job.entrypoint) <= 100 else job.entrypoint[:97] + "..."
        rows.append((job.submission_id or job.job_id or "-", str(job.status.value), _when(job.start_time), seconds, what))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    return 0


def _job_call(fn, job_id: str, address: str):
    from raybooth.jobs.submit.client import job_not_found

    try:
        return fn(job_id)
    except RuntimeError as exc:
        missing = job_not_found(exc, job_id, address)
        if missing is None:
            raise
        raise missing from None


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from raybooth.jobs.submit.client import connect
    from raybooth.jobs.submit.follow import exit_code, stream_logs, wait_terminal

    address, client = connect(args.address)
    if not args.follow:
        sys.stdout.write(_job_call(client.get_job_logs, args.job_id, address))
        return 0
    _job_call(client.get_job_status, args.job_id, address)
    try:
        stream_logs(client, args.job_id)
    except KeyboardInterrupt:
        _log(f"stopped following job {args.job_id}; it keeps running (raybooth jobs stop "
             f"{args.job_id} --address {address})")
        return 130
    status = wait_terminal(client, args.job_id, timeout_s=30)
    info = client.get_job_info(args.job_id)
    _log(f"job {args.job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""))
    return exit_code(status, info.driver_exit_code)


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from raybooth.jobs.submit.client import connect
    from raybooth.jobs.submit.follow import TERMINAL, status_of, wait_terminal

    address, client = connect(args.address)
    status = _job_call(lambda j: status_of(client, j), args.job_id, address)
    if status in TERMINAL:
        _log(f"job {args.job_id} had already ended: {status}")
        return 0
    client.stop_job(args.job_id)
    status = wait_terminal(client, args.job_id, STOP_TIMEOUT_S)
    _log(f"job {args.job_id} {status}" + ("" if status in TERMINAL else
                                          f" (still stopping after {STOP_TIMEOUT_S:.0f} s)"))
    return 0 if status in TERMINAL else 1
