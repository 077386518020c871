"""Submit jobs to a Ray cluster through the Ray Jobs API, and follow, list and stop them.

    rayapp submit jobs/sft_tiny.yaml --address http://HEAD:8265 [a.b=value ...] [--follow]
    rayapp jobs list | status ID | logs ID [--follow] | stop ID

The local project directory (``--working-dir``, default the current directory) travels in the
job's ``runtime_env`` as its ``working_dir``, without virtual environments, outputs, caches or
.git; the job YAML must lie inside it. On the cluster the job's current directory is that copy and
the entrypoint is ``python -m rayapp.cli run JOB [overrides]``, so the copied ``rayapp`` package is
the one that runs even where the ``rayapp`` console script is not installed, and relative data
paths mean what they mean on the laptop. ``output_dir`` should be an absolute shared path or an
object-store URI (``s3://...``): a relative one lands inside the job's temporary working directory.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

from rayapp.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded: environments, outputs, caches, VCS data. Patterns use .gitignore syntax.
WORKING_DIR_EXCLUDES = [
    ".venv/", "venv/", "env/", ".env/", "outputs/", ".git/", "__pycache__/", "*.pyc",
    ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", "*.egg-info/", "bench/results/", "node_modules/",
]
# Ray's job states -> ours. Ray 2.60 has the same five; a state added later shows as UNKNOWN(<name>).
STATES = {"PENDING": "PENDING", "RUNNING": "RUNNING", "SUCCEEDED": "SUCCEEDED", "FAILED": "FAILED", "STOPPED": "STOPPED"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(UserError, RuntimeError):
    pass


def map_state(ray_status) -> str:
    name = str(getattr(ray_status, "value", ray_status))
    return STATES.get(name, f"UNKNOWN({name})")


def resolve_address(address: str | None) -> str:
    """--address, else $RAYAPP_JOBS_ADDRESS, else $RAY_ADDRESS when it is an http(s) URL, else the Jobs API
    of the local head rayapp started (`rayapp deploy`, `make demo`) when it is up, else localhost:8265."""
    from rayapp.serving.local_head import running_dashboard

    ray_address = os.environ.get("RAY_ADDRESS", "")
    address = (address or os.environ.get("RAYAPP_JOBS_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None)
               or running_dashboard() or DEFAULT_ADDRESS)
    if "://" not in address:
        address = f"http://{address}"
    return address


def auth_headers() -> dict[str, str]:
    """Ray's token auth (on by default since Ray 2.5x): the token from $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` prints it on the head)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"authorization": f"Bearer {token}"} if token else {}


