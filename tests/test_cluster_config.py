"""cluster.yaml must be a valid Ray cluster-launcher config for the pinned Ray."""

import json
import re
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


def test_every_node_installs_the_project_it_was_sent_at_the_drivers_ray():
    """The setup command installs from the folder the project is mounted to; the Ray version
    cluster.yaml promises is pyproject.toml's pin, the Ray whose schema the test above used."""
    _, config = _load()
    mounted = [remote for remote, local in config["file_mounts"].items() if local == "."]
    installs = [cmd for cmd in config["setup_commands"] if "pip install -e ." in cmd]
    assert len(mounted) == 1 and installs == [f"cd {mounted[0]} && python3 -m pip install -e ."]
    assert ".venv" in config["rsync_exclude"]  # the laptop's environment stays behind
    promised = set(re.findall(r"ray\[[a-z,]+\]==([\d.]+)", (REPO / "cluster.yaml").read_text()))
    pinned = set(re.findall(r'"ray\[[a-z,]+\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()))
    assert promised == pinned == {ray.__version__}


def test_the_head_takes_no_gpu_work():
    _, config = _load()
    start = " ".join(config["head_start_ray_commands"])
    assert "--head" in start and "--num-gpus=0" in start  # else Ray detects a head GPU itself
