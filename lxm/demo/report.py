"""report.md of a quickstart folder: the commands, their work and times, the metrics, the answers and the pictures.

Every number comes from a file a command wrote in the folder, never from a command's stdout in memory, so the report
can be rebuilt from the folder and says what the files say: the official scores are the kept stdout of
`lxm evaluate` (`SCORES`), the `lxm ask` replies that of `lxm ask --json` (`REPLY`), `lxm predict`'s answers come
from its prediction files (`PREDICTIONS`), the pretraining minival losses from the run's log.jsonl and the best
finetuning epochs from the runs' summary.json. What no file holds is the runner's to give: each stage's command,
work and seconds (`Stage`), the world's counts, and the load of the machine.

Accuracies are in percent (pretraining logs its QA accuracy as a fraction: scaled here); other numbers are given to
4 significant digits, so a small loss such as 6.85e-06 stays readable.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

SCORES = "predictions/evaluate_{task}.json"  # stdout of `lxm evaluate TASK`, kept by the quickstart
REPLY = "predictions/ask_{task}.json"  # stdout of `lxm ask --json`, kept beside the predictions it is compared with
PREDICTIONS = {"vqa": "predictions/vqa_minival_predict.json", "nlvr2": "predictions/nlvr2_dev_predict.csv"}
DEMO_TASKS = ("vqa", "nlvr2")  # the finetuning tasks the quickstart runs, in its order


@dataclass
class Stage:
    """One `lxm` command of the quickstart, as the report lists it."""

    name: str
    command: list[str]  # the arguments after `lxm`
    seconds: float = 0.0
    work: str = ""  # what the stage did, in machine-independent terms (images, optimizer steps)
    stdout: str = ""  # file (relative to the quickstart folder) that keeps the command's stdout; "" = not kept


def read_metrics(out: str | os.PathLike) -> dict:
    """The report's numbers from the files in quickstart folder `out`: per task the `lxm evaluate` scores, its
    finetuning run's summary.json (`{task}_best`), and the pretraining run's last minival record
    (`pretrain_minival`: losses, QA accuracy as a fraction)."""
    from lxm.train.plot import read_log

    out = Path(out)
    metrics = {task: json.loads((out / SCORES.format(task=task)).read_text()) for task in DEMO_TASKS}
    _, pre_valid = read_log(out / "runs" / "pretrain")
    metrics["pretrain_minival"] = pre_valid[-1]["valid"] if pre_valid else {}
    for task in DEMO_TASKS:
        metrics[f"{task}_best"] = json.loads((out / "runs" / task / "summary.json").read_text())
    return metrics


def read_answers(out: str | os.PathLike, asked: dict) -> dict:
    """`asked` (task -> what the ask stage asked: the text, its example id and the ground truth) with, per task, the
    `lxm ask` reply (`reply`) and `lxm predict`'s answer for the same example (`predict`), read from folder `out`."""
    out = Path(out)
    answers = {task: {**example, "reply": json.loads((out / REPLY.format(task=task)).read_text())}
               for task, example in asked.items()}
    with open(out / PREDICTIONS["nlvr2"], newline="") as handle:
        answers["nlvr2"]["predict"] = dict(csv.reader(handle))[answers["nlvr2"]["identifier"]]
    vqa_predictions = json.loads((out / PREDICTIONS["vqa"]).read_text())
    answers["vqa"]["predict"] = next(r["answer"] for r in vqa_predictions
                                     if r["question_id"] == answers["vqa"]["question_id"])
    return answers


def num(value) -> str:
    """A number for people: 4 significant digits, so that 6.85e-06 stays 6.85e-06 (":.4f" made it 0.0000)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def scores_line(scores: dict) -> str:
    """`lxm evaluate`'s scores in one line, in percent as it gives them: overall / accuracy first, then per type."""
    parts = [f"{k} {num(v)} %" for k, v in scores.items() if k in ("overall", "accuracy", "consistency")]
    for atype, v in sorted((scores.get("perAnswerType") or {}).items()):
        parts.append(f"{atype} {num(v)} %")
    return ", ".join(parts) or json.dumps(scores)


