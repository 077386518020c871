"""A persistent local Ray head for deployments that must outlive the ``rayapp`` process.

An in-process cluster (``ray.init()`` with no address) dies with the driver, and with it
every Serve deployment. Without ``RAY_ADDRESS``, ``rayapp deploy`` therefore starts (or
reuses) a head with ``ray start --head`` on 127.0.0.1 and records it in
``cache_dir()/local_cluster.json``. The head keeps its own temp dir, so a plain
``ray.init()`` elsewhere on the machine never attaches to it by accident.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from rayapp.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_HEAD_CPUS = 8


class LocalHeadError(UserError, RuntimeError):
    pass


def record_path() -> Path:
    from rayapp.models.io import cache_dir

    return Path(os.environ.get("RAYAPP_LOCAL_CLUSTER_FILE", cache_dir() / "local_cluster.json"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def read_record() -> dict | None:
    path = record_path()
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def running_head() -> str | None:
    """Address of the recorded local head if it still answers, else None."""
    rec = read_record()
    if rec and _alive(rec["address"]):
        return rec["address"]
    return None


def ensure_local_head(num_cpus: int | None = None, set_env: bool = True) -> str:
    """Start or reuse the persistent local head; return its address ``127.0.0.1:PORT``.

    With ``set_env`` the address goes into ``RAY_ADDRESS`` so that
    :func:`rayapp.runtime.ensure_ray` (and Ray Train, Serve) connect to this head.
    """
    address = running_head()
    if address is None:
        address = _start_head(num_cpus or int(os.environ.get("RAYAPP_LOCAL_CPUS", DEFAULT_HEAD_CPUS)))
    if set_env:
        os.environ["RAY_ADDRESS"] = address
    return address


def _start_head(num_cpus: int, attempts: int = 4) -> str:
    """``ray start --head`` on loopback; retried because a loaded machine can time out the node start."""
    for attempt in range(1, attempts + 1):
        port = _free_port()
        temp_dir = f"/tmp/rayapp-head-{os.getuid()}-{port}"  # short: Ray's socket paths must fit 107 bytes
        proc = subprocess.run(_head_command(port, num_cpus, temp_dir), capture_output=True, text=True, env=_head_env())
        if proc.returncode == 0:
            break
        _kill(_head_pids(temp_dir))  # what a failed start left behind
        if attempt == attempts:
            raise LocalHeadError(
                f"`ray start --head` failed {attempts} times (last exit {proc.returncode}):\n{proc.stderr[-1500:]}\n"
                "the machine may be overloaded; retry, or set RAY_ADDRESS to an existing cluster"
            )
        log.warning("`ray start --head` failed (attempt %d of %d); retrying", attempt, attempts)
    address = f"127.0.0.1:{port}"
    for _ in range(60):
        if _alive(address):
            break
        time.sleep(0.5)
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"address": address, "temp_dir": temp_dir, "started_by": "rayapp",
                                "num_cpus": num_cpus, "started_at": time.time()}, indent=2))
    log.info("started a local Ray head at %s (%d logical CPUs) for deployments", address, num_cpus)
    return address


def _head_command(port: int, num_cpus: int, temp_dir: str) -> list[str]:
    cmd = [
        _ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", "--object-store-memory=500000000", "--dashboard-host=127.0.0.1",
    ]
    # Ray's fixed default ports (client server 10001, agent 52365, ...) collide with other heads here.
    cmd += [f"--{flag}={_free_port()}" for flag in (
        "ray-client-server-port", "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    return cmd


def _head_env() -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The head listens on loopback only; Ray's token auth would make every client find ~/.ray/auth_token.
    env["RAY_AUTH_MODE"] = "disabled"
    # On a loaded machine the dashboard agent can take longer than the raylet's default wait to come up.
    env.setdefault("RAY_agent_register_timeout_ms", "300000")
    env.setdefault("RAY_raylet_start_wait_time_s", "300")
    return env


def _kill(pids: list[int], sig: int = 9) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_local_head() -> bool:
    """Stop the head rayapp started (only that one); return True if one was stopped."""
    rec = read_record()
    if not rec or rec.get("started_by") != "rayapp":
        return False
    pids = _head_pids(rec["temp_dir"])
    # `ray stop` would stop every Ray on the machine; signal only this head's processes.
    _kill(pids, 15)
    for _ in range(40):
        if not _head_pids(rec["temp_dir"]):
            break
        time.sleep(0.25)
    _kill(_head_pids(rec["temp_dir"]))  # what did not exit on SIGTERM
    record_path().unlink(missing_ok=True)
    return bool(pids)


def _head_pids(temp_dir: str) -> list[int]:
    """Processes whose command line names this head's temp dir (raylet, gcs, workers, ...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids
