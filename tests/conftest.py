"""Shared fixtures: one local Ray cluster per test session, the tiny model built once."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Keep every test offline and quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Fake AWS credentials before any Ray process starts (tests/s3_server.py says why).
from tests.gcs_server import gcs_server  # noqa: E402, F401 (fixtures)
from tests.s3_server import s3_bucket, s3_server, use_fake_aws_credentials  # noqa: E402, F401 (fixtures)

use_fake_aws_credentials()


def free_port() -> int:
    """A TCP port nothing listens on now (for a Serve proxy or a Ray head), below the kernel's
    ephemeral range and above Ray's worker ports (10002-19999): a port the kernel hands out itself
    (bind to 0) is soon handed out again to one of the many sockets Ray opens, and a Serve proxy
    started minutes later (after training) then fails with "Failed to bind"."""
    import random

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else 32768
    for _ in range(200):
        port = random.randrange(20000, max(low, 20001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port between 20000 and the ephemeral range")


def make_adapter(base_dir, out_dir, seed: int = 0):
    """A LoRA adapter for the tiny model whose lora_B is perturbed, so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from rayapp.models.io import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(str(base_dir)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(str(out_dir))
    return out_dir


class CpuBurners:
    """One busy-looping process per core, bounded in time (30 min) and killed on exit: a machine
    whose cores are all busy with something else while a job runs (issue 18)."""

    BURN = "import time\nend = time.time() + 1800\nwhile time.time() < end:\n    pass\n"

    def __enter__(self) -> CpuBurners:
        import subprocess
        import sys

        self.procs = [subprocess.Popen([sys.executable, "-c", self.BURN]) for _ in range(os.cpu_count() or 1)]
        return self

    def all_alive(self) -> bool:
        return all(b.poll() is None for b in self.procs)

    def cpu_seconds(self) -> list[float]:
        """CPU seconds each burner has had so far (user + system, from /proc)."""
        out = []
        for b in self.procs:
            fields = Path(f"/proc/{b.pid}/stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return out

    def __exit__(self, *exc) -> None:
        for b in self.procs:
            b.kill()
            b.wait()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The locally built tiny Llama (random weights), as a Hugging Face directory."""
    from rayapp.models.io import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from rayapp.models.io import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process local Ray cluster for the whole session (8 logical CPUs on 2 cores)."""
    os.environ.pop("RAY_ADDRESS", None)
    from rayapp.runtime import ensure_ray

    ray = ensure_ray()
    yield ray
    ray.shutdown()


class PrivateHead:
    """rayapp's persistent local head (`ray start --head`, started as `rayapp deploy` starts it), with
    a record file private to the tests that use it, so no other test or user session attaches to it.

    ``env`` is the environment for `rayapp` subprocesses that should find this head (deploy
    --status/--shutdown, submit/jobs without --address)."""

    def __init__(self, record: Path):
        from rayapp.serving import local_head

        self.record = record
        self.env = dict(os.environ, RAYAPP_LOCAL_CLUSTER_FILE=str(record))
        self.env.pop("RAY_ADDRESS", None)
        with mock.patch.dict(os.environ, RAYAPP_LOCAL_CLUSTER_FILE=str(record)):
            self.address = local_head.ensure_local_head(set_env=False)
            rec = local_head.read_record()
        self.dashboard = rec["dashboard"]
        self.temp_dir = rec["temp_dir"]

    def pids(self) -> list[int]:
        from rayapp.serving.local_head import head_pids

        return head_pids(self.temp_dir)

    def stop(self) -> None:
        from rayapp import jobs
        from rayapp.serving import local_head

        with mock.patch.dict(os.environ, RAYAPP_LOCAL_CLUSTER_FILE=str(self.record)):
            try:  # leave no job running on a head that is going away
                if local_head.running_dashboard():
                    for row in jobs.list_jobs(self.dashboard):
                        if row["state"] not in jobs.TERMINAL:
                            jobs.stop(row["id"], self.dashboard, wait_s=30)
            finally:
                local_head.stop_local_head()



@pytest.fixture(scope="module")
def private_head(tmp_path_factory):
    """A persistent local head (see PrivateHead) for one test module; stopped at its end."""
    head = PrivateHead(tmp_path_factory.mktemp("head") / "local_cluster.json")
    try:
        yield head
    finally:
        head.stop()


_TIER = {"unit": 0, "integration": 1, "e2e": 2}
_FIRST_E2E = pytest.StashKey[str]()  # the first end-to-end test, when no end-to-end test uses ray_cluster


def pytest_collection_modifyitems(config, items):
    """Unit tests first (a unit failure shows in the first minute, not after the integration
    tests), then integration, then end-to-end; each test under tests/integration/ carries the
    ``integration`` marker whether or not its file says so."""
    def tier(item) -> int:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        return _TIER.get(parts[1], 1) if len(parts) > 2 and parts[0] == "tests" else 1

    for item in items:
        if tier(item) == 1 and "/tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    items.sort(key=tier)  # stable: each module's tests keep their order
    e2e = [item for item in items if tier(item) == 2]
    if e2e and not any("ray_cluster" in getattr(item, "fixturenames", ()) for item in e2e):
        config.stash[_FIRST_E2E] = e2e[0].nodeid


def pytest_runtest_setup(item):
    """Before the first end-to-end test, stop the session's in-process Ray cluster (no end-to-end
    test uses it; each starts its own head). What the integration tests left in it — Serve's
    controller and proxy, Train and Data actors of finished runs — would otherwise share the 2 cores
    with the end-to-end jobs for the last half hour of the suite."""
    if item.config.stash.get(_FIRST_E2E, None) == item.nodeid and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
