"""`lxm plot RUN_DIR`: loss curves and validation metrics of a pretraining or finetuning run as PNG files.

Reads only the run's logs (`log.jsonl`: one record per logged step, validation records carry "valid"), so it works
on a run that is still going or that crashed; a damaged line (not UTF-8, not JSON) is skipped with a warning.
matplotlib is imported here only, through its object API (`Figure`, Agg canvas): no display and no pyplot global
state.

Each kind of value has its own panel: losses on a log scale, scores (accuracy, consistency, macro-F1, pretraining's
QA accuracy) in percent on a linear scale, anything else on its own linear panel. A series of one point is drawn as a
marker.

Two rules keep the pictures honest. A series identical to one already drawn (a finetuning run's total `loss` is its
single task loss) is drawn once, labelled with both names, so nothing looks like two curves that agree. Distinct
metrics that happen to coincide (NLVR2 accuracy and consistency when every sentence has one pair) are both drawn, each
with its own line style and marker, the later ones thinner on top, so both stay visible.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lxm.errors import ConfigError, LxmError
from lxm.jsonl import NOT_JSON, scan_json_lines

_logger = logging.getLogger(__name__)

SKIP = {"step", "epoch", "lr", "samples_per_s", "grad_norm", "loss"}
# The kinds of validation value, by name. Losses: the total and lxm.model.losses.LOSS_NAMES (pretraining); scores:
# the finetuning tasks' metric_names and pretraining's qa_acc_SOURCE. A name that is neither gets a panel of its own.
LOSSES = ("loss", "mlm", "match", "obj", "attr", "feat", "qa")
SCORES = ("accuracy", "consistency", "macro_f1", "f1", "precision", "recall", "qa_acc")
FRACTIONS = ("qa_acc",)  # pretraining logs its QA accuracy as a fraction, as the original printed it: drawn x 100
PANELS = {"loss": ("validation loss (log scale)", "loss (log scale)"),
          "score": ("validation scores (%)", "score (%)"),
          "other": ("other validation values", "value")}
# The training log rounds losses to 6 decimals: below that a log axis would only show rounding.
LOG_FLOOR = 1e-6
# (linestyle, marker, linewidth, markersize): each later series thinner and smaller, so one drawn over an equal one
# leaves the earlier visible around it.
STYLES = [("-", "o", 3.0, 9), ("--", "s", 2.0, 6), (":", "^", 1.6, 5), ("-.", "D", 1.3, 4), ((0, (1, 1)), "v", 1.1, 3)]


class PlotError(LxmError, ValueError):
    """The run directory has nothing to plot."""


def _log_every(run: Path) -> str:
    """"every N steps" from RUN/config.yaml, or "every log_every steps" when it cannot be read."""
    from lxm.train.config import load_run_config

    try:
        n = load_run_config(run / "config.yaml").runtime.log_every
    except ConfigError:  # only for a hint in a message: a missing or damaged config.yaml is reported by other commands
        return "every log_every steps"
    return f"every {n} steps"


def read_log(run: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records by step, validation records by epoch) of RUN/log.jsonl. A line that is not a UTF-8 JSON
    object is skipped, with one warning naming the lines (a crash can cut the last line: skipped quietly).
    A step (epoch) logged twice, as by a resumed run that redid it, counts once: its last record."""
    path = Path(run) / "log.jsonl"
    if not path.exists():
        raise PlotError(f"{path}: no such file (is {run} an lxm pretrain / finetune run directory?)")
    train, valid = {}, {}
    skipped: dict[str, list[int]] = {}
    lines = list(scan_json_lines(path, objects=True, skip_blank=False))  # line numbers count blank lines
    for n, raw, rec, bad in lines:
        if not raw.strip():
            continue
        if bad is not None:
            if bad.problem != NOT_JSON or n < len(lines):  # a crash can cut the last line; the rest is fine
                skipped.setdefault(bad.problem, []).append(n)
            continue
        if "valid" in rec:
            if isinstance(rec["valid"], dict) and rec["valid"] and _number(rec.get("epoch")):
                valid[rec["epoch"]] = rec
        elif "loss" in rec and _number(rec.get("step")):  # other records (a non-finite loss's) are not drawn
            train[rec["step"]] = rec
    if skipped:
        _logger.warning("%s: skipped %s", path, "; ".join(
            f"{len(ns)} line{'s' if len(ns) > 1 else ''} {why} (line{'s' if len(ns) > 1 else ''} "
            f"{', '.join(map(str, ns[:5]))}{', ...' if len(ns) > 5 else ''})" for why, ns in skipped.items()))
    if not train and not valid:
        raise PlotError(f"{path}: no training or validation records yet (training steps are logged "
                        f"{_log_every(Path(run))}, validation after each epoch)")
    return (sorted(train.values(), key=lambda r: r["step"]), sorted(valid.values(), key=lambda r: r["epoch"]))


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
            ax.plot(*zip(*pts), label=name, marker="o", markersize=4 if len(pts) > 1 else 7,
                    linewidth=first_width if k == 0 else 1.8)
            continue
        j = group.index(name)
        style, marker, width, size = STYLES[j % len(STYLES)]
        label = f"{name} (= {', '.join(group[:j])})" if j else name
        ax.plot(*zip(*pts), label=label, linestyle=style, linewidth=width, marker=marker, markersize=size,
                markerfacecolor="none" if j == 0 else None)


