"""`lxm build-corpus`: LXMERT's aggregated pretraining corpus and the finetuning sets from the ORIGINAL files.

Reproduces the data behind airsplay/lxmert `data/lxmert/{mscoco_train,mscoco_nominival,mscoco_minival,vgnococo}.json`
(lxmert.md §3, paper Table 1) and `data/{vqa,gqa,nlvr2}/*.json` (lxmert.md §5; datasets.md §0-9):

- sources: `mscoco` (COCO captions), `vg` (VG region descriptions as captions), `vqa` (VQA v2), `gqa` (GQA balanced
  train + val), `vgqa` (VG question_answers; "visual7w" in LXMERT's code); only train/dev data enters pretraining;
- image ids as LXMERT: `COCO_{train2014|val2014}_%012d`; a VG image with a coco_id IS that COCO image; other VG images
  are named by their VG id; GQA imageIds are VG ids and follow the same mapping;
- splits: train (COCO train2014), minival (the given ids), nominival (other val2014), vgnococo (VG without COCO);
- labels: VQA soft scores on raw answers within the VQA vocabulary; GQA {answer: 1.0}; VG-QA {convert_ans(answer): 1}.
- NLVR2 (`data/nlvr2/process_raw_data_scripts/process_dataset.py`): the same rows (identifier, img0/img1 from the
  identifier's stem, label, sent, uid `nlvr2_{split}_{i}`). Deliberate differences: `--nlvr2` may be a clone of
  lil-lab/nlvr (read from `nlvr2/data/`, never NLVR1's `nlvr/`); a label other than "True"/"False" or an identifier
  not of the form `split-set-pair-sentence` is an error (the original turned any other label into 0); test2 (the
  hidden set LXMERT did not read) is read when present and its lines may lack a label (stored as -1).

Everything is written into a temporary directory that replaces `--out` only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lxm.corpus.answers import convert_ans, qa_answer_table, vqa_soft_labels, vqa_vocabulary
from lxm.corpus.jsonstream import iter_json_list, iter_json_object
from lxm.corpus.layout import ANSWER_TABLES, CORPUS_TABLE, FINETUNE_DIR, VOCAB_DIR, CorpusError, answers_name
from lxm.jsonl import read_json_lines

_logger = logging.getLogger(__name__)

SOURCES = ("mscoco", "vg", "vqa", "gqa", "vgqa")
QA_SOURCES = ("vqa", "gqa", "vgqa")  # the sources whose sentences are questions with answer labels
LXMERT_SPLITS = ("train", "nominival", "minival", "vgnococo")
IMAGE_SPLITS = ("coco_minus_vg", "coco_and_vg", "vg_minus_coco", "all")
LABELS_TYPE = pa.map_(pa.string(), pa.float32())


@dataclass
class CorpusInputs:
    """Input folders and options of `lxm build-corpus` (any source may be None)."""

    out: Path  # output directory (replaced only when the build completes)
    coco: Path | None = None  # captions_train2014.json, captions_val2014.json
    vg: Path | None = None  # image_data.json, region_descriptions.json, question_answers.json
    vqa: Path | None = None  # v2_OpenEnded_mscoco_*_questions.json, v2_mscoco_*_annotations.json
    gqa: Path | None = None  # {train,val,testdev}_balanced_questions.json, submission_all_questions.json
    nlvr2: Path | None = None  # {train,dev,test1}.json (+ test2.json), JSON lines; or nlvr2/ or a clone of lil-lab/nlvr
    minival_ids: Path | None = None  # LXMERT's mscoco_minival.json or a JSON list of img_ids
    features: list[Path] = field(default_factory=list)  # feature stores: keep only sentences whose image has features
    vqa_min_questions: int = 9  # VQA vocabulary threshold (3,129 answers at full scale)
    qa_table: Path | None = None  # LXMERT's all_ans.json; default: build the table from the data
    qa_table_size: int = 9500
    export_lxmert_json: bool = False  # also write the original mscoco_*/vgnococo JSON files
    overwrite: bool = False  # replace an existing non-empty --out


# --------------------------------------------------------------------------------------------------- reading helpers


def _find(folder: Path, name: str, required: bool = True) -> Path | None:
    """`name` directly in `folder` or anywhere below it (first match by path order)."""
    direct = folder / name
    if direct.is_file():
        return direct
    found = sorted(folder.rglob(name))
    if found:
        return found[0]
    if required:
        raise CorpusError(f"{folder}: expected file {name} (searched the folder and its subfolders)")
    return None


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    """The one-line message for the bytes `data` of `path` that are not UTF-8."""
    line = data.count(b"\n", 0, exc.start) + 1
    return (f"{path}: not UTF-8 text at byte {exc.start} (line {line}: {exc.reason}); annotation files are "
            f"UTF-8 JSON: re-download the file or re-save it as UTF-8")


def _load_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:  # json decodes UTF-8 (or a UTF-16/32 file) itself: offsets are the file's
        raise CorpusError(_not_utf8(path, data, exc)) from None


def _get(rec: Any, name: str, path: Path, index: int | str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(rec, dict) or name not in rec:
        raise CorpusError(f"{path}: record {index}: field '{name}' missing")
    value = rec[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise CorpusError(f"{path}: record {index}: field '{name}' should be {want}, got {type(value).__name__}")
    return value


def _list(obj: Any, key: str | None, path: Path) -> list:
    data = obj if key is None else (obj.get(key) if isinstance(obj, dict) else None)
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected {'a JSON list' if key is None else f'a list under {key!r}'}")
    return data


def coco_img_id(split: str, image_id: int) -> str:
    return f"COCO_{split}_{image_id:012d}"


# --------------------------------------------------------------------------------------------------- NLVR2


NLVR2_SPLITS = ("train", "dev", "test1", "test2")
# `split-set_id-pair_id-sentence_id` (nlvr2/README.md); NLVR1 identifiers are `set-sentence` ("1572-0")
_NLVR2_ID = re.compile(r"(train|dev|test1|test2)-\d+-\d+-\d+")
_NLVR2_LABELS = {"True": 1, "False": 0}


def nlvr2_data_dir(folder: Path) -> Path:
    """The folder holding NLVR2's {train,dev,test1,test2}.json: `folder` itself, its `data/` (the `nlvr2/` folder
    of lil-lab/nlvr) or its `nlvr2/data/` (a clone of lil-lab/nlvr).

    Never searched recursively: the clone also holds NLVR1 under `nlvr/{train,dev,test}/` with the same file names
    (lower-case labels, no image pairs), and `nlvr2/data/{balanced,unbalanced}/` holds subsets of dev and test1.
    """
    for candidate in (folder, folder / "data", folder / "nlvr2" / "data"):
        if (candidate / "dev.json").is_file():
            return candidate
    raise CorpusError(f"--nlvr2 {folder}: no NLVR2 dev.json in it, in data/ or in nlvr2/data/ (give the nlvr2 "
                      f"data folder or a clone of lil-lab/nlvr; NLVR1 under nlvr/ is not read)")


def _nlvr2_record(rec: dict, path: Path, lineno: int, unlabelled_ok: bool) -> tuple[str, int, str]:
    """(identifier, label 1/0 or -1 when unlabelled, sentence) of one JSON line; errors name `file:line: field`."""
    where = f"{path}:{lineno}"
    for name in ("identifier", "sentence"):
        if name not in rec:
            raise CorpusError(f"{where}: field '{name}' missing")
        if not isinstance(rec[name], str):
            raise CorpusError(f"{where}: field '{name}' should be str, got {type(rec[name]).__name__}")
    ident = rec["identifier"]
    if not _NLVR2_ID.fullmatch(ident):
        raise CorpusError(f"{where}: field 'identifier' is {ident[:40]!r}, not NLVR2's split-set-pair-sentence "
                          f"(e.g. 'dev-850-0-0'; is this an NLVR1 file?)")
    label = rec.get("label")
    if label is None and unlabelled_ok:
        return ident, -1, rec["sentence"]
    if "label" not in rec:
        raise CorpusError(f"{where}: field 'label' missing")
    if not isinstance(label, str) or label not in _NLVR2_LABELS:
        raise CorpusError(f"{where}: field 'label' is {label!r}, expected \"True\" or \"False\"")
    return ident, _NLVR2_LABELS[label], rec["sentence"]


# --------------------------------------------------------------------------------------------------- the builder


CORPUS_SCHEMA = pa.schema([("uid", pa.string()), ("img_id", pa.string()), ("source", pa.string()),
                           ("split", pa.string()), ("text", pa.string()), ("labels", LABELS_TYPE)])
VQA_SCHEMA = pa.schema([("question_id", pa.int64()), ("img_id", pa.string()), ("sent", pa.string()),
                        ("label", LABELS_TYPE), ("answer_type", pa.string()), ("question_type", pa.string())])
GQA_SCHEMA = pa.schema([("question_id", pa.string()), ("img_id", pa.string()), ("sent", pa.string()),
                        ("label", LABELS_TYPE)])
NLVR2_SCHEMA = pa.schema([("identifier", pa.string()), ("img0", pa.string()), ("img1", pa.string()),
                          ("label", pa.int8()), ("sent", pa.string()), ("uid", pa.string())])


class _Columns:
    """Rows kept column-wise and moved into Arrow record batches every `chunk` rows.

    Nine million per-row Python objects would not fit the memory budget; Arrow holds strings contiguously.
    """

    def __init__(self, schema: pa.Schema, chunk: int = 1 << 16):
        self.schema, self.chunk = schema, chunk
        self.cols: dict[str, list] = {f.name: [] for f in schema}
        self.batches: list[pa.RecordBatch] = []
        self.n = 0

    def add(self, **values: Any) -> None:
        for name, col in self.cols.items():
            col.append(values[name])
        self.n += 1
        if self.n % self.chunk == 0:
            self._flush()

    def _flush(self) -> None:
        if not next(iter(self.cols.values())):
            return
        arrays = []
        for f in self.schema:
            col = self.cols[f.name]
            if pa.types.is_map(f.type):
                col = [list(v.items()) if v else [] for v in col]
            arrays.append(pa.array(col, type=f.type))
        self.batches.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self.cols = {f.name: [] for f in self.schema}

    def __len__(self) -> int:
        return self.n

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, schema=self.schema)




class CorpusBuilder:
    def __init__(self, inputs: CorpusInputs):
        self.inp = inputs
        self.rows = _Columns(CORPUS_SCHEMA)
        self.minival_ids = self.minival()
        self.feature_ids: set[str] | None = None
        if inputs.features:
            from lxm.features.store import FeatureStore

            self.feature_ids = set()
            for root in inputs.features:
                self.feature_ids.update(FeatureStore(root).ids())
        self.dropped: Counter = Counter()  # sentences without features, per source
        self.uid_counter: dict[tuple[str, str], int] = defaultdict(int)
        self.per_image: dict[str, Counter] = defaultdict(Counter)  # img_id -> sentences per source
        self.coco_split: dict[int, str] = {}  # COCO image id -> train2014 / val2014
        self.vg_to_coco: dict[int, int] = {}  # VG image id -> COCO id (only linked images)
        self.vg_images: set[int] = set()
        self.report: dict[str, Counter] = defaultdict(Counter)  # per source: duplicates, unknown images, dropped ...
        self.finetune: dict[str, _Columns] = {}
        self.vocabs: dict[str, Any] = {}
        self.qa_counts: dict[str, Counter] = {"vqa": Counter(), "gqa": Counter(), "vgqa": Counter()}

    def add(self, img_id: str, source: str, text: str, labels: dict[str, float] | None = None) -> None:
        """One pretraining sentence: uid and split are assigned here, stats counted, featureless images dropped."""
        if self.feature_ids is not None and img_id not in self.feature_ids:
            self.dropped[source] += 1
            return
        img_id = sys.intern(img_id)
        idx = self.uid_counter[(img_id, source)]
        self.uid_counter[(img_id, source)] = idx + 1
        self.per_image[img_id][source] += 1
        self.rows.add(uid=f"{img_id}_{source}_{idx:03d}", img_id=img_id, source=source,
                      split=self.split_of(img_id), text=text, labels=labels)

    def ft(self, name: str) -> _Columns:
        if name not in self.finetune:
            kind = name.split("_")[0]
            self.finetune[name] = _Columns({"vqa": VQA_SCHEMA, "gqa": GQA_SCHEMA, "nlvr2": NLVR2_SCHEMA}[kind])
        return self.finetune[name]

    # ---- sources
    def read_coco(self) -> None:
        folder = self.inp.coco
        if folder is None:
            return
        for split in ("train2014", "val2014"):
            path = _find(folder, f"captions_{split}.json")
            data = _load_json(path)
            for i, img in enumerate(_list(data, "images", path)):
                self.coco_split[_get(img, "id", path, f"images[{i}]", int)] = split
            seen: set[int] = set()
            for i, ann in enumerate(_list(data, "annotations", path)):
                cap_id = _get(ann, "id", path, f"annotations[{i}]", int)
                image_id = _get(ann, "image_id", path, f"annotations[{i}]", int)
                caption = _get(ann, "caption", path, f"annotations[{i}]", str)
                if cap_id in seen:
                    self.report["mscoco"]["duplicate_ids"] += 1
                    continue
                seen.add(cap_id)
                if self.coco_split.get(image_id) != split:
                    self.report["mscoco"]["unknown_images"] += 1
                    continue
                self.add(coco_img_id(split, image_id), "mscoco", caption.strip())

    def read_vqa(self) -> None:
        folder = self.inp.vqa
        if folder is None:
            return
        files = {split: (_find(folder, f"v2_OpenEnded_mscoco_{split}_questions.json"),
                         _find(folder, f"v2_mscoco_{split}_annotations.json")) for split in ("train2014", "val2014")}
        # Pass 1: the vocabulary needs the multiple-choice answers of train AND val. Each file is parsed, reduced to
        # (qid, answer) pairs and released, so that one split's full annotations are in memory at a time.
        mc: list[tuple[int, str]] = []
        for split, (_, apath) in files.items():
            for i, ann in enumerate(_list(_load_json(apath), "annotations", apath)):
                mc.append((_get(ann, "question_id", apath, i, int), _get(ann, "multiple_choice_answer", apath, i, str)))
        vocab = vqa_vocabulary(mc, self.inp.vqa_min_questions)
        del mc
        self.vocabs["vqa"] = vocab
        vocab_set = set(vocab)
        seen: set[int] = set()
        for split, (qpath, apath) in files.items():  # pass 2: labels, one split at a time
            anns: dict[int, dict] = {}
            for i, ann in enumerate(_list(_load_json(apath), "annotations", apath)):
                for j, a in enumerate(_get(ann, "answers", apath, i, list)):
                    _get(a, "answer", apath, f"{i}.answers[{j}]", str)
                anns[ann["question_id"]] = ann
            questions = _list(_load_json(qpath), "questions", qpath)
            for i, q in enumerate(questions):
                self.coco_split.setdefault(_get(q, "image_id", qpath, i, int), split)
            for i, q in enumerate(questions):
                qid = _get(q, "question_id", qpath, i, int)
                image_id = _get(q, "image_id", qpath, i, int)
                text = _get(q, "question", qpath, i, str)
                if qid in seen:
                    self.report["vqa"]["duplicate_ids"] += 1
                    continue
                seen.add(qid)
                ann = anns.get(qid)
                if ann is None:
                    self.report["vqa"]["questions_without_annotation"] += 1
                    continue
                labels = vqa_soft_labels([a["answer"] for a in ann["answers"]], vocab_set)
                img_id = coco_img_id(split, image_id)
                self.add(img_id, "vqa", text, labels)
                self.qa_counts["vqa"].update(convert_ans(a) for a in labels)
                # LXMERT's VQA splits: train, and val2014 divided by image into minival / nominival
                name = "train" if split == "train2014" else "minival" if img_id in self.minival_ids else "nominival"
                self.ft(f"vqa_{name}").add(question_id=qid, img_id=img_id, sent=text, label=labels,
                                           answer_type=ann.get("answer_type", ""),
                                           question_type=ann.get("question_type", ""))
            del anns, questions
        for split, name in (("test2015", "test"), ("test-dev2015", "testdev")):
            qpath = _find(folder, f"v2_OpenEnded_mscoco_{split}_questions.json", required=False)
            if qpath is None:
                continue
            rows = self.ft(f"vqa_{name}")
            for i, q in enumerate(_list(_load_json(qpath), "questions", qpath)):
                rows.add(question_id=_get(q, "question_id", qpath, i, int),
                         img_id=coco_img_id("test2015", _get(q, "image_id", qpath, i, int)),
                         sent=_get(q, "question", qpath, i, str), label=None, answer_type="", question_type="")

    def read_vg(self) -> None:
        folder = self.inp.vg
        if folder is None:
            return
        path = _find(folder, "image_data.json")
        for i, img in enumerate(iter_json_list(path)):
            key = "image_id" if isinstance(img, dict) and "image_id" in img else "id"  # v1.0 used `id`
            vg_id = _get(img, key, path, i, int)
            if vg_id in self.vg_images:
                self.report["vg"]["duplicate_images"] += 1
            self.vg_images.add(vg_id)
            coco = img.get("coco_id")
            if coco is not None:
                self.vg_to_coco[vg_id] = int(coco)
        path = _find(folder, "region_descriptions.json")
        for i, entry in enumerate(iter_json_list(path)):
            vg_id = _get(entry, "id", path, i, int)
            img_id = self.vg_img_id(vg_id, "vg")
            for j, region in enumerate(_get(entry, "regions", path, i, list)):
                phrase = _get(region, "phrase", path, f"{i}.regions[{j}]", str)
                if img_id is not None:
                    self.add(img_id, "vg", phrase.strip())
        path = _find(folder, "question_answers.json")
        for i, entry in enumerate(iter_json_list(path)):
            vg_id = _get(entry, "id", path, i, int)
            img_id = self.vg_img_id(vg_id, "vgqa")
            for j, qa in enumerate(_get(entry, "qas", path, i, list)):
                q = _get(qa, "question", path, f"{i}.qas[{j}]", str)
                a = convert_ans(_get(qa, "answer", path, f"{i}.qas[{j}]", str))
                if img_id is not None:
                    self.add(img_id, "vgqa", q, {a: 1.0})
                    self.qa_counts["vgqa"][a] += 1

    def vg_img_id(self, vg_id: int, source: str) -> str | None:
        """LXMERT's img_id of a VG image (the COCO name when linked); None (reported) when it cannot be named."""
        if self.vg_images and vg_id not in self.vg_images:
            self.report[source]["unknown_images"] += 1
            return None
        coco = self.vg_to_coco.get(vg_id)
        if coco is None:
            return str(vg_id)
        split = self.coco_split.get(coco)
        if split is None:  # linked to a COCO image whose split no COCO/VQA file told us
            self.report[source]["coco_split_unknown"] += 1
            return None
        return coco_img_id(split, coco)

    def read_gqa(self) -> None:
        folder = self.inp.gqa
        if folder is None:
            return
        answers: dict[str, None] = {}  # the GQA vocabulary: every balanced train/val answer, first-seen order
        for name, split in (("train", "train"), ("val", "valid")):
            path = _find(folder, f"{name}_balanced_questions.json")
            rows = self.ft(f"gqa_{split}")
            for qid, q in iter_json_object(path):
                image = _get(q, "imageId", path, qid, str)
                text = _get(q, "question", path, qid, str)
                answer = _get(q, "answer", path, qid, str)
                answers.setdefault(answer)
                img_id = self.vg_img_id(int(image), "gqa") if image.isdigit() else image
                if img_id is None:
                    continue
                self.add(img_id, "gqa", text, {answer: 1.0})
                self.qa_counts["gqa"][convert_ans(answer)] += 1
                rows.add(question_id=qid, img_id=img_id, sent=text, label={answer: 1.0})
        self.vocabs["gqa"] = list(answers)
        extra = (("testdev_balanced_questions.json", "testdev"), ("submission_all_questions.json", "submit"))
        for name, split in extra:
            path = _find(folder, name, required=False)
            if path is None:
                continue
            rows = self.ft(f"gqa_{split}")
            for qid, q in iter_json_object(path):
                answer = q.get("answer") if isinstance(q, dict) else None
                rows.add(question_id=qid, img_id=_get(q, "imageId", path, qid, str),
                         sent=_get(q, "question", path, qid, str),
                         # testdev keeps its answer even outside the table (scored wrong, as the original's
                         # label.get(pred, 0)); the submission file has none
                         label={answer: 1.0} if isinstance(answer, str) else None)

    def read_nlvr2(self) -> None:
        folder = self.inp.nlvr2
        if folder is None:
            return
        data = nlvr2_data_dir(Path(folder))
        for split in NLVR2_SPLITS:
            path = data / f"{split}.json"
            if not path.is_file():
                if split == "test2":  # the hidden test set, public only since 2022
                    continue
                raise CorpusError(f"{data}: expected NLVR2 file {split}.json")
            rows = self.ft(f"nlvr2_{split}")
            for lineno, rec in read_json_lines(path, objects=True, error=CorpusError):
                ident, label, sent = _nlvr2_record(rec, path, lineno, unlabelled_ok=split == "test2")
                stem = ident.rsplit("-", 1)[0]  # the pair: its images are {stem}-img0 / -img1
                rows.add(identifier=ident, img0=f"{stem}-img0", img1=f"{stem}-img1", label=label, sent=sent,
                         uid=f"nlvr2_{split}_{len(rows)}")

    # ---- assembly
    def minival(self) -> set[str]:
        if self.inp.minival_ids is None:
            return set()
        data = _load_json(self.inp.minival_ids)
        ids = []
        for i, item in enumerate(_list(data, None, self.inp.minival_ids)):
            ids.append(item if isinstance(item, str) else _get(item, "img_id", self.inp.minival_ids, i, str))
        return set(ids)

    def split_of(self, img_id: str) -> str:
        if img_id.startswith("COCO_train2014_"):
            return "train"
        if img_id.startswith("COCO_val2014_"):
            return "minival" if img_id in self.minival_ids else "nominival"
        return "vgnococo"

    def build(self) -> dict[str, Any]:
        self.read_coco()
        self.read_vqa()
        self.read_vg()
        self.read_gqa()
        self.read_nlvr2()
        if self.inp.qa_table is not None:
            table = _load_json(self.inp.qa_table)
            for i, rec in enumerate(_list(table, None, self.inp.qa_table)):
                _get(rec, "ans", self.inp.qa_table, i, str)
        else:
            table = qa_answer_table(self.qa_counts, self.inp.qa_table_size)
        self.vocabs["qa"] = table
        return {"rows": self.rows, "stats": self.stats(),
                "report": {k: dict(v) for k, v in self.report.items()}, "dropped_without_features": dict(self.dropped)}

    def stats(self) -> dict[str, Any]:
        """stats.json from the per-image sentence counts (an image counts only where it has a sentence)."""
        linked_coco = {coco_img_id(self.coco_split[c], c) for c in self.vg_to_coco.values() if c in self.coco_split}
        src_images: Counter = Counter()
        src_sent: Counter = Counter()
        part_images: Counter = Counter()
        part_sent: dict[str, Counter] = defaultdict(Counter)
        split_images: Counter = Counter()
        split_sent: Counter = Counter()
        for img, counts in self.per_image.items():
            if img.startswith("COCO_"):
                part = "coco_and_vg" if img in linked_coco else "coco_minus_vg"
            else:
                part = "vg_minus_coco"
            total = sum(counts.values())
            for src, n in counts.items():
                src_images[src] += 1
                src_sent[src] += n
            for p in (part, "all"):
                part_images[p] += 1
                part_sent[p].update(counts)
                part_sent[p]["all"] += total
            split = self.split_of(img)
            split_images[split] += 1
            split_sent[split] += total
        return {
            "sources": {s: {"images": src_images[s], "sentences": src_sent[s]} for s in SOURCES},
            "image_splits": {p: {"images": part_images[p], "sentences": {s: part_sent[p][s] for s in (*SOURCES, "all")}}
                             for p in IMAGE_SPLITS},
            "lxmert_splits": {s: {"images": split_images[s], "sentences": split_sent[s]} for s in LXMERT_SPLITS},
        }


