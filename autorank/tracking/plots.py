"""Plots of a search: accuracy versus size (or predicted ONNX Runtime latency) as a PNG (matplotlib) and
accuracy versus size as an interactive HTML (plotly)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autorank.records import TrialRecord


def _split(trials: Sequence[TrialRecord], front: Sequence[TrialRecord]):
    members = {t.number for t in front}
    done = [t for t in trials if t.finished_ok]
    feasible = [t for t in done if t.feasible and t.number not in members]
    infeasible = [t for t in done if not t.feasible]
    return feasible, infeasible


# x axis of the PNG: figure -> (divisor, label, log scale, the limit drawn as a vertical line)
X_AXES = {"size_bytes": (1e3, "size (KB, log scale)", True, "max_size"),
          "ort_latency_ms": (1.0, "ONNX Runtime latency, batch 1 (ms, predicted from measured layers)", False,
                             "max_latency_ms")}


def plot_png(path: Path, trials: Sequence[TrialRecord], front: Sequence[TrialRecord], reference: Mapping[str, Any],
             limits: Mapping[str, float | None], title: str, x: str = "size_bytes") -> None:
    """`accuracy_figure` written to `path`."""
    accuracy_figure(trials, front, reference, limits, title, x).savefig(path)


def accuracy_figure(trials: Sequence[TrialRecord], front: Sequence[TrialRecord], reference: Mapping[str, Any],
                    limits: Mapping[str, float | None], title: str, x: str = "size_bytes"):
    """Static plot of accuracy against `x` (a key of X_AXES; Agg backend, no pyplot state: safe from
    the tracker's thread)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    feasible, infeasible = _split(trials, front)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kb, xlabel, log, limit = X_AXES[x]
    if infeasible:
        ax.scatter([t.figures[x] / kb for t in infeasible], [t.figures["accuracy"] * 100 for t in infeasible],
                   marker="x", color="0.6", label="infeasible")
    if feasible:
        ax.scatter([t.figures[x] / kb for t in feasible], [t.figures["accuracy"] * 100 for t in feasible],
                   color="tab:blue", alpha=0.6, label="feasible")
    if front:
        xs = [t.figures[x] / kb for t in front]
        ys = [t.figures["accuracy"] * 100 for t in front]
        ax.step(xs, ys, where="post", color="tab:red", alpha=0.5)
        ax.scatter(xs, ys, color="tab:red", zorder=3, label="Pareto front")
        for t, px, py in zip(front, xs, ys):
            ax.annotate(str(t.number), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.scatter([reference[x] / kb], [reference["accuracy"] * 100], marker="*", s=150, color="black",
               label="uncompressed (same fine-tune)")
    if limits.get(limit):
        ax.axvline(limits[limit] / kb, color="tab:orange", linestyle="--", label=limit.replace("_", " "))
    if limits.get("max_drop") is not None:
        ax.axhline(reference["accuracy"] * 100 - limits["max_drop"], color="tab:green", linestyle="--",
                   label="max drop")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plotly_js_name() -> str:
    """The file name of the plotly.js bundle that pareto.html loads, versioned so that a search resumed
    under a newer plotly writes and logs its own. The .mjs extension makes MLflow serve it as
    JavaScript (it serves .js as text/plain, which browsers refuse to run); it is a classic script."""
    from plotly.offline import get_plotlyjs_version

    return f"plotly-{get_plotlyjs_version()}.min.mjs"


# Loads the bundle beside the page (a pareto.html opened from the search folder, or any copy of the
# folder); inside MLflow's artifact view the page is a sandboxed blob: URL where relative paths do not
# resolve, so it then loads the same file from the run's artifacts on the server that made the blob.
_PAGE = """<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>{title}</title><style>html, body {{height: 100%;}}</style></head>
<body>
<script src="{js}"></script>
<script>
if (!window.Plotly) {{
  var server = /^blob:(https?:\\/\\/[^\\/]+)/.exec(location.href);
  if (server) document.write('<script src="' + server[1] + '/get-artifact?path={js}&run_uuid={run_id}"><\\/script>');
}}
</script>
{figure}
</body>
</html>
"""


def plot_html(path: Path, trials: Sequence[TrialRecord], front: Sequence[TrialRecord],
              reference: Mapping[str, Any], title: str, run_id: str = "") -> Path:
    """Interactive plot (browsable offline and inside MLflow's artifact view of run `run_id`).

    plotly.js (4.8 MB) is not embedded: the page loads `plotly_js_name()` from its own folder, written
    there once and returned, so a search logs it once however often the page is refreshed."""
    import html

    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    feasible, infeasible = _split(trials, front)

    def trace(items, name, **style):
        return go.Scatter(
            x=[t.figures["size_bytes"] / 1e3 for t in items], y=[t.figures["accuracy"] * 100 for t in items],
            mode=style.pop("mode", "markers"), name=name,
            text=[f"trial {t.number}<br>{t.summary}<br>ratio {t.figures.get('ratio', 0):.1f}x" for t in items],
            hovertemplate="%{text}<br>%{x:.1f} KB, %{y:.2f}%<extra></extra>", **style)

    fig = go.Figure([
        trace(infeasible, "infeasible", marker={"symbol": "x", "color": "gray"}),
        trace(feasible, "feasible", marker={"color": "royalblue", "opacity": 0.6}),
        trace(front, "Pareto front", mode="lines+markers", line={"shape": "hv", "color": "crimson"},
              marker={"color": "crimson", "size": 9}),
        go.Scatter(x=[reference["size_bytes"] / 1e3], y=[reference["accuracy"] * 100], mode="markers",
                   name="uncompressed", marker={"symbol": "star", "size": 14, "color": "black"}),
    ])
    fig.update_layout(title=title, xaxis={"title": "size (KB)", "type": "log"},
                      yaxis={"title": "validation accuracy (%)"}, template="plotly_white")
    js = path.parent / plotly_js_name()
    if not js.is_file():
        partial = js.with_name(f".{js.name}.tmp")
        partial.write_text(get_plotlyjs())
        partial.replace(js)
    figure = fig.to_html(include_plotlyjs=False, full_html=False)
    path.write_text(_PAGE.format(title=html.escape(title), js=js.name, run_id=run_id, figure=figure))
    return js
