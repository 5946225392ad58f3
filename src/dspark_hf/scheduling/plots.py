"""Plots of cost tables (need matplotlib: pip install "dspark_hf[plots]"), and the figure factory the calibration
plots share."""

import os
from collections.abc import Mapping

from .cost_table import CostTable


def new_figure(width: float, height: float):
    """A matplotlib `Figure` of `width` × `height` inches with constrained layout (matplotlib imported here)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError('Plots need matplotlib: pip install matplotlib (or "dspark_hf[plots]").') from error
    return Figure(figsize=(width, height), layout="constrained")


def plot_cost_table(
    tables: CostTable | Mapping[str, CostTable], path: str | os.PathLike, title: str | None = None
) -> None:
    """Plots SPS(B) (left) and the forward time relative to the row's first B (right) of one or several labelled
    cost tables, one line per context length or number of requests (B = R · width); raw measurements as markers,
    the smoothed curve as a line when the table is smoothed."""
    if isinstance(tables, CostTable):
        tables = {tables.metadata.get("shape", "table"): tables}
    figure = new_figure(9.0, 3.6)
    sps_ax, cost_ax = figure.subplots(1, 2)
    ticks = set()
    for label, table in tables.items():
        for i, (row, raw) in enumerate(zip(table.rows, table.raw_rows, strict=True)):
            name, tokens = label, table.batch_tokens
            if table.context_lengths is not None:
                name = f"{label}, context {table.context_lengths[i]}"
            if table.requests is not None:
                name = f"{label}, {table.requests[i]} request(s)"
                tokens = [table.requests[i] * width for width in table.batch_tokens]
            ticks.update(tokens)
            line = sps_ax.plot(tokens, raw, marker="o", ls="-" if table.smooth == "none" else ":", label=name)[0]
            if table.smooth != "none":
                sps_ax.plot(tokens, row, color=line.get_color(), label=f"{name} ({table.smooth})")
            cost_ax.plot(tokens, [raw[0] / v for v in raw], marker="o", color=line.get_color(), label=name)
    sps_ax.set(xscale="log", xlabel="B (tokens per target forward)", ylabel="SPS (forwards / s)")
    cost_ax.set(xscale="log", xlabel="B (tokens per target forward)", ylabel="forward time / time at first B")
    ticks = sorted(ticks)
    for ax in (sps_ax, cost_ax):
        ax.set_xticks(ticks, labels=[str(b) for b in ticks])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title or "Target cost table", fontsize=10)
    figure.savefig(path, dpi=120)
