"""cluster.yaml against the Ray autoscaler's own config preparation and JSON-schema validation."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

CLUSTER_YAML = ROOT / "cluster.yaml"


def _load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill in the provider defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation():
    prepared = _validate(_load())
    assert prepared["provider"]["type"] in {"aws", "gcp", "azure"}  # a real cloud provider


def test_head_is_cpu_and_workers_have_8_gpus_and_autoscale():
    config = _validate(_load())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu_types, "no GPU worker type"
    for t in gpu_types:
        assert t["resources"]["GPU"] == 8
        assert t["min_workers"] < t["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_setup_installs_rayapp_gpu_extra():
    config = _validate(_load())
    commands = " ".join(config["setup_commands"])
    assert "rayapp[gpu]" in commands
    # The checkout that `pip install` reads is synced from the local project.
    assert any(remote.rstrip("/").endswith("rayapp") for remote in config["file_mounts"])


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda c: c.update(idle_timeout_minutes="soon"), jsonschema.ValidationError),
        (lambda c: c.update(no_such_field=1), jsonschema.ValidationError),
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=9), ValueError),
        (lambda c: c.update(head_node_type="missing"), ValueError),
    ],
)
def test_ray_validation_rejects_broken_copies(mutate, error):
    """The check is Ray's, and it can fail: broken variants of cluster.yaml are refused."""
    config = _load()
    mutate(config)
    with pytest.raises(error):
        _validate(config)
