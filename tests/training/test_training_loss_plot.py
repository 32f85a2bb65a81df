"""The loss plot marks where each stage starts when several stages share its step axis (the demo's loss.png)."""

from __future__ import annotations

import matplotlib.figure

from llavakit.training.metrics import plot_losses


def test_stage_starts_are_marked_and_named(tmp_path, monkeypatch):
    saved = []
    original = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self) or original(self, *a, **k)
    )
    losses = [(step, 5.0 / step) for step in range(1, 11)]
    plot_losses(losses, tmp_path / "loss.png", stage_starts=[(1, "align"), (7, "finetune")])
    assert (tmp_path / "loss.png").stat().st_size > 0
    axis = saved[0].axes[0]
    marks = [line.get_xdata()[0] for line in axis.lines if line.get_linestyle() == "--"]
    assert marks == [1, 7]
    assert [text.get_text() for text in axis.texts] == ["align", "finetune"]