def ask_line(asked: dict) -> str:
    """What `lxm ask` was asked and answered (`asked["reply"]`), with the ground truth."""
    reply = asked.get("reply", {})
    text = asked.get("question") or asked.get("statement")
    if "answers" in reply:
        said = ", ".join(f"{a['answer']} {num(a['score'])}" for a in reply["answers"])
    else:
        said = f"{reply.get('label')} {num(reply.get('score'))}"
    return f"{text!r} -> {said} (probabilities; ground truth {asked.get('truth')})"


def _ask_lines(asked: dict) -> list[str]:
    """The report's section on the ask stages: each request, the reply, the ground truth and predict's answer."""
    if not asked:
        return []
    vqa, nlvr2 = asked["vqa"], asked["nlvr2"]
    lines = ["", "## Asking the model", "",
             ("`lxm ask` on the raw image files: the detector runs again as the extract stage ran it, so the answers "
              "are `lxm predict`'s from the stored features, up to their float16 rounding. The `--json` replies are "
              "in `predictions/ask_vqa.json` and `predictions/ask_nlvr2.json`."), "",
             (f"Q: *{vqa['question']}* (`{vqa['image']}`, question_id {vqa['question_id']}; ground truth "
              f"**{vqa['truth']}**, `lxm predict` **{vqa['predict']}**)"), "",
             "| answer | probability |", "|---|---|"]
    lines += [f"| {a['answer']} | {num(a['score'])} |" for a in vqa.get("reply", {}).get("answers", [])]
    reply = nlvr2.get("reply", {})
    lines += ["", (f"S: *{nlvr2['statement']}* (pair `{nlvr2['identifier']}`; ground truth **{nlvr2['truth']}**, "
                   f"`lxm predict` **{nlvr2['predict']}**): `lxm ask` says **{reply.get('label')}** with probability "
                   f"{num(reply.get('score', float('nan')))}."), "",
              ("What the answer drew on (`lxm ask --explain`): each box lit by its share of the relevance for the "
               "answer (Chefer et al. 2021, `--explain-method relevance`), the strongest labelled, the words "
               "highlighted by theirs:"), "",
              "![ask explain](pictures/ask_explain.png)", "", "![ask explain nlvr2](pictures/ask_explain_nlvr2.png)"]
    return lines


