"""What the commands say, as a person reads it: every `--help` shows its text as written (square brackets kept, no
type shown for an on/off flag, no line break in the middle of a sentence), a path with rich markup in it prints as it
is, a damaged input file is one line naming it, `lxm plot` draws each kind of value on its own panel, and the
quickstart report keeps small numbers readable."""

from __future__ import annotations

import json
import logging

import pytest
import typer
from typer.testing import CliRunner

from lxm.cli import app
from synthetic import build_corpus, write_raw

WIDTH = 100  # a common terminal width; the help is rendered at it
# typer's rich help pads its text by one column on each side: a line the wrapper ended early left room for the next word
TEXT_WIDTH = WIDTH - 2


def _commands(group, path=()):
    yield path
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, path + (name,))


def _help(path):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=WIDTH, env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, (path, result.output)
    return result.output


def _early_breaks(text: str) -> list[tuple[str, str]]:
    """Adjacent lines of the help's prose (above the options panel) where the next line's first word would have fit on
    the line before: a hard line break from the docstring, not the terminal's wrapping."""
    prose = text.split("╭")[0].splitlines()
    prose = prose[next(i for i, line in enumerate(prose) if "Usage:" in line) + 1:]
    return [(a.strip(), b.strip()) for a, b in zip(prose, prose[1:])
            if a.strip() and b.strip() and len(a.strip()) + 1 + len(b.split()[0]) <= TEXT_WIDTH]


def test_every_help_shows_its_text_as_written():
    paths = list(_commands(typer.main.get_command(app)))
    assert len(paths) > 20  # every command and group, the root included
    for path in paths:
        text = _help(path)
        assert "<bool>" not in text, path  # a flag takes no value: no type is shown for it
        assert _early_breaks(text) == [], path
    flags = _help(("ask",))
    assert "path or [left, right]" in " ".join(flags.replace("│", " ").split())  # not eaten as a style tag
    assert "--json " in flags and "--explain" in flags


def _run_log(run, records, extra: bytes = b"", log_every=None):
    run.mkdir(parents=True)
    (run / "log.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in records).encode() + extra)
    if log_every:  # a run's whole config.yaml, as `lxm pretrain` writes it (the plot reads it strictly)
        from lxm.train.config import load_config

        cfg = load_config("tiny", ["corpus=c", "features=[f]", f"log_every={log_every}"])
        (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def test_a_path_with_rich_markup_prints_exactly(tmp_path):
    run = _run_log(tmp_path / "run", [{"step": 1, "epoch": 0, "loss": 2.0}])
    out = tmp_path / "st[/red]"
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'losses.png'}" in result.output and (out / "losses.png").is_file()
    missing = tmp_path / "[bold]st[/red]"
    result = CliRunner().invoke(app, ["plot", str(missing)])
    assert result.exit_code == 1 and f"error: {missing / 'log.jsonl'}: no such file" in result.output


def test_plot_draws_scores_and_losses_on_their_own_panels(tmp_path):
    from lxm.train.plot import read_log, validation_figure

    run = _run_log(tmp_path / "run", [{"step": 2, "epoch": e, "valid": {"accuracy": 40.0 + e, "macro_f1": 30.0 + e,
                                                                        "loss": 2.0 - e, "qa_acc_vqa": 0.25}}
                                      for e in range(2)])
    _, valid = read_log(run)
    panels = {ax.get_title(): ax for ax in validation_figure(valid, "run").axes}
    assert set(panels) == {"validation loss (log scale)", "validation scores (%)"}
    loss, scores = panels["validation loss (log scale)"], panels["validation scores (%)"]
    assert [ln.get_label() for ln in loss.get_lines()] == ["loss"] and loss.get_yscale() == "log"
    lines = {ln.get_label(): ln for ln in scores.get_lines()}
    assert set(lines) == {"accuracy", "macro_f1", "qa_acc_vqa"} and scores.get_yscale() == "linear"
    assert list(lines["qa_acc_vqa"].get_ydata()) == [25.0, 25.0]  # pretraining's fraction, in percent


def test_plot_of_a_run_shorter_than_log_every_says_so_and_draws_a_single_point(tmp_path, caplog):
    from lxm.train.plot import losses_figure, read_log

    run = _run_log(tmp_path / "run", [{"step": 3, "epoch": 0, "valid": {"accuracy": 41.67}}], log_every=10)
    with caplog.at_level(logging.WARNING, logger="lxm.train.plot"):
        result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "validation.png").is_file() and not (run / "plots" / "losses.png").exists()
    assert "no training step logged (steps are logged every 10 steps" in caplog.text and "losses.png" in caplog.text
    (ax,) = losses_figure(read_log(_run_log(tmp_path / "one", [{"step": 5, "loss": 0.7}]))[0], "one").axes
    (line,) = ax.get_lines()
    assert line.get_marker() not in ("", "None", None) and line.get_markersize() >= 4  # a point, not an empty frame
    low, high = ax.get_xlim()
    assert low <= 4 and high >= 6


