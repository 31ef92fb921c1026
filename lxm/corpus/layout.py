"""The layout of an `lxm build-corpus` directory, and its readers beside the writer (`lxm.corpus.build`).

    <corpus>/corpus.parquet                 pretraining sentences (uid, img_id, source, split, text, labels)
    <corpus>/finetune/<task>_<split>.parquet  the finetuning tables (VQA, GQA, NLVR2)
    <corpus>/vocab/<name>_answers.json      answer tables (vqa, gqa, qa), id = position
    <corpus>/stats.json, report.json        the build's counts and problems

The trainers and `lxm.infer` read a corpus only through these functions (as timm's `data/readers/`), so a change
of layout is made here and in `build` alone. A missing directory, file or column is a CorpusError naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lxm.errors import ConfigError, LxmError

CORPUS_TABLE = "corpus.parquet"  # the pretraining sentences
FINETUNE_DIR = "finetune"  # the finetuning tables, <task>_<split>.parquet
VOCAB_DIR = "vocab"  # answer tables, <name>_answers.json
ANSWER_TABLES = ("vqa", "gqa", "qa")  # the answer tables a build may write (qa: the pretraining QA head's)


class CorpusError(LxmError, ValueError):
    """Bad or missing input; the message names the file, the record and the field."""


def answers_name(name: str) -> str:
    """The answer table of `name` (vqa, gqa, qa) relative to the corpus directory."""
    return f"{VOCAB_DIR}/{name}_answers.json"


def finetune_name(task: str, split: str) -> str:
    """The finetuning table of `task`'s `split` relative to the corpus directory."""
    return f"{FINETUNE_DIR}/{task}_{split}.parquet"


def corpus_file(corpus: str | os.PathLike, name: str) -> Path:
    """`<corpus>/<name>`, or a CorpusError saying that `corpus` is no directory of `lxm build-corpus` (rather than a
    bare FileNotFoundError that leaves the user guessing which option was wrong)."""
    path = Path(corpus) / name
    if not path.exists():
        what = "no such directory" if not Path(corpus).is_dir() else f"no {name}"
        raise CorpusError(f"{corpus}: not an lxm corpus ({what}): run lxm build-corpus first")
    return path


def finetune_table(corpus: str | os.PathLike, task: str, split: str) -> Path:
    """The existing table `<corpus>/finetune/<task>_<split>.parquet`; a missing one is a CorpusError listing the
    tables the corpus has."""
    path = corpus_file(corpus, FINETUNE_DIR) / f"{task}_{split}.parquet"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob(f"{task}_*.parquet"))
        raise CorpusError(f"{path}: no such table (this corpus has {', '.join(have) or 'no ' + task + ' tables'}"
                          f"; build it with lxm build-corpus --{task} ...)")
    return path


def read_corpus_table(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """A parquet table of `lxm build-corpus`; a damaged file or a missing column is a CorpusError naming it."""
    try:
        return pq.read_table(path, columns=columns)
    except pa.ArrowInvalid as exc:
        raise CorpusError(f"{path}: not a corpus table of lxm build-corpus ({str(exc).splitlines()[0]})") from None


def read_answer_table(path: str | os.PathLike) -> list[str]:
    """A JSON list of answers (strings, or {"ans": ...} records as LXMERT's all_ans.json) or an {answer: id}
    mapping (trainval_ans2label.json); id = position."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: answer table not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(table, dict):
        return [a for a, _ in sorted(table.items(), key=lambda kv: kv[1])]
    if not isinstance(table, list):
        raise ConfigError(f"{path}: expected a list of answers")
    answers = [r.get("ans") if isinstance(r, dict) else r for r in table]
    bad = next((i for i, a in enumerate(answers) if not isinstance(a, str)), None)
    if bad is not None:
        raise ConfigError(f"{path}: record {bad}: expected an answer string or {{'ans': string}}, got {table[bad]!r}")
    return answers
