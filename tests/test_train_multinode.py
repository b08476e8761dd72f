"""Training on several nodes: a Ray cluster on this machine (`ray.cluster_utils.Cluster`) with a
head that has no CPUs and two worker nodes; two Ray Train workers on different nodes. One node is
removed mid-run: Ray Train restarts the workers on what is left, they resume from the checkpoint
in the shared storage path, and the run finishes. Full fine-tuning of the UNet only (text encoder
frozen, its embeddings cached), with prior preservation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _train_support import StepWatcher, small_config

from raybooth.jobs.train.driver import run_training
from raybooth.jobs.train.metrics import read_records, step_metrics

MAX_STEPS = 16

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def cluster(tiny_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the shared local Ray; the `ray_local` fixture starts a new one when needed
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            # Notice a removed node within seconds rather than the production default.
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4},
        },
    )
    nodes = [cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(420)
def test_node_lost_mid_run_training_recovers_and_finishes(cluster, tmp_path, raybooth_home):
    cluster_obj, nodes = cluster
    config = small_config(tmp_path / "shared-storage", "two-nodes", **{  # every node sees this path
        "priors.enabled": True,
        # The same set as test_train_runs uses: reused when it exists, made on the cluster if not.
        "priors.class_data_dir": str(raybooth_home / "train-class-images"),
        "priors.num_class_images": 3,
        "priors.steps": 2,
        "priors.num_actors": 1,
        "train.mode": "full",
        "train.train_text_encoder": False,
        "train.max_steps": MAX_STEPS,
        "train.seed": 7,
        "train.checkpoint_every": 4,
        "scaling.placement_strategy": "SPREAD",
        "run.max_failures": 2,
    })
    run_dir = tmp_path / "shared-storage" / "two-nodes"
    removed: dict = {}

    def remove_a_node(step: int) -> None:
        ranks = [json.loads((run_dir / "workers" / f"rank-{r}.json").read_text()) for r in (0, 1)]
        removed["node_ids"] = {r["node_id"] for r in ranks}
        victim = next(n for n in nodes if n.node_id == ranks[1]["node_id"])
        removed.update(node_id=victim.node_id, at_step=step)
        cluster_obj.remove_node(victim, allow_graceful=False)

    with StepWatcher(run_dir, [(5, remove_a_node)], after_checkpoint=True):
        summary = run_training(config, progress=False)

    assert removed, "no node was removed"
    assert len(removed["node_ids"]) == 2, "the two workers did not run on different nodes"
    assert removed["at_step"] < MAX_STEPS, "the run finished before the node was lost"
    resumes = [r for r in read_records(run_dir) if r.get("event") == "resumed"]
    assert resumes and resumes[0]["step"] >= 4 and resumes[0]["step"] % 4 == 0
    after = {json.loads((run_dir / "workers" / f"rank-{r}.json").read_text())["node_id"] for r in (0, 1)}
    assert removed["node_id"] not in after  # the restarted workers live on the surviving node
    assert summary.steps == MAX_STEPS and sorted(step_metrics(run_dir)) == list(range(1, MAX_STEPS + 1))
    assert (Path(summary.model_path) / "model_index.json").is_file()
    assert summary.class_image_set
