"""Who uses the CPUs during a benchmark phase: /proc snapshots of every process's CPU time
(a helper of the benchmarks, not one itself; `make bench` skips bench/_*.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_ticks() -> dict[str, int]:
    """CPU time (clock ticks, user + system) of every process, by name: Ray's processes by their
    ``ray::`` title or executable (raylet, gcs_server, dashboard agent, VLLM::EngineCore ...)."""
    out: dict[str, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
            cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        # A Ray worker's title names the method it runs (ray::RayTrainWorker.run_train_fn): by class.
        name = cmd.split(".")[0] if cmd.startswith(("ray::", "VLLM::")) else Path(cmd).name or comm
        if name.startswith("python"):
            name = " ".join(Path(a).name for a in (stat.parent / "cmdline").read_bytes().decode(errors="replace").split("\0")[:2])
        out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def snapshot() -> tuple[float, dict[str, int]]:
    return time.perf_counter(), cpu_ticks()


def shares(first: tuple[float, dict[str, int]], last: tuple[float, dict[str, int]], top: int = 8) -> dict[str, float]:
    """Share of the machine's CPU time (all cores) each process name used between two snapshots,
    largest first, the ``top`` largest."""
    (t0, a), (t1, b) = first, last
    total = max(1e-9, (t1 - t0) * (os.cpu_count() or 1) * os.sysconf("SC_CLK_TCK"))
    used = {k: round((v - a.get(k, 0)) / total, 4) for k, v in b.items() if v - a.get(k, 0) > 0}
    return dict(sorted(used.items(), key=lambda kv: -kv[1])[:top])


def print_shares(title: str, share: dict[str, float]) -> None:
    print(f"{title} (share of all {os.cpu_count()} cores):")
    for name, s in share.items():
        print(f"  {s:6.1%}  {name[:70]}")