def write_report(out: str | os.PathLike, stages: list[Stage], *, counts: dict, vocab: str, random_weights: bool,
                 detector_vocab: bool, threads: int, asked: dict | None = None,
                 load: tuple[float, float] | None = None, backbone: str = "butd") -> Path:
    """Write out/report.md for the quickstart folder `out`, whose `stages` have run, and return its path.

    Args:
        counts: the world's sizes, as `lxm.demo.world.make_world` returns them.
        vocab: the WordPiece vocabulary the runs used.
        random_weights: whether the detector had seeded random weights (said first, in bold).
        detector_vocab: whether `lxm show` had the detector's class names.
        threads: torch threads of the run.
        asked: task -> what the ask stages asked (`read_answers` adds the replies); None: no such section.
        load: the 1-minute load average at the start and at the end, where the system gives it.
        backbone: the extract stages' `--backbone` (butd: the detector's regions).
    """
    out = Path(out)
    m = read_metrics(out)
    lines = ["# lxm quickstart report", ""]
    if random_weights and backbone != "butd":
        lines += [(f"**The visual features come from `--backbone {backbone}` with seeded random weights** "
                   "(`--weights random`): they carry little of what the images show, so the numbers below prove that "
                   "the chain runs end to end over that backbone (cells or patches, no object labels: pretraining "
                   "leaves out the label losses), not what LXMERT reaches."), ""]
    elif random_weights:
        lines += [("**The region features come from a detector with seeded random weights** (`--weights random`, the "
                   "tiny detector): they carry little of what the images show, so the numbers below prove that the "
                   "chain runs end to end, not what LXMERT reaches. Pass `--weights` with the BUTD detector "
                   "weights for real features."), ""]
    lines += [(f"World: {counts['train2014']} train2014 + {counts['val2014']} val2014 images of coloured shapes "
               f"(captions and VQA questions), NLVR2 pairs train {counts['nlvr2_train']} / dev {counts['nlvr2_dev']} "
               f"/ test1 {counts['nlvr2_test1']}. Vocabulary: `{vocab}`."), "",
              "## Metrics", "", "Accuracies and consistency in percent; losses as logged.", "",
              "| what | value |", "|---|---|"]
    vqa, nlvr2 = m["vqa"], m["nlvr2"]
    lines.append(f"| VQA minival, official accuracy (overall, %) | {num(vqa.get('overall'))} |")
    for atype, value in sorted(vqa.get("perAnswerType", {}).items()):
        lines.append(f"| VQA minival, answer type {atype} (%) | {num(value)} |")
    lines.append(f"| NLVR2 dev accuracy / consistency (%) | {num(nlvr2.get('accuracy'))} / "
                 f"{num(nlvr2.get('consistency'))} |")
    for key, value in sorted(m["pretrain_minival"].items()):
        if key.startswith("qa_acc") and isinstance(value, (int, float)):  # pretraining logs it as a fraction
            lines.append(f"| pretraining minival {key} (last epoch, %) | {num(100 * value)} |")
        else:
            lines.append(f"| pretraining minival {'total' if key == 'loss' else key} loss (last epoch) | "
                         f"{num(value)} |")
    for task in DEMO_TASKS:
        best = m[f"{task}_best"]
        lines.append(f"| {task} finetuning: best local validation accuracy (%, epoch) | {num(best.get('best'))} "
                     f"({best.get('best_epoch')}) |")
    lines += _ask_lines(read_answers(out, asked) if asked else {})
    lines += ["", "## Gallery", "", ("Every minival question and NLVR2 dev pair with its boxes, ground truth, top-5 "
                                     "predictions and right or wrong, the accuracy per type and filters (`lxm "
                                     "gallery`; static pages, open them in a browser): "
                                     "[VQA minival](gallery/vqa/index.html), [NLVR2 dev](gallery/nlvr2/index.html).")]
    lines += ["", "## Commands", "", "| stage | work | seconds | command |", "|---|---|---|---|"]
    for stage in stages:
        cmd = " ".join(shlex.quote(a) for a in ["lxm", *stage.command]).replace(str(out) + "/", "")
        lines.append(f"| {stage.name} | {stage.work} | {stage.seconds:.1f} | `{cmd}` |")
    total = sum(s.seconds for s in stages)
    images = sum(int(s.work.split()[0]) for s in stages if s.work.endswith(" images"))
    steps = sum(int(s.work.split()[0]) for s in stages if " steps of " in s.work)
    load_text = ""
    if load:  # seconds mean little on a busy machine; the load says how busy it was
        load_text = f" 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end."
    names = ("names from `--detector-vocab`" if detector_vocab else
             "class and attribute ids: the detector's vocabulary was not given")
    lines += ["", (f"Total {total:.0f} s for {images} images and {steps} optimizer steps, on {os.cpu_count()} CPU "
                   f"cores with {threads} torch thread(s).{load_text} Paths are relative to `{out}`."), "",
              "## Pictures", "", f"Boxes and labels of one image (`lxm show`, upscaled; {names}):", "",
              "![boxes](pictures/boxes.png)", ""]
    for run in ("pretrain", "vqa", "nlvr2"):
        for name in ("losses", "validation"):
            if (out / "pictures" / run / f"{name}.png").exists():
                lines += [f"{run} {name} (`lxm plot`):", "", f"![{run} {name}](pictures/{run}/{name}.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
