"""The ``rayapp`` command: run, validate, plan, submit, jobs, deploy."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from rayapp.config import ConfigError, explain, load_job

# Subcommand groups owned by other modules: each exposes register_cli(subparsers).
EXTRA_COMMANDS = ("rayapp.plan", "rayapp.jobs", "rayapp.serving.cli", "rayapp.tracking")


def _console_log(cfg, verbose: bool):
    """Where `rayapp run` sends what Ray, vLLM and the libraries print (None: the terminal): the
    job's local output_dir/logs/console.log, unless -v, RAYAPP_CONSOLE=full (submitted jobs: their
    Ray job log keeps everything) or output_dir is a URI."""
    out = str(getattr(cfg, "output_dir", "") or "")
    if verbose or os.environ.get("RAYAPP_CONSOLE") == "full" or not out or "://" in out:
        return None
    from pathlib import Path

    return Path(out) / "logs" / "console.log"


def _cmd_run(args) -> int:
    import contextlib

    from rayapp import console, kinds

    cfg = load_job(args.job, args.overrides)
    said = getattr(kinds.recipe(cfg.kind), "SAID_KEYS", ())
    log = _console_log(cfg, args.verbose)
    with console.captured(log) if log else contextlib.nullcontext():
        if log:
            console.say(f"rayapp: {cfg.name} ({cfg.kind}); Ray, vLLM and library output go to {log} (-v shows them here)")
        try:
            summary = kinds.run(cfg)
        except BaseException:
            if log:
                console.say(f"rayapp: {cfg.name} failed; full log: {log}")
            raise
        if isinstance(summary, dict):
            for line in _summary_lines(summary, said):
                console.say(line)
    return 0


def _summary_lines(summary: dict, said=()) -> list[str]:
    """``key: value`` lines of a run's summary, without tables and the keys a pipeline said already;
    the stages' reports of a pipeline on one line when they share a directory and a file name
    (``reports: OUT/{a,b}/report.html``)."""
    import posixpath

    items = [(k, str(v)) for k, v in summary.items() if "\n" not in str(v) and k not in said]
    reports = [(k, v) for k, v in items if k.endswith(".report")]
    parents = {posixpath.dirname(posixpath.dirname(v)) for _, v in reports}
    names = {posixpath.basename(v) for _, v in reports}
    one_line = len(reports) > 1 and len(parents) == 1 and len(names) == 1
    lines = []
    for k, v in items:
        if one_line and k.endswith(".report"):
            if k == reports[0][0]:
                stages = ",".join(posixpath.basename(posixpath.dirname(r)) for _, r in reports)
                lines.append(f"reports: {next(iter(parents))}/{{{stages}}}/{next(iter(names))}")
            continue
        lines.append(f"{k}: {v}")
    return lines


def _cmd_validate(args) -> int:
    from rayapp.kinds import recipe

    if args.explain:
        print(explain(args.explain))
        return 0
    if not args.job:
        print("rayapp validate: give a JOB.yaml (or --explain KIND)", file=sys.stderr)
        return 2
    cfg = load_job(args.job, args.overrides)
    print(f"{args.job}: config ok (kind: {cfg.kind})")
    report = recipe(cfg.kind).validate(cfg)
    if report:
        print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayapp", description="Tune, distill and serve text LLMs on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a job on the current Ray cluster (RAY_ADDRESS, else a local one)")
    p.add_argument("job", help="job YAML file")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check a job's config and data without running it; print dataset stats")
    p.add_argument("job", nargs="?", help="job YAML file")
    p.add_argument("overrides", nargs="*", help="a.b=value overrides")
    p.add_argument("--explain", metavar="KIND", help="list every field of a job kind with defaults")
    p.set_defaults(func=_cmd_validate)

    for module in EXTRA_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not {"-v", "--verbose"} & set(sys.argv[1:] if argv is None else argv):
        # No download or weight-loading progress bars in this process either (read at import).
        from rayapp.runtime import QUIET_WORKER_ENV

        for key, value in QUIET_WORKER_ENV.items():
            os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args) or 0
    except ConfigError as e:  # every problem on its own line
        print("error: invalid job configuration:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors from our own modules carry their own message
        from rayapp.errors import is_user_error

        if is_user_error(e) and not args.verbose:
            print(f"error: {e}", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not args.verbose:
            print(f"error: no space left on device writing {e.filename or 'an output'}: free space there, or "
                  "set output_dir to a filesystem with room", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
