"""check_resources refuses, at once and saying what to change, a job its cluster can never hold:
too much in total, a worker larger than any node, more workers than the nodes hold together
(or as a strict placement strategy needs), counting what an autoscaler may still add. Against
a fake ``ray`` module: node lists as ``ray.nodes()`` gives them."""

from __future__ import annotations

import types

import pytest

from rayapp import runtime
from rayapp.runtime import ResourceError, check_resources, node_capacities


def fake_ray(*nodes: dict, dead: tuple[dict, ...] = ()):
    rows = [{"Alive": True, "Resources": n} for n in nodes] + [{"Alive": False, "Resources": n} for n in dead]
    return types.SimpleNamespace(nodes=lambda: rows)


@pytest.fixture
def cluster(monkeypatch):
    """``cluster(*nodes, autoscaler=None)`` makes check_resources see those nodes."""

    def use(*nodes, autoscaler=None, dead=()):
        ray = fake_ray(*nodes, dead=dead)
        monkeypatch.setattr(runtime, "ensure_ray", lambda: ray)
        from ray._private import state as ray_state

        monkeypatch.setattr(ray_state.state, "get_cluster_config", lambda: autoscaler)
        return ray

    return use


HEAD = {"CPU": 0.0, "memory": 1e9}
FIELDS = {"CPU": "resources.cpus_per_worker", "GPU": "resources.gpus_per_worker"}


def test_worker_larger_than_any_node_names_the_field(cluster):
    cluster(HEAD, {"CPU": 1.0}, {"CPU": 1.0})
    with pytest.raises(ResourceError) as e:
        check_resources(cpus=2, what="job 'x'", bundles=[{"CPU": 2}], fields=FIELDS)
    msg = str(e.value)
    assert "job 'x' asks for 1 worker(s) of {CPU: 2} each, but no node of this cluster can hold one" in msg
    assert "set resources.cpus_per_worker to at most 1" in msg
    assert "(nodes: 2 x {CPU: 1}, 1 x {CPU: 0})" in msg
    # largest first whatever order the GCS lists the nodes in (a multi-node test once failed on this)
    cluster({"CPU": 1.0}, HEAD, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0})
    with pytest.raises(ResourceError, match=r"\(nodes: 1 x \{CPU: 1, GPU: 1\}, 2 x \{CPU: 1\}, 1 x \{CPU: 0\}\)"):
        check_resources(cpus=2, bundles=[{"CPU": 2}], fields=FIELDS)
    check_resources(cpus=2, what="job 'x'", bundles=[{"CPU": 1}] * 2, fields=FIELDS)  # one per node fits


def test_gpu_workers(cluster):
    cluster(HEAD, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0})  # 2 GPUs, one per node
    with pytest.raises(ResourceError, match=r"set resources.gpus_per_worker to at most 1"):
        check_resources(gpus=2, cpus=1, bundles=[{"CPU": 1, "GPU": 2}], fields=FIELDS)
    cluster(HEAD, {"CPU": 8.0}, {"CPU": 8.0})
    with pytest.raises(ResourceError, match="16 GPUs but the cluster has 0"):
        check_resources(gpus=16, bundles=[{"CPU": 1, "GPU": 1}] * 16)


def test_workers_that_fit_each_node_but_not_all_together(cluster):
    """2 nodes of 2 CPUs: 4 CPUs in total, yet 3 workers of 1.2 CPUs fit only one per node."""
    cluster(HEAD, {"CPU": 2.0}, {"CPU": 2.0})
    with pytest.raises(ResourceError) as e:
        check_resources(cpus=3.6, bundles=[{"CPU": 1.2}] * 3, fields=FIELDS)
    assert "holds at most 2" in str(e.value) and "lower resources.num_workers to 2" in str(e.value)
    check_resources(cpus=3.0, bundles=[{"CPU": 1.5}] * 2, fields=FIELDS)