def client(address: str | None = None):
    """A JobSubmissionClient for the cluster's dashboard address (``http://HEAD:8265``)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    try:
        return JobSubmissionClient(addr, headers=auth_headers())
    except AuthenticationError:
        raise JobsError(
            f"the Ray cluster at {addr} wants an auth token: run `ray get-auth-token` on the head and set "
            "RAY_AUTH_TOKEN (or save it to ~/.ray/auth_token) here"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobsError(
            f"cannot reach the Ray Jobs API at {addr} ({str(e).splitlines()[0]}); is the cluster up? "
            "Give --address http://HEAD:8265 (`ray dashboard cluster.yaml` forwards it to localhost:8265)"
        ) from None


def _call(fn, job_id: str, *args):
    try:
        return fn(job_id, *args)
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobsError(f"no job '{job_id}' on this cluster; `rayapp jobs list` shows the ids") from None
        raise


def build_submission(job: str, overrides: list[str] | None = None, working_dir: str = ".",
                     env: dict[str, str] | None = None, python: str = "python") -> dict:
    """The keyword arguments for ``JobSubmissionClient.submit_job``: entrypoint, runtime_env, metadata."""
    root = Path(working_dir).resolve()
    job_path = Path(job).resolve()
    if not root.is_dir():
        raise JobsError(f"--working-dir {working_dir}: not a directory")
    if not job_path.is_file():
        raise JobsError(f"{job}: file not found")
    try:
        rel = job_path.relative_to(root)
    except ValueError:
        raise JobsError(
            f"{job}: the job file must lie inside the working directory {root}, which is what travels to "
            "the cluster; move it there or pass --working-dir with a directory that contains it"
        ) from None
    args = [python, "-m", "rayapp.cli", "run", rel.as_posix(), *(overrides or [])]
    runtime_env: dict = {"working_dir": str(root), "excludes": list(WORKING_DIR_EXCLUDES)}
    # The job's own log (`rayapp jobs logs`) keeps everything: no quiet console on the cluster.
    runtime_env["env_vars"] = {"RAYAPP_CONSOLE": "full", **(env or {})}
    metadata = {"rayapp_job_file": rel.as_posix(), "submitted_from": os.uname().nodename}
    return {"entrypoint": shlex.join(args), "runtime_env": runtime_env, "metadata": metadata}


def submit(job: str, address: str | None = None, overrides: list[str] | None = None, working_dir: str = ".",
           env: dict[str, str] | None = None, submission_id: str | None = None, check: bool = True,
           python: str = "python") -> str:
    """Validate the config locally (unless ``check`` is false), submit it, and return the submission id."""
    kwargs = build_submission(job, overrides, working_dir, env, python)
    if check:
        from rayapp.config import load_job

        cfg = load_job(job, overrides)
        kwargs["metadata"].update(rayapp_kind=cfg.kind, rayapp_name=getattr(cfg, "name", ""))
        out = configured_output_dir(job, overrides)
        if out is not None:
            # As written: load_job made a relative one absolute against *this* directory.
            kwargs["metadata"]["rayapp_output_dir"] = out
        if out is not None and not _is_absolute(out):
            print(f"warning: output_dir '{out}' is relative: on the cluster it is written inside the job's temporary "
                  "working directory; give an absolute shared path or an s3:// / gs:// URI", file=sys.stderr)
    c = client(address)
    try:
        return c.submit_job(submission_id=submission_id, **kwargs)
    except RuntimeError as e:
        raise JobsError(f"the cluster refused the submission: {e}") from None


def _is_absolute(out: str) -> bool:
    return "://" in out or os.path.isabs(os.path.expanduser(out))


def configured_output_dir(job: str | os.PathLike, overrides: list[str] | None = None) -> str | None:
    """A job file's output_dir as written (with overrides; the kind's default when absent), before
    load_job makes a relative one absolute against the current directory. None for kinds without one."""
    import yaml

    from rayapp.config.loader import apply_overrides, config_class

    data = yaml.safe_load(Path(job).read_text()) or {}
    data = apply_overrides(data, list(overrides or []))
    if data.get("output_dir") is not None:
        return str(data["output_dir"])
    try:
        field = config_class(data.get("kind")).model_fields.get("output_dir")
    except KeyError:
        return None
    return str(field.default) if field is not None and isinstance(field.default, str) else None


def _submitted_run(entrypoint: str) -> tuple[str, list[str]] | None:
    """(job file, overrides) of an entrypoint `... rayapp.cli run JOB [overrides]` (or `rayapp run ...`)."""
    try:
        args = shlex.split(entrypoint or "")
    except ValueError:
        return None
    for i in range(1, len(args) - 1):
        if args[i] == "run" and (args[i - 1] == "rayapp.cli" or Path(args[i - 1]).name == "rayapp"):
            return args[i + 1], args[i + 2 :]
    return None


def job_progress_lines(info, working_dir: str = ".") -> list[str]:
    """What `rayapp jobs status` adds about how far a submitted job has got: step/total, the last
    loss, the pipeline stage, read from its output_dir. When that cannot be read from here, one line
    that says why; never an error."""
    from rayapp.progress import read_progress

    meta = info.metadata or {}
    run = _submitted_run(info.entrypoint)
    config, out = None, meta.get("rayapp_output_dir")
    job_file = meta.get("rayapp_job_file") or (run[0] if run else None)
    local_job = Path(working_dir) / job_file if job_file else None
    if local_job is not None and local_job.is_file():
        from rayapp.config import ConfigError, load_job

        overrides = run[1] if run else []
        try:
            config = load_job(local_job, overrides).model_dump(mode="json")
            out = out or configured_output_dir(local_job, overrides)
        except (ConfigError, OSError, ValueError):
            config = None
    if out is None:
        where = f"{job_file} is not in {Path(working_dir).resolve()}" if job_file else "it was not submitted by rayapp"
        return [f"progress: unknown here ({where}; run this from the project directory it was submitted from)"]
    if not _is_absolute(out):
        return [f"progress: not readable from here: output_dir '{out}' is relative, so the job writes it inside "
                "its working directory on the cluster; submit with an absolute shared path or an s3:// URI"]
    if "://" not in out and not Path(out).expanduser().exists():
        if map_state(info.status) == "PENDING":
            return ["progress: not started"]
        return [f"progress: not readable from here: {out} does not exist on this machine (it is on the cluster's "
                "nodes; run `rayapp jobs status` where that path is mounted)"]
    try:
        return read_progress(out, config).lines()
    except Exception as e:  # a store that cannot be read from here (credentials, network)
        return [f"progress: not readable from here: {out} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]


def status(job_id: str, address: str | None = None) -> str:
    return map_state(_call(client(address).get_job_status, job_id))


def wait(job_id: str, address: str | None = None, timeout_s: float = 3600, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal state and return it."""
    c = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        state = map_state(_call(c.get_job_status, job_id))
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise JobsError(f"job {job_id} still {state} after {timeout_s:g} s")
        time.sleep(poll_s)


