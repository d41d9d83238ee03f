"""Shared fixtures: one small Ray instance per test session, a real S3 endpoint on loopback.

The S3 endpoint is ``moto_server`` (as s3fs's own test suite does), started once per session.
Fake credentials are set at import time, before Ray starts, so Ray's worker processes inherit
them and can reach the endpoint too.

Every test that needs Ray (the session Ray, or a cluster of its own) is marked ``ray`` here,
from the fixtures it uses, so ``pytest -m "not ray"`` runs the Ray-free core; a test that
starts Ray without being marked fails, so the mark stays true.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Data's progress output is noise in test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # jobs/ are imported by the tests as modules


#: Fixtures that start Ray: the session's, and ``tests/test_train.py``'s second cluster.
RAY_FIXTURES = frozenset({"ray_session", "head_node"})


def pytest_collection_modifyitems(config, items):
    """Mark ``ray`` every test that uses a Ray fixture, directly or through another fixture."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def _ray_mark_is_true(request):
    """A test that starts Ray in this process must be marked ``ray`` (use ``ray_session``)."""
    was_up = _ray_is_up()
    yield
    if not was_up and _ray_is_up() and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} started Ray without the ray_session fixture, so "
                    "`pytest -m 'not ray'` would run it; request ray_session", pytrace=False)


@pytest.fixture(scope="session")
def ray_session():
    """One Ray for the whole session. 4 logical CPUs on a 2-core box: training workers and
    Ray Data tasks must be able to coexist (docs/architecture.md, "Ray notes")."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR",
                 object_store_memory=512 * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; yields its URL."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; yields ``s3://<bucket>``."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture()
def one_torch_thread():
    """One intra-op torch thread for the test (two tests' threads would contend on 2 cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
