"""report.plot_curves: one line per distinct series, labels of equal series joined."""

from __future__ import annotations

import matplotlib.figure

from rayapp.report import plot_curves


def _labels(monkeypatch, rows, series, tmp_path):
    seen = []
    real = matplotlib.figure.Figure.savefig

    def savefig(fig, *a, **k):
        seen.extend(line.get_label() for line in fig.axes[0].lines)
        return real(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    assert plot_curves(rows, series, tmp_path / "p.png", "reward") == tmp_path / "p.png"
    assert (tmp_path / "p.png").stat().st_size > 0
    return seen


def test_equal_series_share_one_line_and_a_joined_label(monkeypatch, tmp_path):
    rows = [{"step": 0, "a": 0.3, "b": 0.3, "c": 0.1}, {"step": 1, "c": 0.2}, {"step": 10, "a": 0.4, "b": 0.4, "c": 0.3}]
    labels = _labels(monkeypatch, rows, {"c": "mean", "a": "greedy reward", "b": "greedy exact match"}, tmp_path)
    assert labels == ["mean", "greedy reward = greedy exact match"]


def test_series_that_differ_anywhere_are_drawn_apart(monkeypatch, tmp_path):
    rows = [{"step": 0, "a": 0.3, "b": 0.3}, {"step": 10, "a": 0.4, "b": 0.5}]
    assert _labels(monkeypatch, rows, {"a": "x", "b": "y"}, tmp_path) == ["x", "y"]


def test_no_points_no_plot(tmp_path):
    assert plot_curves([{"step": 0}], {"a": "x"}, tmp_path / "p.png", "t") is None
    assert not (tmp_path / "p.png").exists()