# --------------------------------------------------------------------------------------------------- writing


def _lxmert_json(rows: _Columns) -> dict[str, list[dict]]:
    """The original per-image files: {img_id, sentf: {source: [...]}, labelf: {qa source: [...]}} per split."""
    names = {"mscoco": "mscoco", "vg": "vg", "vqa": "vqa", "gqa": "gqa", "vgqa": "visual7w"}
    images: dict[str, dict[str, Any]] = {}
    split_of: dict[str, str] = {}
    for batch in rows.table().to_batches():
        c = batch.to_pydict()
        for img, source, split, text, labels in zip(c["img_id"], c["source"], c["split"], c["text"], c["labels"]):
            rec = images.setdefault(img, {"img_id": img, "sentf": {}, "labelf": {}})
            split_of[img] = split
            src = names[source]
            rec["sentf"].setdefault(src, []).append(text)
            if source in QA_SOURCES:
                rec["labelf"].setdefault(src, []).append(dict(labels or []))
    files = {"train": "mscoco_train", "nominival": "mscoco_nominival", "minival": "mscoco_minival",
             "vgnococo": "vgnococo"}
    out: dict[str, list[dict]] = {name: [] for name in files.values()}
    for img_id, rec in images.items():
        out[files[split_of[img_id]]].append(rec)
    return out