def value_kind(name: str) -> str:
    """"loss", "score" or "other": the panel a validation value is drawn on."""
    if name.startswith(SCORES) or name.endswith(("accuracy", "_acc", "_f1")):
        return "score"
    return "loss" if name in LOSSES or name.endswith("loss") else "other"


def _frame(ax, series: dict[str, list[tuple]], what: str) -> None:
    """One point spans a whole unit either side (matplotlib would zoom to a fraction of it); no point at all says
    why, rather than leaving an empty frame."""
    xs = sorted({x for pts in series.values() for x, _ in pts})
    if len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    if not series:
        ax.text(0.5, 0.5, f"no {what} to draw", transform=ax.transAxes, ha="center", va="center", color="0.4")


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
    for k, (name, pts) in enumerate(series.items()):  # the total (first) stands out; few points get markers
        ax.plot(*zip(*pts), label=name, linewidth=2.4 if k == 0 else 1.3, marker="o" if len(pts) <= 40 else "",
                markersize=5 if k == 0 else 3.5)
    if series:
        _log_axis(ax, series)
    _frame(ax, series, "positive loss values (a log scale shows none)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(f"{title}: training losses")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def validation_figure(valid: list[dict], title: str):
    """Validation values by epoch (as log.jsonl counts them, from 0), one panel per kind (`value_kind`): losses on a
    log scale, scores in percent, other values linear."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = sorted({k for r in valid for k, v in r["valid"].items() if _number(v)}, key=lambda n: (n != "loss", n))
    panels = [(kind, group) for kind in PANELS if (group := [n for n in names if value_kind(n) == kind])]
    fig = Figure(figsize=(6.5 * len(panels) + 0.5, 4.5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (kind, group) in zip(axes, panels):
        loss = kind == "loss"
        series = {}
        for name in group:
            percent = name.startswith(FRACTIONS)  # rounded: 0.55 x 100 must equal an accuracy of 55.0
            pts = [(r["epoch"], round(r["valid"][name] * 100, 9) if percent else r["valid"][name]) for r in valid
                   if _number(r["valid"].get(name)) and (r["valid"][name] > 0 or not loss)]
            if pts:
                series[name] = pts
        if loss:
            series = _merge_identical(series)
        _draw(ax, series, first_width=2.4 if loss and "loss" in series else 1.8)
        if loss and series:
            _log_axis(ax, series)
        _frame(ax, series, "positive loss values (a log scale shows none)" if loss else "values")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (from 0)")
        ax.set_title(PANELS[kind][0], fontsize=10)
        ax.set_ylabel(PANELS[kind][1])
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the data, never over it
    fig.suptitle(f"{title}: validation")
    fig.tight_layout()
    return fig


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write OUT/losses.png (total and every named loss by step, log scale) and OUT/validation.png (each validation
    value by epoch); OUT defaults to RUN/plots. Returns the files written; one that cannot be drawn yet is logged
    with the reason (a run shorter than log_every has no step record, a run before its first epoch's end no
    validation)."""
    train, valid = read_log(run)
    log = Path(run) / "log.jsonl"
    if not train:
        _logger.warning("%s: no training step logged (steps are logged %s and the run has not reached one): "
                        "no losses.png; --set log_every=1 logs every step", log, _log_every(Path(run)))
    if not valid:
        _logger.warning("%s: no validation record (none is logged before the first epoch ends, or without a "
                        "validation split): no validation.png", log)
    out = Path(out) if out else Path(run) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records, build in (("losses", train, losses_figure), ("validation", valid, validation_figure)):
        if records:
            written.append(out / f"{name}.png")
            build(records, Path(run).name).savefig(written[-1], dpi=110)
    return written
