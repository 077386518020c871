"""A persistent local Ray head for deployments that must outlive the ``rayapp`` process.

An in-process cluster (``ray.init()`` with no address) dies with the driver, and with it
every Serve deployment. Without ``RAY_ADDRESS``, ``rayapp deploy`` therefore starts (or
reuses) a head with ``ray start --head`` and records it in ``cache_dir()/local_cluster.json``.
The head keeps its own temp dir, so a plain ``ray.init()`` elsewhere on the machine never
attaches to it by accident.

What keeps it private (see SECURITY.md):

- Ray's token authentication stays on (``RAY_AUTH_MODE=token``): every client, worker and the
  Serve proxy present the machine's token (``~/.ray/auth_token``, or ``$RAY_AUTH_TOKEN_PATH``,
  or ``$RAY_AUTH_TOKEN``), generated once with mode 0600 by :func:`ensure_auth_token`.
- Every port binds 127.0.0.1. ``--node-ip-address=127.0.0.1`` alone does not do it: ``ray start``
  swaps a loopback address for the machine's network address, and the GCS, raylet and agents
  then listen on every interface. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's single-machine
  mode, the default on macOS) keeps the node address on loopback, and with it every server.
- Every process of the head carries ``RAYAPP_HEAD=<temp dir>`` in its environment (Ray passes
  the environment on to the raylet's workers, agents and Serve replicas), which is how
  :func:`stop_local_head` finds all of them, and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from rayapp.errors import UserError
from rayapp.runtime import LOOPBACK_ENV, busy_machine_timeouts, require_token_auth

log = logging.getLogger(__name__)

DEFAULT_HEAD_CPUS = 8
HEAD_MARKER = "RAYAPP_HEAD"  # environment variable every process of the head inherits: its temp dir


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


def running_dashboard() -> str | None:
    """Jobs API URL (``http://127.0.0.1:PORT``) of the recorded local head if it answers, else None."""
    rec = read_record()
    url = (rec or {}).get("dashboard")
    if url and _alive(url.removeprefix("http://")):
        return url
    return None


def ensure_auth_token() -> Path | None:
    """The file holding this machine's Ray auth token, created (mode 0600) if there is none.

    ``$RAY_AUTH_TOKEN`` set: Ray uses it and no file is needed (returns None). Otherwise the file
    is ``$RAY_AUTH_TOKEN_PATH`` or Ray's default ``~/.ray/auth_token``, where Ray's own clients
    (``ray`` CLI, ``ray.init``, the Jobs SDK, :func:`rayapp.jobs.auth_headers`) look too.
    """
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.read_text().strip():
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o600)  # Ray writes it with the umask; nobody else on the machine may read it
            log.info("made %s readable by its owner only", path)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, the form `ray get-auth-token --generate` writes
    os.replace(tmp, path)
    log.info("generated a Ray auth token in %s", path)
    return path


def use_head(address: str) -> None:
    """Point this process's Ray clients (ray.init, Ray Train, Serve) at the local head, with its token."""
    os.environ["RAY_ADDRESS"] = address
    require_token_auth()


def ensure_local_head(num_cpus: int | None = None, set_env: bool = True) -> str:
    """Start or reuse the persistent local head; return its address ``127.0.0.1:PORT``.

    With ``set_env`` the address (and token mode) go into the environment so that
    :func:`rayapp.runtime.ensure_ray` (and Ray Train, Serve) connect to this head.
    """
    ensure_auth_token()
    address = running_head()
    if address is None:
        address = _start_head(num_cpus or int(os.environ.get("RAYAPP_LOCAL_CPUS", DEFAULT_HEAD_CPUS)))
    if set_env:
        use_head(address)
    return address


def _start_head(num_cpus: int, attempts: int = 4) -> str:
    """``ray start --head`` on loopback; retried because a loaded machine can time out the node start."""
    for attempt in range(1, attempts + 1):
        port, dashboard_port = _free_port(), _free_port()
        temp_dir = f"/tmp/rayapp-head-{os.getuid()}-{port}"  # short: Ray's socket paths must fit 107 bytes
        proc = subprocess.run(_head_command(port, dashboard_port, num_cpus, temp_dir), capture_output=True,
                              text=True, env=_head_env(temp_dir))
        if proc.returncode == 0:
            break
        _kill(head_pids(temp_dir))  # what a failed start left behind
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}",
                               "temp_dir": temp_dir, "started_by": "rayapp", "num_cpus": num_cpus,
                               "started_at": time.time()}, indent=2))
    os.replace(tmp, path)
    log.info("started a local Ray head at %s (%d logical CPUs, Jobs API http://127.0.0.1:%d) for deployments",
             address, num_cpus, dashboard_port)
    return address


def _head_command(port: int, dashboard_port: int, num_cpus: int, temp_dir: str) -> list[str]:
    # The dashboard serves the Jobs API (`rayapp submit` / `rayapp jobs`) and the State API that Ray
    # Train's controller polls; it listens on 127.0.0.1 and asks for the token like everything else.
    cmd = [
        _ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        "--object-store-memory=500000000",
    ]
    # Ray's fixed default ports (client server 10001, agent 52365, ...) collide with other heads here.
    cmd += [f"--{flag}={_free_port()}" for flag in (
        "ray-client-server-port", "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    return cmd


def _head_env(temp_dir: str) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["RAY_AUTH_MODE"] = "token"  # whatever the caller's shell says: this head is never open
    # Jobs submitted to this head run `python -m rayapp.cli`: the Python that started it comes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(LOOPBACK_ENV)
    env[HEAD_MARKER] = temp_dir
    return busy_machine_timeouts(env)  # Ray's waits, lengthened for loaded machines (each with its reason)


def _kill(pids: list[int], sig: int = 9) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_local_head() -> bool:
    """Stop every process of the head rayapp started (only that head); return True if one was stopped."""
    rec = read_record()
    if not rec or rec.get("started_by") != "rayapp":
        return False
    temp_dir = rec["temp_dir"]
    pids = head_pids(temp_dir)
    # `ray stop` would stop every Ray on the machine; signal only this head's processes.
    _kill(pids, 15)
    for _ in range(60):
        if not head_pids(temp_dir):
            break
        time.sleep(0.25)
    _kill(head_pids(temp_dir))  # what did not exit on SIGTERM
    for _ in range(20):
        if not head_pids(temp_dir):
            break
        time.sleep(0.25)
    if left := head_pids(temp_dir):
        log.warning("processes of the local head are still running after SIGKILL: %s", left)
    else:
        shutil.rmtree(temp_dir, ignore_errors=True)
    record_path().unlink(missing_ok=True)
    return bool(pids)


def head_pids(temp_dir: str) -> list[int]:
    """This head's processes: those whose environment carries ``RAYAPP_HEAD=<temp_dir>``.

    The command line is not enough: the Ray client server, the dashboard and runtime-env agents
    and the workers never name the temp dir there (they outlived ``--shutdown`` that way).
    """
    marker = f"{HEAD_MARKER}={temp_dir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids
