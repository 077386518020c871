"""Training on a multi-node Ray cluster, simulated on this machine: ``ray.cluster_utils.Cluster`` with
a head that has no CPUs (as cluster.yaml's head) and worker nodes of 1 CPU each, so the default
PACK placement of 2 one-CPU workers puts them on different nodes, as 2 one-GPU workers on 2 nodes
of one GPU each. One cluster for the module; each job is `rayapp run` in a subprocess with
RAY_ADDRESS pointing at it (this pytest process may already drive the session's in-process cluster,
and a process drives one cluster at most).

What runs here is what runs on a real cluster: gloo between processes that are on different Ray
nodes (but one machine), checkpoints and outputs on a path every node sees (here: the same disk),
or on S3 (moto on 127.0.0.1). What differs on a real cluster (NCCL, real network, separate disks)
is listed in docs/cluster.md.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayapp.data.readers import read_jsonl
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

# 32 steps of the tiny SFT job, a checkpoint every 4: long enough (~0.3 s a step on 2 cores) that a
# node can be removed after the first registered checkpoint and well before the end.
LONG = ["train.max_steps=32", "train.checkpoint_every=4", "train.eval_every=16", "train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def cluster():
    """A head with 0 CPUs and two worker nodes of 1 CPU, on loopback (rayapp.runtime.LOOPBACK_ENV)."""
    from rayapp.runtime import LOOPBACK_ENV, loopback_only

    loopback_only()
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=1)
    c.env = {**os.environ, **LOOPBACK_ENV, "RAY_ADDRESS": c.address}
    try:
        yield c
    finally:
        c.shutdown()


def run_job(cluster, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`rayapp run ARGS` on the cluster, in the background; stdout and stderr merged into .stdout."""
    return subprocess.Popen([sys.executable, "-m", "rayapp.cli", "run", *args], cwd=ROOT, env=env or cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def worker_nodes(cluster) -> dict[str, object]:
    return {n.node_id: n for n in cluster.worker_nodes}


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not seen after {timeout_s} s")


def registered_step(read_text) -> int | None:
    """Step of the latest checkpoint Ray Train has registered (its snapshot, written after every
    rank's files are in place); ``read_text(rel)`` reads a file of output_dir."""
    try:
        latest = json.loads(read_text("checkpoints/checkpoint_manager_snapshot.json")).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return latest["metrics"]["step"] if latest else None


def resumed_steps(log: str) -> set[int]:
    return {int(chunk.split()[0]) for chunk in log.split("resuming from checkpoint at step ")[1:]}


def assert_loss_continues(rows: list[dict], total: int, resumed: int) -> None:
    """Each step once, in order, to the end; the step after the resume trains on from the
    checkpoint's loss, not from the start's."""
    steps = [r["step"] for r in rows]
    assert steps == list(range(1, total + 1)), steps
    loss = {r["step"]: r["loss"] for r in rows}
    drop = loss[1] - loss[resumed]
    assert drop > 0.5, loss  # the run had learned something by the checkpoint
    assert abs(loss[resumed + 1] - loss[resumed]) < 0.5 * drop, loss


def test_fsdp_on_two_nodes(cluster, tmp_path):
    """SFT with FSDP2 on 2 workers that Ray placed on different nodes; the gathered export loads in
    transformers and the sharded checkpoint has one shard file per rank."""
    out = tmp_path / "fsdp"
    proc = run_job(cluster, "jobs/sft_tiny.yaml", f"output_dir={out}", "resources.strategy=fsdp", "train.max_steps=6",
                   "train.checkpoint_every=3", "train.eval_every=3")
    log = finish(proc)
    assert proc.returncode == 0, log[-4000:]

    (start,) = json.loads((out / "workers.json").read_text())["starts"]
    nodes = [w["node_id"] for w in sorted(start["workers"], key=lambda w: w["rank"])]
    assert start["strategy"] == "fsdp" and len(nodes) == 2
    assert nodes[0] != nodes[1] and set(nodes) == set(worker_nodes(cluster)), nodes

    assert sorted(p.name for p in (out / "checkpoints" / "step_000006").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "state.pt"]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and rows[-1]["loss"] < rows[0]["loss"]
    assert "val_loss" in rows[2] and "val_loss" in rows[5]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not list((out / "model").glob("*.distcp"))


def test_ddp_node_lost_after_checkpoint_resumes_on_a_new_node(cluster, tmp_path):
    """DDP on 2 nodes; the node of rank 0 is removed after a registered checkpoint; with
    resources.max_failures: 1 Ray Train restarts the group once a fresh node joins, the loop
    resumes at the checkpointed step and the job finishes and exports."""
    out = tmp_path / "node_loss"
    proc = run_job(cluster, "jobs/sft_tiny.yaml", f"output_dir={out}", "resources.strategy=ddp",
                   "resources.max_failures=1", *LONG)
    read = lambda rel: (out / rel).read_text()  # noqa: E731
    try:
        first = wait_for(lambda: registered_step(read), 300, "a registered checkpoint", proc)
        (start,) = json.loads(read("workers.json"))["starts"]
        by_rank = {w["rank"]: w["node_id"] for w in start["workers"]}
        assert by_rank[0] != by_rank[1] and set(by_rank.values()) == set(worker_nodes(cluster))
        lost = worker_nodes(cluster)[by_rank[0]]
        killed_after = registered_step(read)
        cluster.remove_node(lost, allow_graceful=False)
        fresh = cluster.add_node(num_cpus=1)
        log = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    assert first <= killed_after < 32

    (resumed,) = resumed_steps(log)  # one restart of the group: every rank resumed at the same step
    assert killed_after <= resumed < 32 and resumed % 4 == 0, (killed_after, resumed)
    starts = json.loads(read("workers.json"))["starts"]
    assert len(starts) == 2
    after = {w["node_id"] for w in starts[1]["workers"]}
    assert fresh.node_id in after and lost.node_id not in after
    assert_loss_continues(read_jsonl(out / "metrics.jsonl"), 32, resumed)
    assert (out / "model" / "config.json").exists()


def test_job_no_node_can_hold_fails_at_once(cluster, tmp_path):
    """2 CPUs in the cluster, as the job asks, but no node has 2: refused before any worker starts,
    with the field to change."""
    proc = run_job(cluster, "jobs/sft_tiny.yaml", f"output_dir={tmp_path / 'big'}", "resources.num_workers=1",
                   "resources.cpus_per_worker=2")
    log = finish(proc, timeout=300)
    assert proc.returncode != 0, log[-3000:]
    assert "no node of this cluster can hold one" in log, log[-3000:]
    # the nodes as they are (an earlier test of this module may have replaced one), largest first:
    # the 1-CPU workers, then the 0-CPU head
    assert "set resources.cpus_per_worker to at most 1" in log and re.search(r"nodes: \d+ x \{CPU: 1\}, 1 x \{CPU: 0\}\)", log), log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # Refused before any worker started: no worker recorded itself, no checkpoint (a wall-clock bound
    # here failed on a loaded machine).
    assert not (tmp_path / "big" / "workers.json").exists() and not (tmp_path / "big" / "checkpoints").exists()


def test_s3_output_dir_train_kill_resume_export(cluster, s3_server, s3_bucket, tmp_path):
    """output_dir: s3://... end to end: checkpoints, metrics, workers.json, model/ published whole,
    report and eval.json in the bucket; a worker SIGKILLed after a registered checkpoint is
    restarted (resources.max_failures: 1) and resumes from the checkpoint downloaded from S3; the
    exported model/ is what deploy serves from that URI (downloaded into the local cache)."""
    from rayapp.storage import open_output

    uri = f"s3://{s3_bucket}/runs/sft"
    store = open_output(uri)
    env = {**cluster.env, "AWS_ENDPOINT_URL_S3": s3_server.endpoint, "RAYAPP_CACHE": str(tmp_path / "cache")}
    proc = run_job(cluster, "jobs/sft_tiny.yaml", f"output_dir={uri}", "resources.max_failures=1", *LONG, env=env)

    def read(rel):
        try:
            return store.read_text(rel)
        except Exception as e:  # not there yet
            raise OSError(str(e)) from e

    try:
        wait_for(lambda: registered_step(read), 300, "a registered checkpoint in S3", proc)
        (start,) = json.loads(read("workers.json"))["starts"]
        victim = next(w for w in start["workers"] if w["rank"] == 1)
        killed_after = registered_step(read)
        os.kill(victim["pid"], signal.SIGKILL)  # a RayTrainWorker of this test's own cluster
        log = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-4000:]
    (resumed,) = resumed_steps(log)
    assert killed_after <= resumed < 32 and resumed % 4 == 0, (killed_after, resumed)

    keys = s3_server.keys(s3_bucket, "runs/sft/")
    names = {k.removeprefix("runs/sft/") for k in keys}
    for name in ("config.resolved.yaml", "data_stats.json", "metrics.jsonl", "workers.json", "eval.json", "report.html",
                 "plots/loss.png", "model/config.json", "model/model.safetensors", "model/.rayapp_complete.json",
                 "checkpoints/step_000032/.metadata", "checkpoints/step_000032/__1_0.distcp"):
        assert name in names, (name, sorted(names))
    assert not any(n.endswith(".rayapp_incomplete") for n in names)
    assert not (ROOT / "s3:").exists() and not Path("s3:").exists()  # no local folder named after the scheme
    assert len(json.loads(read("workers.json"))["starts"]) == 2
    assert store.read_json("eval.json")["step"] == 32
    metrics = [json.loads(line) for line in read("metrics.jsonl").splitlines()]
    assert_loss_continues(metrics, 32, resumed)

    # Deploy's view of the URI: the published model/, downloaded once into the local cache.
    from transformers import AutoModelForCausalLM

    from rayapp.serving.deploy import find_source

    src = find_source(uri)
    assert src.base_uri == f"{uri}/model" and src.adapters == {}
    assert (src.base / "config.json").is_file() and "downloads" in src.base.parts
    model = AutoModelForCausalLM.from_pretrained(src.base)
    assert model.config.num_hidden_layers == 2
    assert find_source(uri).base == src.base  # cached: the same directory, not a second download
