"""`lxm plot RUN_DIR`: loss curves and validation metrics of a pretraining or finetuning run as PNG files.

Reads only the run's logs (`log.jsonl`: one record per logged step, validation records carry "valid"), so it works
on a run that is still going or that crashed. matplotlib is imported here only (Agg backend, no display needed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SKIP = {"step", "epoch", "lr", "samples_per_s", "grad_norm", "loss"}


class PlotError(ValueError):
    """The run directory has nothing to plot."""


def read_log(run: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of RUN/log.jsonl; unreadable lines name their line number."""
    path = Path(run) / "log.jsonl"
    if not path.exists():
        raise PlotError(f"{path}: no such file (is {run} an lxm pretrain / finetune run directory?)")
    train, valid = [], []
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
                valid.append(rec)
        elif "loss" in rec and "step" in rec:
            train.append(rec)
    if not train and not valid:
        raise PlotError(f"{path}: no training or validation records yet")
    return train, valid


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> list[Path]:
    """Write OUT/losses.png (total and every named loss by step, log scale) and OUT/validation.png (each validation
    value by epoch); OUT defaults to RUN/plots. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = read_log(run)
    out = Path(out) if out else Path(run) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if train:
        names = ["loss"] + sorted({k for r in train for k, v in r.items()
                                   if k not in SKIP and isinstance(v, (int, float))})
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name in names:
            pts = [(r["step"], r[name]) for r in train if isinstance(r.get(name), (int, float)) and r[name] > 0]
            if pts:
                ax.plot(*zip(*pts), label=name, linewidth=2.0 if name == "loss" else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{Path(run).name}: training losses")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        written.append(out / "losses.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if valid:
        names = sorted({k for r in valid for k, v in r["valid"].items() if isinstance(v, (int, float))})
        scores = [n for n in names if n.startswith(("accuracy", "consistency", "qa_acc"))]
        panels = [(title, group) for title, group in (("validation loss", [n for n in names if n not in scores]),
                                                      ("validation accuracy", scores)) if group]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4.5), squeeze=False)
        for ax, (title, group) in zip(axes[0], panels):
            for name in group:
                pts = [(r["epoch"], r["valid"][name]) for r in valid if name in r["valid"]]
                ax.plot(*zip(*pts), marker="o", markersize=3, label=name)
            if title == "validation loss":
                ax.set_yscale("log")
            ax.set_xlabel("epoch")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{Path(run).name}: validation")
        fig.tight_layout()
        written.append(out / "validation.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
