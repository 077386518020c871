"""report.html for a job (every training kind, kind: evaluate): loss curves as PNG plots, dataset stats, evaluation, extra sections.

Plots go to ``output_dir/plots/*.png`` and are referenced from the HTML, so the report opens
from the directory in any browser and the PNGs can be reused elsewhere.
"""

from __future__ import annotations

import html
from pathlib import Path

from rayapp.data.readers import read_jsonl
from rayapp.fileio import write_text_atomic


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return read_jsonl(path)


def plot_curves(rows: list[dict], series: dict[str, str], out_png: Path, title: str, ylabel: str = "loss") -> Path | None:
    """Plot ``series`` (metric key -> legend label) against step; returns the PNG path or None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    drawn: dict[tuple, object] = {}  # points -> line: a series equal to one drawn joins its label
    for key, label in series.items():
        pts = [(r["step"], r[key]) for r in rows if key in r and r.get(key) is not None]
        if not pts:
            continue
        if tuple(pts) in drawn:
            line = drawn[tuple(pts)]
            line.set_label(f"{line.get_label()} = {label}")
            continue
        xs, ys = zip(*pts, strict=True)
        (drawn[tuple(pts)],) = ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _table(rows: list[tuple]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(
    out: Path,
    title: str,
    data_stats: dict | None = None,
    evaluation: dict | None = None,
    sections: list[tuple[str, str]] | None = None,
    curves: dict[str, str] | None = None,
) -> Path:
    """Write ``out/report.html``; ``sections`` are (heading, HTML) pairs appended after the defaults."""
    rows = read_metrics(out / "metrics.jsonl")
    parts = [f"<h1>{html.escape(title)}</h1>"]
    loss_png = plot_curves(rows, curves or {"loss": "training loss", "val_loss": "validation loss"}, out / "plots" / "loss.png", "Loss")
    if loss_png:
        parts.append(f'<h2>Training curves</h2><img src="plots/{loss_png.name}" alt="loss curves">')
    acc_png = plot_curves(rows, {"accuracy": "train next-token acc", "val_accuracy": "val next-token acc"}, out / "plots" / "accuracy.png", "Next-token accuracy", "accuracy")
    if acc_png:
        parts.append(f'<img src="plots/{acc_png.name}" alt="accuracy curves">')
    if evaluation:
        parts.append("<h2>Evaluation</h2>" + _table([(k, _fmt(v)) for k, v in evaluation.items()]))
    if data_stats:
        for split, stats in data_stats.items():
            if stats:
                parts.append(f"<h2>Dataset: {html.escape(split)}</h2>" + _table([(k, _fmt(v)) for k, v in stats.items()]))
    for heading, body in sections or []:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}"
    )
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    return write_text_atomic(out / "report.html", page)
