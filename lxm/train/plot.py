"""`lxm plot RUN_DIR`: loss curves and validation metrics of a pretraining or finetuning run as PNG files.

Reads only the run's logs (`log.jsonl`: one record per logged step, validation records carry "valid"), so it works
on a run that is still going or that crashed. matplotlib is imported here only, through its object API (`Figure`,
Agg canvas): no display and no pyplot global state.

Two rules keep the pictures honest. A series identical to one already drawn (a finetuning run's total `loss` is its
single task loss) is drawn once, labelled with both names, so nothing looks like two curves that agree. Distinct
metrics that happen to coincide (NLVR2 accuracy and consistency when every sentence has one pair) are both drawn, each
with its own line style and marker, the later ones thinner on top, so both stay visible.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lxm.errors import LxmError

SKIP = {"step", "epoch", "lr", "samples_per_s", "grad_norm", "loss"}
SCORES = ("accuracy", "consistency", "qa_acc")
# The training log rounds losses to 6 decimals: below that a log axis would only show rounding.
LOG_FLOOR = 1e-6
# (linestyle, marker, linewidth, markersize): each later series thinner and smaller, so one drawn over an equal one
# leaves the earlier visible around it.
STYLES = [("-", "o", 3.0, 9), ("--", "s", 2.0, 6), (":", "^", 1.6, 5), ("-.", "D", 1.3, 4), ((0, (1, 1)), "v", 1.1, 3)]


class PlotError(LxmError, ValueError):
    """The run directory has nothing to plot."""


def read_log(run: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records by step, validation records by epoch) of RUN/log.jsonl; unreadable lines name their line
    number. A step (epoch) logged twice, as by a resumed run that redid it, counts once: its last record."""
    path = Path(run) / "log.jsonl"
    if not path.exists():
        raise PlotError(f"{path}: no such file (is {run} an lxm pretrain / finetune run directory?)")
    train, valid = {}, {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines):  # a crash can cut the last line; the rest is fine
                break
            raise PlotError(f"{path}: line {n}: not valid JSON ({exc})") from None
        if "valid" in rec:
            if rec["valid"]:
                valid[rec.get("epoch")] = rec
        elif "loss" in rec and "step" in rec:
            train[rec["step"]] = rec
    if not train and not valid:
        raise PlotError(f"{path}: no training or validation records yet")
    return (sorted(train.values(), key=lambda r: r["step"]),
            sorted(valid.values(), key=lambda r: r.get("epoch") or 0))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coinciding(series: dict[str, list[tuple]]) -> dict[tuple, list[str]]:
    """Names of the series with the same points, in drawing order, keyed by those points."""
    groups: dict[tuple, list[str]] = {}
    for name, pts in series.items():
        groups.setdefault(tuple(pts), []).append(name)
    return groups


def _merge_identical(series: dict[str, list[tuple]]) -> dict[str, list[tuple]]:
    """Series with the same points under several names become one, labelled "a = b" (first name first)."""
    return {" = ".join(names): list(pts) for pts, names in _coinciding(series).items()}


def _draw(ax, series: dict[str, list[tuple]], first_width: float = 1.8) -> None:
    """One line per series with markers; coinciding series get STYLES (solid hollow first, then thinner dashed and
    smaller markers on top) and an "(= other)" note, so each stays visible."""
    groups = _coinciding(series)
    for k, (name, pts) in enumerate(series.items()):
        group = groups[tuple(pts)]
        if len(group) == 1:
            ax.plot(*zip(*pts), label=name, marker="o", markersize=4, linewidth=first_width if k == 0 else 1.8)
            continue
        j = group.index(name)
        style, marker, width, size = STYLES[j % len(STYLES)]
        label = f"{name} (= {', '.join(group[:j])})" if j else name
        ax.plot(*zip(*pts), label=label, linestyle=style, linewidth=width, marker=marker, markersize=size,
                markerfacecolor="none" if j == 0 else None)


def _log_axis(ax, series: dict[str, list[tuple]]) -> None:
    ax.set_yscale("log")
    values = [y for pts in series.values() for _, y in pts]
    low, high = min(values), max(values)
    ax.set_ylim(bottom=max(LOG_FLOOR, low / 2) if high > LOG_FLOOR * 10 else low / 2)


def losses_figure(train: list[dict], title: str):
    """Total loss and every named term by optimizer step, log scale (non-positive values cannot be drawn there)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = ["loss"] + sorted({k for r in train for k, v in r.items() if k not in SKIP and _number(v)})
    series = {}
    for name in names:
        pts = [(r["step"], r[name]) for r in train if _number(r.get(name)) and r[name] > 0]
        if pts:
            series[name] = pts
    series = _merge_identical(series)
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    for k, (name, pts) in enumerate(series.items()):
        ax.plot(*zip(*pts), label=name, linewidth=2.4 if k == 0 else 1.3)  # the total (first) stands out
    if series:
        _log_axis(ax, series)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(f"{title}: training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def validation_figure(valid: list[dict], title: str):
    """Validation values by epoch (as log.jsonl counts them, from 0): a loss panel (log scale) and a score panel."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = sorted({k for r in valid for k, v in r["valid"].items() if _number(v)}, key=lambda n: (n != "loss", n))
    scores = [n for n in names if n.startswith(SCORES)]
    panels = [(t, g) for t, g in (("validation loss", [n for n in names if n not in scores]),
                                  ("validation score", scores)) if g]
    fig = Figure(figsize=(6.5 * len(panels) + 0.5, 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, group) in zip(axes, panels):
        loss = panel == "validation loss"
        series = {}
        for name in group:
            pts = [(r["epoch"], r["valid"][name]) for r in valid
                   if _number(r["valid"].get(name)) and (r["valid"][name] > 0 or not loss)]
            if pts:
                series[name] = pts
        if loss:
            series = _merge_identical(series)
        _draw(ax, series, first_width=2.4 if loss and "loss" in series else 1.8)
        if loss and series:
            _log_axis(ax, series)
        epochs = sorted({x for pts in series.values() for x, _ in pts})
        if len(epochs) == 1:  # one point: matplotlib would span a fraction of an epoch around it
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (from 0)")
        ax.set_ylabel(panel + (" (log scale)" if loss else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the data, never over it
    fig.suptitle(f"{title}: validation")
    fig.tight_layout()
    return fig


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write OUT/losses.png (total and every named loss by step, log scale) and OUT/validation.png (each validation
    value by epoch); OUT defaults to RUN/plots. Returns the files written."""
    train, valid = read_log(run)
    out = Path(out) if out else Path(run) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records, build in (("losses", train, losses_figure), ("validation", valid, validation_figure)):
        if records:
            written.append(out / f"{name}.png")
            build(records, Path(run).name).savefig(written[-1], dpi=110)
    return written