def build_corpus(inputs: CorpusInputs) -> dict[str, Any]:
    """Read every given source, write all outputs into `inputs.out` atomically; returns stats and reports."""
    if not any([inputs.coco, inputs.vg, inputs.vqa, inputs.gqa, inputs.nlvr2]):
        raise CorpusError("no source given: pass at least one of --coco, --vg, --vqa, --gqa, --nlvr2")
    for name in ("coco", "vg", "vqa", "gqa", "nlvr2"):
        folder = getattr(inputs, name)
        if folder is not None and not Path(folder).is_dir():
            raise CorpusError(f"--{name} {folder}: not a directory")
    out = Path(inputs.out)
    if out.exists() and any(out.iterdir()) and not inputs.overwrite:
        raise CorpusError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    builder = CorpusBuilder(inputs)
    result = builder.build()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / FINETUNE_DIR).mkdir(parents=True)
        (tmp / VOCAB_DIR).mkdir()
        pq.write_table(result["rows"].table(), tmp / CORPUS_TABLE)
        for name, rows in sorted(builder.finetune.items()):
            pq.write_table(rows.table(), tmp / FINETUNE_DIR / f"{name}.parquet")
        for key in ANSWER_TABLES:
            if key in builder.vocabs:
                (tmp / answers_name(key)).write_text(json.dumps(builder.vocabs[key], indent=1) + "\n")
        (tmp / "stats.json").write_text(json.dumps(result["stats"], indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps({"problems": result["report"],
                                                     "dropped_without_features": result["dropped_without_features"]},
                                                    indent=2) + "\n")
        if inputs.export_lxmert_json:
            (tmp / "lxmert").mkdir()
            for name, recs in _lxmert_json(result["rows"]).items():
                (tmp / "lxmert" / f"{name}.json").write_text(json.dumps(recs))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    result["finetune_counts"] = {k: len(v) for k, v in builder.finetune.items()}
    return result


def table1(stats: dict[str, Any]) -> list[list[str]]:
    """Rows of the paper's Table 1 (image split x source counts) from stats.json."""
    names = {"coco_minus_vg": "MS COCO - VG", "coco_and_vg": "MS COCO ∩ VG", "vg_minus_coco": "VG - MS COCO",
             "all": "All"}
    rows = []
    for key in IMAGE_SPLITS:
        part = stats["image_splits"][key]
        rows.append([names[key], str(part["images"])] + [str(part["sentences"][s]) for s in (*SOURCES, "all")])
    return rows