def test_strict_strategies(cluster):
    cluster(HEAD, {"CPU": 2.0}, {"CPU": 2.0})
    check_resources(cpus=4, bundles=[{"CPU": 1}] * 4, strategy="PACK")
    with pytest.raises(ResourceError, match="holds at most 2 on one node"):
        check_resources(cpus=4, bundles=[{"CPU": 1}] * 4, strategy="STRICT_PACK")
    with pytest.raises(ResourceError, match="holds at most 2 one per node"):
        check_resources(cpus=3, bundles=[{"CPU": 1}] * 3, strategy="STRICT_SPREAD")


def test_dead_nodes_do_not_count(cluster):
    cluster(HEAD, {"CPU": 1.0}, dead=({"CPU": 8.0},))
    with pytest.raises(ResourceError, match="no node of this cluster can hold one"):
        check_resources(cpus=1, bundles=[{"CPU": 2}], fields=FIELDS)


def test_autoscaler_node_types_count_as_capacity(cluster):
    """A cluster from cluster.yaml with no GPU node up yet: 8 workers of 1 GPU are placeable,
    since the autoscaler may start gpu_worker nodes (8 GPUs each, up to 4)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.max_count = "gpu_worker", 4
    group.resources["CPU"], group.resources["GPU"] = 192, 8
    ray = cluster(HEAD, autoscaler=config)
    assert node_capacities(ray) == [HEAD] + [{"CPU": 192.0, "GPU": 8.0}] * 4
    check_resources(cpus=8, gpus=8, bundles=[{"CPU": 1, "GPU": 1}] * 8)
    with pytest.raises(ResourceError, match="set resources.gpus_per_worker to at most 8, or add nodes with at least 16 GPU"):
        check_resources(gpus=16, bundles=[{"CPU": 1, "GPU": 16}], fields=FIELDS)


# -- engine.resources: vLLM engines pinned to nodes with a custom resource ---------------------------

def _engine_check(ray, **engine):
    from rayapp.config.base import EngineConfig
    from rayapp.teachers.pool import check_engine_resources

    check_engine_resources(ray, EngineConfig(**engine), "rollout")


def test_engine_resource_no_node_has_is_refused_naming_engine_resources(cluster):
    ray = cluster(HEAD, {"CPU": 8.0}, {"CPU": 8.0})
    with pytest.raises(ResourceError) as e:
        _engine_check(ray, num_engines=2, resources={"inference": 1})
    msg = str(e.value)
    assert "engine.resources.inference: no node has any inference" in msg, msg
    assert "ray start --resources='{\"inference\": N}'" in msg, msg
    _engine_check(ray, num_engines=2)  # no custom resource: nothing to check here


def test_engine_resource_on_a_node_too_small_for_the_engine_is_refused(cluster):
    """The cluster holds 2 `inference` and 17 CPUs in total (what a totals-only check compared), but
    the one node with `inference` has 1 CPU: an engine of 2 CPUs + inference: 1 fits nowhere (Ray
    would wait forever)."""
    ray = cluster(HEAD, {"CPU": 1.0, "inference": 2.0}, {"CPU": 16.0})
    with pytest.raises(ResourceError) as e:
        _engine_check(ray, num_engines=1, cpus_per_engine=2, resources={"inference": 1})
    msg = str(e.value)
    assert "no node of this cluster can hold one" in msg, msg
    assert "no node has 2 CPU (engine.cpus_per_engine) and 1 inference (engine.resources.inference) together" in msg, msg
    _engine_check(ray, num_engines=2, cpus_per_engine=0.5, resources={"inference": 1})  # two fit on that node


def test_more_engines_than_the_resource_nodes_hold_names_num_engines(cluster):
    ray = cluster(HEAD, {"CPU": 8.0, "inference": 1.0}, {"CPU": 8.0, "inference": 1.0}, {"CPU": 64.0})
    _engine_check(ray, num_engines=2, resources={"inference": 1})
    with pytest.raises(ResourceError) as e:
        _engine_check(ray, num_engines=3, resources={"inference": 1})
    assert "holds at most 2" in str(e.value) and "lower engine.num_engines to 2" in str(e.value), str(e.value)


def test_engine_resource_an_autoscaler_node_type_offers_is_accepted(cluster):
    """cluster.yaml's inference node type, none started yet: the autoscaler can add it, so the
    engines are not refused (the trainers' check counts those nodes too)."""
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add()
    group.name, group.max_count = "inference_worker", 2
    group.resources["CPU"], group.resources["inference"] = 16, 8
    ray = cluster(HEAD, {"CPU": 8.0}, autoscaler=config)
    _engine_check(ray, num_engines=4, resources={"inference": 1})
    with pytest.raises(ResourceError, match="engine.resources.other: no node has any other"):
        _engine_check(ray, num_engines=1, resources={"other": 1})


def test_tensor_parallel_engine_places_its_actor_and_resources_in_one_node_group(cluster):
    """A GPU engine with tensor_parallel_size 4 and engine.resources: its placement group is STRICT_PACK
    (one node) and bundle 0 holds the engine actor's own CPUs and custom resource, since an actor in a
    placement group must fit in one bundle (with the resource in none, Ray could never start it);
    the up-front check asks for the whole group on one node."""
    from rayapp.config.base import EngineConfig
    from rayapp.teachers.pool import tensor_parallel_bundles

    engine = EngineConfig(use_gpu=True, tensor_parallel_size=4, cpus_per_engine=2, resources={"inference": 1})
    bundles = tensor_parallel_bundles(engine)
    assert bundles[0] == {"GPU": 1.0, "CPU": 2.0, "inference": 1.0}
    assert bundles[1:] == [{"GPU": 1.0, "CPU": 1.0}] * 3
    ray = cluster(HEAD, {"CPU": 8.0, "GPU": 8.0, "inference": 1.0})
    _engine_check(ray, num_engines=1, use_gpu=True, tensor_parallel_size=4, cpus_per_engine=2, resources={"inference": 1})
    # Four GPUs on each of two nodes, the resource on one of them: a second engine has nowhere to go.
    ray = cluster(HEAD, {"CPU": 8.0, "GPU": 4.0, "inference": 1.0}, {"CPU": 8.0, "GPU": 4.0})
    with pytest.raises(ResourceError, match="engine.num_engines"):
        _engine_check(ray, num_engines=2, use_gpu=True, tensor_parallel_size=4, resources={"inference": 1})
    # The GPUs split across nodes (2 + 2) cannot hold a 4-way engine on one node.
    ray = cluster(HEAD, {"CPU": 8.0, "GPU": 2.0, "inference": 1.0}, {"CPU": 8.0, "GPU": 2.0, "inference": 1.0})
    with pytest.raises(ResourceError, match="no node of this cluster can hold one"):
        _engine_check(ray, num_engines=1, use_gpu=True, tensor_parallel_size=4, resources={"inference": 1})


def test_ensure_ray_lengthens_rays_waits_before_it_starts_a_cluster(monkeypatch):
    """The in-process cluster gets the same busy-machine waits as the persistent head (whose job
    tests/e2e/test_deploy.py trains under one CPU burner per core): ensure_ray puts every
    BUSY_MACHINE_TIMEOUTS value into the environment before ``ray.init``, and a value already set wins."""
    import os
    import sys

    seen = {}
    fake = types.SimpleNamespace(is_initialized=lambda: False,
                                 init=lambda **kw: seen.update({k: os.environ.get(k) for k in runtime.BUSY_MACHINE_TIMEOUTS}))
    key = next(iter(runtime.BUSY_MACHINE_TIMEOUTS))
    for k in runtime.BUSY_MACHINE_TIMEOUTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv(key, "12345")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(runtime, "loopback_only", lambda: None)
    assert runtime.ensure_ray() is fake
    assert seen, "ray.init was not reached"
    assert seen[key] == "12345"
    assert all(seen[k] == v for k, (v, _) in runtime.BUSY_MACHINE_TIMEOUTS.items() if k != key), seen
