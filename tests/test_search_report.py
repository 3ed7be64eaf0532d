"""The search report's plots: labels of nearby points kept apart."""

from __future__ import annotations

from slimlm.search.report import _annotate_apart, plot_front


def _row(name: str, kind: str, mb: float, kl: float) -> dict:
    return {"name": name, "kind": kind, "file_bytes": int(mb * 1e6), "metrics": {"kl_divergence": kl}}


def test_labels_of_nearby_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    xy = [(105.0, 0.01), (105.5, 0.0101), (140.0, 0.01), (90.0, 0.001), (145.0, 0.2)]  # the last two: the axes' span
    ax.scatter(*zip(*xy))
    ax.set_yscale("log")
    _annotate_apart(ax, fig, {p: [str(i)] for i, p in enumerate(xy)})
    lifts = {a.get_text(): a.xyann[1] for a in ax.texts}
    plt.close(fig)
    assert lifts["0"] != lifts["1"]  # 0.5 MB apart: the second label moved
    assert lifts["2"] == lifts["0"]  # far away: left where it is


def test_front_plot_is_a_png_and_needs_two_points():
    rows = [_row("searched ≤ 92 MB", "searched", 90.9, 0.008), _row("llama.cpp Q4_0", "preset", 91.7, 0.25)]
    png = plot_front(rows, lambda r: r["file_bytes"] / 1e6, "MB", "t", chosen="searched ≤ 92 MB")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_front(rows[:1], lambda r: r["file_bytes"] / 1e6, "MB", "t") is None