def logs(job_id: str, address: str | None = None) -> str:
    return _call(client(address).get_job_logs, job_id)


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs until it ends; return its final state."""
    out = out or sys.stdout
    c = client(address)
    _call(c.get_job_info, job_id)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError:  # the log socket closed early: fall back to polling
        pass
    return wait(job_id, address)


def stop(job_id: str, address: str | None = None, wait_s: float = 60) -> str:
    """Ask Ray to stop the job (SIGTERM to the entrypoint, SIGKILL after a grace period); return its state."""
    c = client(address)
    _call(c.stop_job, job_id)
    return wait(job_id, address, timeout_s=wait_s)


def list_jobs(address: str | None = None) -> list[dict]:
    """Submitted jobs, oldest first, as dicts with id, state, start, end, name, message, entrypoint."""
    rows = []
    for j in client(address).list_jobs():
        if not j.submission_id:  # drivers that connected directly, not submitted jobs
            continue
        meta = j.metadata or {}
        rows.append({
            "id": j.submission_id, "state": map_state(j.status), "start": j.start_time, "end": j.end_time,
            "name": meta.get("rayapp_name") or meta.get("rayapp_job_file") or "", "message": j.message or "",
            "entrypoint": j.entrypoint,
        })
    return sorted(rows, key=lambda r: r["start"] or 0)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item}: expected KEY=VALUE")
        env[key] = value
    return env


def _cmd_submit(args) -> int:
    job_id = submit(args.job, args.address, args.overrides, args.working_dir, _parse_env(args.env),
                    args.submission_id, check=not args.skip_local_check, python=args.python)
    print(job_id, flush=True)
    if not args.follow:
        print(f"follow it with: rayapp jobs logs {job_id} --follow", file=sys.stderr)
        return 0
    state = follow(job_id, args.address)
    print(f"{job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def _cmd_jobs(args) -> int:
    if args.action == "list":
        rows = list_jobs(args.address)
        print(f"{'ID':<34} {'STATE':<10} {'STARTED':<20} {'ENDED':<20} NAME")
        for r in rows:
            print(f"{r['id']:<34} {r['state']:<10} {_when(r['start']):<20} {_when(r['end']):<20} {r['name']}")
        return 0
    if not args.id:
        raise JobsError(f"rayapp jobs {args.action}: give a job id (`rayapp jobs list` shows them)")
    if args.action == "status":
        info = _call(client(args.address).get_job_info, args.id)
        print(f"{args.id}: {map_state(info.status)}")
        if info.message:
            print(f"message: {info.message}")
        print(f"started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
        print(f"entrypoint: {info.entrypoint}")
        for line in job_progress_lines(info, args.working_dir):
            print(line)
        return 0
    if args.action == "logs":
        if args.follow:
            state = follow(args.id, args.address)
            print(f"{args.id}: {state}", file=sys.stderr)
        else:
            sys.stdout.write(logs(args.id, args.address))
        return 0
    if args.action == "stop":
        state = stop(args.id, args.address)
        print(f"{args.id}: {state}")
        return 0 if state == "STOPPED" else 1
    raise AssertionError(args.action)


def register_cli(subparsers) -> None:
    address_help = f"Ray dashboard address, http://HEAD:8265 (default: $RAYAPP_JOBS_ADDRESS, an http $RAY_ADDRESS, else {DEFAULT_ADDRESS})"
    p = subparsers.add_parser("submit", help="submit a job to a Ray cluster through the Ray Jobs API; prints its id")
    p.add_argument("job", help="job YAML file, inside the working directory")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, passed on to `rayapp run`")
    p.add_argument("--address", help=address_help)
    p.add_argument("--working-dir", default=".", help="project directory uploaded with the job (default: .)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    p.add_argument("--submission-id", help="id to give the job (default: Ray makes one)")
    p.add_argument("--follow", action="store_true", help="stream the logs until the job ends; exit 0 only if it succeeded")
    p.add_argument("--python", default="python", help="Python on the cluster that runs `-m rayapp.cli` (default: python)")
    p.add_argument("--skip-local-check", action="store_true",
                   help="send the job without validating its config here (e.g. a kind this install lacks)")
    p.set_defaults(func=_cmd_submit)

    p = subparsers.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id (from `rayapp submit` or `rayapp jobs list`)")
    p.add_argument("--address", help=address_help)
    p.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    p.add_argument("--working-dir", default=".",
                   help="with status: the project directory the job was submitted from, where its job file lies (default: .)")
    p.set_defaults(func=_cmd_jobs)
