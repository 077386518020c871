"""Every Ray cluster rayapp starts keeps token authentication and listens on loopback only.

Two clusters: the in-process one of `rayapp run` (the session's ``ray_cluster``) and the
persistent local head that `rayapp deploy` and `make demo` leave running. For each: every port
their processes listen on is a loopback address; the machine's own network addresses refuse the
connection; and a client on loopback without the token is refused with InvalidAuthToken. Then
rayapp's own commands work against the head it started (submit + jobs, deploy, --status), and
`rayapp deploy --shutdown` leaves no process of that head behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.conftest import ROOT, PrivateHead

pytestmark = pytest.mark.integration

RAYAPP = [sys.executable, "-m", "rayapp.cli"]


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every TCP socket in LISTEN state that one of ``pids`` holds."""
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [(pid, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def machine_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses: where a neighbour would connect."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]


def grpc_status_without_token(ip: str, port: int):
    """The status a gRPC call without Ray's token gets from ``ip:port`` (any method: auth comes first)."""
    import grpc

    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(b"", timeout=30)
        except grpc.RpcError as e:
            return e.code()
    return None


def assert_private(pids, ports: list[int]) -> None:
    """Every listener of ``pids`` is on loopback, except Serve replicas' inter-deployment gRPC servers,
    which Ray binds to ``[::]:0`` with no option to change it (ray/serve/_private/replica.py): those
    must refuse a call without the token. ``ports`` must refuse connections on the machine's addresses."""
    import grpc

    sockets = listening(pids)
    assert sockets, "found no listening socket at all: the check would pass vacuously"
    for pid, ip, port in (s for s in sockets if not is_loopback(s[1])):
        title = " ".join(psutil.Process(pid).cmdline())
        assert title.startswith("ray::ServeReplica"), f"{title!r} (pid {pid}) listens on {ip}:{port}"
        for addr in machine_addresses():
            assert grpc_status_without_token(addr, port) == grpc.StatusCode.UNAUTHENTICATED, (title, addr, port)
    for ip in machine_addresses():
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((ip, port), timeout=5).close()


def start_client_without_token(address: str) -> subprocess.Popen:
    """A Ray client on loopback with token auth switched off on its side (what a stranger would run)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    code = ("import ray\n"
            f"ray.init(address={address!r})\n"
            "print('RAN REMOTE CODE', ray.get(ray.remote(lambda: 1).remote()))\n")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def assert_refused(client: subprocess.Popen) -> None:
    out, _ = client.communicate(timeout=180)
    assert client.returncode != 0 and "RAN REMOTE CODE" not in out, out[-2000:]
    assert "InvalidAuthToken" in out, out[-2000:]


def gcs_port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_in_process_cluster_is_loopback_only_and_wants_the_token(ray_cluster):
    address = ray_cluster.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:"), address
    client = start_client_without_token(address)  # ~20 s of retries before it gives up; overlap them
    me = psutil.Process()
    assert_private([me.pid, *(c.pid for c in me.children(recursive=True))], [gcs_port(address)])
    assert_refused(client)


def test_shell_with_auth_disabled_does_not_open_the_in_process_cluster(tmp_path):
    """`RAY_AUTH_MODE=disabled` in the user's shell (meant for some other cluster) is ignored."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    code = ("import sys, time\n"
            "from rayapp.runtime import ensure_ray\n"
            "ray = ensure_ray()\n"
            "print(ray.get_runtime_context().gcs_address, flush=True)\n"
            "time.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        address = driver.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address
        client = start_client_without_token(address)
        tree = [driver.pid, *(c.pid for c in psutil.Process(driver.pid).children(recursive=True))]
        assert_private(tree, [gcs_port(address)])
        assert_refused(client)
    finally:
        driver.kill()
        driver.wait()


def rayapp(head: PrivateHead, *args: str, cwd=ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYAPP, *args], cwd=cwd, env=head.env, capture_output=True, text=True, timeout=timeout)


def test_local_head_is_loopback_only_and_wants_the_token(private_head):
    client = start_client_without_token(private_head.address)
    dashboard_port = int(private_head.dashboard.rsplit(":", 1)[1])
    assert_private(private_head.pids(), [gcs_port(private_head.address), dashboard_port])
    # The Jobs API (dashboard) asks for the token too.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{private_head.dashboard}/api/jobs/", timeout=30)
    assert err.value.code == 401
    assert_refused(client)
    rec = json.loads(private_head.record.read_text())
    assert rec["dashboard"] == private_head.dashboard and rec["dashboard"].startswith("http://127.0.0.1:")


def test_rayapp_commands_work_against_the_head_it_started(private_head, tmp_path, tiny_model_dir):
    from openai import OpenAI

    # submit + jobs: no --address, the recorded head's Jobs API is the default.
    project = tmp_path / "project"
    project.mkdir()
    out = tmp_path / "data_out"
    (project / "data.yaml").write_text(
        f"kind: dataset\nname: data\ndataset: chain_sum\noutput_dir: {out}\nsizes: {{train: 8, test: 4}}\nseed: 1\n")
    sub = rayapp(private_head, "submit", str(project / "data.yaml"), "--working-dir", str(project), "--follow")
    job_id = sub.stdout.splitlines()[0].strip() if sub.stdout else ""
    assert sub.returncode == 0 and f"{job_id}: SUCCEEDED" in sub.stdout, sub.stdout[-3000:] + sub.stderr[-3000:]
    assert (out / "train.jsonl").exists()
    status = rayapp(private_head, "jobs", "status", job_id)
    assert f"{job_id}: SUCCEEDED" in status.stdout, status.stdout + status.stderr
    assert job_id in rayapp(private_head, "jobs", "list").stdout

    # deploy, call it, --status, then --shutdown stops every process of the head.
    port = _free_port()
    dep = rayapp(private_head, "deploy", str(tiny_model_dir), "--name", "sec-tiny", "--port", str(port),
                 "--max-model-len", "256")
    assert dep.returncode == 0 and f"http://127.0.0.1:{port}/v1" in dep.stdout, dep.stdout[-2000:] + dep.stderr[-3000:]
    assert [s for s in listening(private_head.pids()) if s[2] == port], "the Serve proxy is not one of the head's processes"
    assert_private(private_head.pids(), [port])
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    chat = client.chat.completions.create(model="sec-tiny", messages=[{"role": "user", "content": "2+3="}],
                                          max_tokens=4, temperature=0)
    assert chat.choices[0].finish_reason in ("stop", "length")
    status = rayapp(private_head, "deploy", "--status")
    assert "sec-tiny" in status.stdout and "RUNNING" in status.stdout, status.stdout + status.stderr

    assert private_head.pids()
    down = rayapp(private_head, "deploy", "--shutdown")
    assert down.returncode == 0 and "sec-tiny" in down.stdout and "local Ray head" in down.stdout, down.stderr
    deadline = time.monotonic() + 30
    while private_head.pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(pid, " ".join(psutil.Process(pid).cmdline())[:120]) for pid in private_head.pids()]
    assert not left, f"processes of the stopped head still running: {left}"
    assert not private_head.record.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gcs_port(private_head.address)), timeout=5).close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
