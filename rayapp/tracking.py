"""Experiment tracking: ``report_to: [tensorboard, mlflow, wandb]`` (none by default).

One :class:`Trackers` object per job, opened on the driver (or rank 0; any other rank gets a
no-op), sends every metrics.jsonl series, the resolved config and the job's artifacts to each
tracker named:

| tracker | where | what it holds |
| --- | --- | --- |
| tensorboard | ``output_dir/tensorboard/`` (event files, tensorboardX, which ray[train] installs) | a scalar per metric, the resolved config as text |
| mlflow | ``$MLFLOW_TRACKING_URI`` when set, else a file store in ``output_dir/mlruns``; experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``rayapp`` | metric histories, the config flattened as params (``train.learning_rate``), artifacts |
| wandb | ``output_dir/wandb/``; project ``$WANDB_PROJECT`` or ``rayapp``; offline unless logged in | history, the config, artifacts |

W&B mode: ``$WANDB_MODE`` when set; else ``online`` when this machine is logged in
(``$WANDB_API_KEY``, ``$WANDB_IDENTITY_TOKEN_FILE`` or a .netrc entry for the W&B host, which is
what ``wandb login`` writes), else ``offline``: ``wandb sync output_dir/wandb/offline-run-*``
uploads the run later. MLflow's file store is in maintenance mode since MLflow 3.7 and refuses to
open unless ``MLFLOW_ALLOW_FILE_STORE=true``; rayapp sets that when the store is a file store
(its default), because plain files in output_dir work on a shared mount and need no database. To open it:
``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri outputs/JOB/mlruns`` (the UI is in
the full ``mlflow`` package), or point ``MLFLOW_TRACKING_URI`` at a server or ``sqlite:///...``.

How metrics get there: :meth:`Trackers.follow` tails ``output_dir/metrics.jsonl`` in a thread of
the driver while training runs (the workers' rank 0 writes that file; nothing is streamed from
them), and :meth:`Trackers.sync_metrics` forwards what is left when training ends. Each tracker
gets each step once: ``output_dir/tracking.json`` keeps the run ids and the last step sent, so a
re-run that resumes from a checkpoint continues the same runs (MLflow run, W&B run id resumed,
the same TensorBoard directory) with the steps after it. Rows of steps a killed attempt already
sent are not sent again (W&B refuses steps that go back), so after a resume the trackers keep the
killed attempt's values for the steps between the checkpoint and the kill; metrics.jsonl has the
re-run's. Offline, each such process writes its own ``offline-run-*`` directory under the same W&B
run id, which ``wandb sync`` uploads in turn (not tried here: these machines have no network).
:func:`replay_metrics` (``rayapp track``) backfills a finished job's output_dir the same way.
The driver reads metrics.jsonl from output_dir, so it must see it: a local path or a shared mount.

Nothing heavy is imported with this module: each library only when its tracker opens.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
import string
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rayapp.errors import UserError

STATE_FILE = "tracking.json"
# tracker -> (module it needs, the pip package that brings it)
REQUIREMENTS = {
    "tensorboard": ("tensorboardX", "tensorboardX"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
MLFLOW_PARAM_MAX = 6000  # characters MLflow keeps of a param value


class TrackingError(UserError, RuntimeError):
    pass


def missing_packages(report_to: list[str]) -> list[str]:
    """The pip packages the trackers in ``report_to`` need and this environment lacks."""
    missing = []
    for name in report_to:
        module, package = REQUIREMENTS[name]
        if module in sys.modules:  # imported already, or blocked (None)
            found = sys.modules[module] is not None
        else:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
        if not found:
            missing.append(package)
    return missing


def check_report_to(report_to: list[str], field: str = "report_to") -> None:
    """Fail before training when a tracker's library is not installed (cheap: nothing is imported)."""
    unknown = [n for n in report_to if n not in REQUIREMENTS]
    if unknown:
        raise TrackingError(f"{field}: unknown tracker(s) {unknown}; choose from {', '.join(REQUIREMENTS)}")
    missing = missing_packages(report_to)
    if missing:
        raise TrackingError(
            f"{field}: {', '.join(report_to)} needs {' and '.join(missing)}, which is not installed here; "
            f"install it with `pip install 'rayapp[track]'` (or `pip install {' '.join(missing)}`), "
            f"or remove it from {field}"
        )


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 1}} -> {'train.epochs': 1}; lists and other values stay as they are."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def numeric_metrics(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (nested dicts flattened with '/'), without ``step``."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in numeric_metrics(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _rank() -> int:
    """This process's rank in a torch.distributed group (without importing torch), else $RANK; 0 outside one."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class _TensorBoard:
    name = "tensorboard"
    last_step = 0

    def __init__(self, out: Path, run_name: str, config: dict, state: dict):
        from tensorboardX import SummaryWriter

        self.logdir = out / "tensorboard"
        # tensorboardX names event files by the second and host: a suffix keeps two writers of the same
        # second (a quick re-run) from truncating each other's file, and sorts them in the order they
        # were written, which is the order TensorBoard reads them in.
        self.writer = SummaryWriter(logdir=str(self.logdir), flush_secs=5,
                                    filename_suffix=f".{time.time_ns():020d}.{os.getpid()}")
        if not state.get("tensorboard"):
            import yaml

            text = yaml.safe_dump(config, sort_keys=False) if config else "(no config)"
            self.writer.add_text("config", f"```yaml\n{text}```", 0)
        state["tensorboard"] = str(self.logdir)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        pass  # TensorBoard has no artifacts; the report lies beside the event files in output_dir

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"
    last_step = 0

    def __init__(self, out: Path, run_name: str, config: dict, state: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").absolute().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow >= 3.7 opens a file store only when asked to; rayapp's default is one (see above).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        self.RunStatus = RunStatus
        params = {k: _param_value(v) for k, v in flatten(config).items()}
        saved = state.get("mlflow") or {}
        run = None
        if saved.get("tracking_uri") == uri and saved.get("run_id"):
            try:
                run = self.client.get_run(saved["run_id"])
            except Exception:  # deleted, or another store: start a new run
                run = None
        if run is not None:
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            old = run.data.params
            params_new = {k: v for k, v in params.items() if k not in old}
            changed = {k: v for k, v in params.items() if k in old and old[k] != v}
            # Params cannot change once logged: the re-run's values go to tags.
            for key, value in changed.items():
                self.client.set_tag(self.run_id, f"rerun.{key}"[:250], value)
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rayapp"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(
                exp_id, run_name=run_name, tags={"rayapp.output_dir": str(out.absolute())}
            ).info.run_id
            params_new = params
        items = [Param(k[:250], v) for k, v in params_new.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        state["mlflow"] = {"tracking_uri": uri, "run_id": self.run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def flush(self) -> None:
        pass

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MLFLOW_PARAM_MAX else text[: MLFLOW_PARAM_MAX - 3] + "..."


def wandb_mode() -> str:
    """$WANDB_MODE when set; else 'online' when logged in (API key, identity token, .netrc), else 'offline'."""
    mode = os.environ.get("WANDB_MODE", "").strip()
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        logged_in = host is not None and netrc.netrc(str(path)).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        logged_in = False
    return "online" if logged_in else "offline"


class _WandB:
    name = "wandb"
    last_step = 0

    def __init__(self, out: Path, run_name: str, config: dict, state: dict):
        import wandb

        self.wandb = wandb
        saved = state.get("wandb") or {}
        self.mode = wandb_mode()
        run_id = saved.get("run_id") or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                  save_code=False, disable_job_creation=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "rayapp", name=run_name, dir=str(out), config=config,
            mode=self.mode, id=run_id, resume="allow", settings=settings, reinit="create_new",
        )
        state["wandb"] = {"run_id": run_id, "mode": self.mode, "dir": str(out / "wandb")}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        art = self.wandb.Artifact(f"{self.run.name or 'run'}-{path.name}".replace("/", "-"), type="result")
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def flush(self) -> None:
        pass

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}


class Trackers:
    """The runs of every tracker in ``report_to`` for one job, on the driver.

    ``Trackers(report_to, output_dir, run_name, config)`` opens them (a rank other than 0 gets a
    no-op) and fails fast with a TrackingError (library missing, server unreachable) before any
    training; ``log(metrics, step)`` sends one step's numbers; ``sync_metrics()`` sends the rows of
    ``output_dir/metrics.jsonl`` not sent yet; ``follow()`` does that in a thread while a block
    runs; ``log_artifact(path)``; ``close()`` (or use it as a context manager: a failed block marks
    the runs failed). ``config`` is the resolved job config as a dict (``cfg.model_dump(mode="json")``).

    Once open, a tracker that fails (a server gone away) never fails the job: a warning says so
    once, that tracker gets nothing more, and ``rayapp track OUTPUT_DIR --to NAME`` later sends it
    what it missed (the last step each tracker got is kept per tracker in tracking.json).
    """

    def __init__(self, report_to: list[str], output_dir: str | os.PathLike, run_name: str,
                 config: dict | None = None):
        self.output_dir = Path(output_dir)
        self.names = tuple(dict.fromkeys(report_to)) if _rank() == 0 else ()
        self._lock = threading.RLock()
        self._open: list = []
        self._state_path = self.output_dir / STATE_FILE
        self.state: dict = _read_state(self._state_path)
        if not self.names:
            return
        check_report_to(list(self.names))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name in self.names:
                try:
                    tracker = TRACKERS[name](self.output_dir, run_name, config or {}, self.state)
                except Exception as e:
                    raise TrackingError(f"report_to: {name}: could not start a run ({type(e).__name__}: "
                                        f"{_first_line(e)}){_HINTS.get(name, '')}") from e
                tracker.last_step = int((self.state.get("last_step") or {}).get(name, 0))
                self._open.append(tracker)
        except BaseException:
            self.close(failed=True)
            raise
        self._save_state()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    @property
    def last_step(self) -> int:
        """The last step every open tracker has got."""
        with self._lock:
            return min((t.last_step for t in self._open), default=0)

    def _save_state(self) -> None:
        steps = self.state.setdefault("last_step", {})
        for tracker in self._open:
            steps[tracker.name] = tracker.last_step
        tmp = self._state_path.with_name(f".{STATE_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self._state_path)

    def _each(self, what: str, call) -> None:
        """call(tracker) for every open tracker; one that raises is warned about and dropped."""
        for tracker in list(self._open):
            try:
                call(tracker)
            except Exception as e:
                self._open.remove(tracker)
                print(f"warning: {tracker.name}: {what} failed ({type(e).__name__}: {_first_line(e)}); sending nothing "
                      f"more to it. When it works again: rayapp track {self.output_dir} --to {tracker.name}",
                      file=sys.stderr, flush=True)

    def log(self, metrics: dict, step: int) -> bool:
        """Send the numbers of ``metrics`` at ``step`` to the trackers that have not had it; each
        tracker keeps each step once, in order. Returns whether any tracker got it."""
        values = numeric_metrics(metrics)
        if not values:
            return False
        sent = []

        def send(tracker) -> None:
            if step > tracker.last_step:
                tracker.log(values, step)
                tracker.last_step = step
                sent.append(tracker)

        with self._lock:
            self._each(f"logging step {step}", send)
        return bool(sent)

    def log_artifact(self, path: str | os.PathLike) -> None:
        """A file or directory (report.html, eval.json) for the trackers that keep artifacts."""
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"artifact {path}: no such file")
        with self._lock:
            self._each(f"storing {path.name}", lambda t: t.log_artifact(path))

    def sync_metrics(self, metrics_path: str | os.PathLike | None = None) -> int:
        """Send every complete row of metrics.jsonl that some tracker has not had; return how many."""
        path = Path(metrics_path) if metrics_path else self.output_dir / "metrics.jsonl"
        if not self._open or not path.exists():
            return 0
        sent = 0
        with self._lock:
            for row in _complete_rows(path):
                step = row.get("step")
                if isinstance(step, int) and self.log(row, step):
                    sent += 1
            self._each("flushing", lambda t: t.flush())
            self._save_state()
        return sent

    @contextmanager
    def follow(self, metrics_path: str | os.PathLike | None = None, every_s: float = 2.0):
        """While the block runs, forward new metrics.jsonl rows every ``every_s`` seconds; at its end,
        the rest. For the driver around the training launch."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.sync_metrics(metrics_path)
                except Exception as e:  # reading metrics.jsonl; training goes on, the end syncs again
                    print(f"warning: following metrics for the trackers: {type(e).__name__}: {_first_line(e)}",
                          file=sys.stderr, flush=True)

        thread = threading.Thread(target=loop, name="rayapp-trackers", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.sync_metrics(metrics_path)

    def close(self, failed: bool = False) -> None:
        with self._lock:
            if not self._open:
                return
            self._save_state()
            self._each("closing the run", lambda t: t.close(failed))
            self._open = []


_HINTS = {
    "mlflow": "; check MLFLOW_TRACKING_URI (unset it for a file store in output_dir/mlruns)",
    "wandb": "; check WANDB_MODE / `wandb login`, or set WANDB_MODE=offline",
}


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else "no detail"


@contextmanager
def track_job(cfg, artifacts: tuple[str, ...] = ("report.html", "eval.json")):
    """The trackers of a job config (``cfg.report_to``; none when the field is absent or empty),
    following metrics.jsonl while the block runs; on success the ``artifacts`` the job left in
    output_dir are stored too. A recipe wraps its launch and its ending in it:

        with track_job(cfg):
            launch(...)
            summary = finish(cfg, ...)
    """
    report_to = list(getattr(cfg, "report_to", None) or [])
    with Trackers(report_to, cfg.output_dir, cfg.name, cfg.model_dump(mode="json")) as trackers, trackers.follow():
        yield trackers
        for name in artifacts:
            if (Path(cfg.output_dir) / name).exists():
                trackers.log_artifact(Path(cfg.output_dir) / name)


def _complete_rows(path: Path):
    """Rows of a JSONL file that a writer may be appending to: a last line without its newline is
    not read yet."""
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n")[:-1]:
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def replay_metrics(report_to: list[str], output_dir: str | os.PathLike, run_name: str | None = None,
                   config: dict | None = None, artifacts: tuple[str, ...] = ("report.html", "eval.json")) -> int:
    """Backfill the trackers from a job's output_dir: metrics.jsonl, config.resolved.yaml as the
    config (unless ``config`` is given), and the ``artifacts`` that exist. Returns the rows sent."""
    out = Path(output_dir)
    if config is None:
        resolved = out / "config.resolved.yaml"
        if resolved.exists():
            import yaml

            config = yaml.safe_load(resolved.read_text()) or {}
    config = config or {}
    name = run_name or str(config.get("name") or out.name)
    with Trackers(report_to, out, name, config) as trackers:
        sent = trackers.sync_metrics()
        for artifact in artifacts:
            if (out / artifact).exists():
                trackers.log_artifact(out / artifact)
    return sent


def _cmd_track(args) -> int:
    out = Path(args.output_dir)
    if not (out / "metrics.jsonl").exists():
        raise TrackingError(f"{out}: no metrics.jsonl here; give the output_dir of a training job")
    sent = replay_metrics(args.to, out, args.name)
    print(f"{out}: {sent} new metrics rows sent to {', '.join(args.to)}")
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "track", help="send a job's metrics.jsonl, config and report to TensorBoard / MLflow / W&B (backfill)")
    p.add_argument("output_dir", help="the job's output_dir (holds metrics.jsonl, config.resolved.yaml)")
    p.add_argument("--to", nargs="+", required=True, choices=list(REQUIREMENTS), metavar="TRACKER",
                   help="one or more of: tensorboard mlflow wandb")
    p.add_argument("--name", help="run name (default: the job's name)")
    p.set_defaults(func=_cmd_track)
