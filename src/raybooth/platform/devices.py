"""Device and dtype choice: CUDA with half precision when present, else CPU with fp32."""

from __future__ import annotations

import os

import torch

from raybooth.platform.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {preference!r} was asked for but no CUDA GPU is visible", field="device")
    return torch.device(preference)


def pick_dtype(device: torch.device, preference: str = "auto") -> torch.dtype:
    if preference == "auto":
        # fp16 is what SD 1.x checkpoints ship for inference; CPUs are fastest and exact in fp32.
        return torch.float16 if device.type == "cuda" else torch.float32
    if preference not in DTYPES:
        raise UserError(f"dtype {preference!r}: expected one of auto, {', '.join(DTYPES)}", field="dtype")
    return DTYPES[preference]


def assigned_cpus() -> float | None:
    """The CPUs Ray reserved for the calling worker, actor or replica (None outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker, or an older runtime context: nothing to follow
        return None


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def free_cpus() -> float:
    """The CPUs free in the running Ray cluster that work can use without oversubscribing.

    Ray's CPUs are logical and can be declared beyond the cores (`ray start --num-cpus 8`,
    `raybooth serve`'s 4 on 2 cores). When the cluster is this one machine, the count is capped
    at its cores: processes whose torch threads add up to more than the cores wait on each other
    (2 training workers x 2 threads on 2 cores trained ~12x slower than 2 x 1 thread:
    benchmarks/train/bench_cpu_share.py).
    """
    import ray

    free = float(ray.available_resources().get("CPU", 0.0))
    nodes = cpu_nodes()
    if len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id():
        free = min(free, float(machine_cores()))
    return free


def cpu_nodes() -> list[dict]:
    """The alive nodes of the running Ray cluster that have CPUs (ray.nodes() entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0.0) > 0]


def use_assigned_cpus(explicit: int | None = None) -> int:
    """Set torch's intra-op threads to what this process was given, and return the count.

    Ray starts every worker with OMP_NUM_THREADS=1 unless told otherwise, so a worker that holds 2
    CPUs would still compute on one core: the threads follow the reservation instead (rounded,
    at least 1). `explicit` (a config's torch_threads) wins. Outside Ray torch's default stays.
    """
    threads = explicit
    if threads is None:
        cpus = assigned_cpus()
        # Never more threads than the machine has cores (logical CPUs can be declared freely).
        threads = min(max(1, round(cpus)), machine_cores()) if cpus else None
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()
