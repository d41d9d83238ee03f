"""cluster.yaml must be a valid Ray cluster-launcher config for the pinned Ray."""

import json
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]


def _load():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return schema, config


def test_cluster_yaml_validates_against_rays_schema():
    schema, config = _load()
    jsonschema.validate(config, schema)


def test_cluster_yaml_scales_gpu_workers_from_zero_and_installs_the_project():
    _, config = _load()
    head = config["available_node_types"][config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)
    assert any("pip install -e ." in cmd for cmd in config["setup_commands"])
    assert all("IamInstanceProfile" in t["node_config"] for t in config["available_node_types"].values())


def test_schema_check_catches_a_broken_config():
    """The validation above can fail: a config with an unknown top-level key does."""
    import pytest

    schema, config = _load()
    config["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