def test_plot_skips_damaged_log_lines_with_a_warning(tmp_path, caplog):
    from lxm.train.plot import read_log

    records = [{"step": s, "epoch": 0, "loss": 1.0 / s} for s in (1, 2, 3)]
    run = _run_log(tmp_path / "run", records[:1], extra=b'{"step": 9, "lo\xff\xfe": 1}\n[1, 2\n7\n' +
                   "".join(json.dumps(r) + "\n" for r in records[1:]).encode() + b'{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="lxm.train.plot"):
        train, _ = read_log(run)
        result = CliRunner().invoke(app, ["plot", str(run)])
    assert [r["step"] for r in train] == [1, 2, 3] and result.exit_code == 0, result.output
    assert "1 line not UTF-8 (line 2)" in caplog.text and "1 line not JSON (line 3)" in caplog.text
    assert "1 line not a JSON object (line 4)" in caplog.text and "line 7" not in caplog.text  # a cut last line


def _garble(path, text: str) -> int:
    """Replace the first character of `text` in `path` by a byte that is not UTF-8; its offset."""
    data = path.read_bytes()
    at = data.index(text.encode())
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    return at


@pytest.mark.parametrize(("name", "text"), [
    ("vqa/v2_mscoco_val2014_annotations.json", "soup"),  # json.load
    ("minival.json", "sentf"),
    ("gqa/val_balanced_questions.json", "vehicle"),  # the streaming reader
    ("nlvr2/dev.json", "dev-1203-2-0"),  # JSON lines: the second line
])
def test_an_annotation_file_that_is_not_utf8_is_one_line_naming_it(tmp_path, name, text):
    write_raw(tmp_path)
    at = _garble(tmp_path / name, text)
    result = build_corpus(tmp_path)
    where = f"{tmp_path / name}:2" if name.endswith("dev.json") else str(tmp_path / name)
    assert result.exit_code == 1 and f"{where}: not UTF-8 text at byte {at}" in result.output, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_the_quickstart_report_keeps_small_values_and_one_scale_for_accuracies(tmp_path):
    from lxm.demo.report import SCORES, write_report

    # the files the commands write in a quickstart folder, which the report reads its numbers from
    (tmp_path / "predictions").mkdir()
    for task, scores in (("vqa", {"overall": 41.67, "perAnswerType": {"yes/no": 50.0}}),
                         ("nlvr2", {"accuracy": 50.0, "consistency": 0.0})):
        (tmp_path / SCORES.format(task=task)).write_text(json.dumps(scores, indent=2))
    for run, text in (("pretrain", json.dumps({"step": 4, "epoch": 0, "valid": {"loss": 3.25, "obj": 6.85e-06,
                                                                                "qa_acc_vqa": 0.25}}) + "\n"),
                      ("vqa", json.dumps({"best": 41.67, "best_epoch": 3})),
                      ("nlvr2", json.dumps({"best": 50.0, "best_epoch": 0}))):
        (tmp_path / "runs" / run).mkdir(parents=True)
        (tmp_path / "runs" / run / ("log.jsonl" if run == "pretrain" else "summary.json")).write_text(text)
    counts = {"train2014": 4, "val2014": 2, "nlvr2_train": 4, "nlvr2_dev": 1, "nlvr2_test1": 1}
    report = write_report(tmp_path, [], counts=counts, vocab="vocab.txt", random_weights=True, detector_vocab=False,
                          threads=1).read_text()
    assert "| pretraining minival obj loss (last epoch) | 6.85e-06 |" in report and "0.0000" not in report
    assert "| pretraining minival qa_acc_vqa (last epoch, %) | 25 |" in report  # logged as a fraction
    assert "| VQA minival, official accuracy (overall, %) | 41.67 |" in report
    assert "| vqa finetuning: best local validation accuracy (%, epoch) | 41.67 (3) |" in report


def test_a_progress_bar_shows_a_file_name_with_markup_as_it_is():
    import io

    from rich.console import Console

    from lxm.cli.common import progress

    terminal = Console(file=io.StringIO(), force_terminal=True, width=WIDTH)
    with progress("images", console=terminal) as bar:
        task = bar.add_task("convert st[/red].tsv", total=1)
        bar.advance(task)
    assert "convert st[/red].tsv" in terminal.file.getvalue()
