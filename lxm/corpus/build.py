"""`lxm build-corpus`: LXMERT's aggregated pretraining corpus and the finetuning sets from the ORIGINAL files.

Reproduces the data behind airsplay/lxmert `data/lxmert/{mscoco_train,mscoco_nominival,mscoco_minival,vgnococo}.json`
(lxmert.md §3, paper Table 1) and `data/{vqa,gqa,nlvr2}/*.json` (lxmert.md §5; datasets.md §0-9):

- sources: `mscoco` (COCO captions), `vg` (VG region descriptions as captions), `vqa` (VQA v2), `gqa` (GQA balanced
  train + val), `vgqa` (VG question_answers; "visual7w" in LXMERT's code); only train/dev data enters pretraining;
- image ids as LXMERT: `COCO_{train2014|val2014}_%012d`; a VG image with a coco_id IS that COCO image; other VG images
  are named by their VG id; GQA imageIds are VG ids and follow the same mapping;
- splits: train (COCO train2014), minival (the given ids), nominival (other val2014), vgnococo (VG without COCO);
- labels: VQA soft scores on raw answers within the VQA vocabulary; GQA {answer: 1.0}; VG-QA {convert_ans(answer): 1}.

Everything is written into a temporary directory that replaces `--out` only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lxm.corpus.answers import convert_ans, qa_answer_table, vqa_soft_labels, vqa_vocabulary

_logger = logging.getLogger(__name__)

SOURCES = ("mscoco", "vg", "vqa", "gqa", "vgqa")
LXMERT_SPLITS = ("train", "nominival", "minival", "vgnococo")
IMAGE_SPLITS = ("coco_minus_vg", "coco_and_vg", "vg_minus_coco", "all")
LABELS_TYPE = pa.map_(pa.string(), pa.float32())


class CorpusError(ValueError):
    """Bad or missing input; the message names the file, the record and the field."""


@dataclass
class CorpusInputs:
    """Input folders and options of `lxm build-corpus` (any source may be None)."""

    out: Path  # output directory (replaced only when the build completes)
    coco: Path | None = None  # captions_train2014.json, captions_val2014.json
    vg: Path | None = None  # image_data.json, region_descriptions.json, question_answers.json
    vqa: Path | None = None  # v2_OpenEnded_mscoco_*_questions.json, v2_mscoco_*_annotations.json
    gqa: Path | None = None  # {train,val,testdev}_balanced_questions.json, submission_all_questions.json
    nlvr2: Path | None = None  # train.json, dev.json, test1.json, test2.json (JSON lines)
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


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror})") from None


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


# --------------------------------------------------------------------------------------------------- the builder


@dataclass
class _Row:
    img_id: str
    source: str
    text: str
    labels: dict[str, float]


class CorpusBuilder:
    def __init__(self, inputs: CorpusInputs):
        self.inp = inputs
        self.rows: list[_Row] = []
        self.coco_split: dict[int, str] = {}  # COCO image id -> train2014 / val2014
        self.vg_to_coco: dict[int, int] = {}  # VG image id -> COCO id (only linked images)
        self.vg_images: set[int] = set()
        self.report: dict[str, Counter] = defaultdict(Counter)  # per source: duplicates, unknown images, dropped ...
        self.finetune: dict[str, list[dict]] = {}
        self.vocabs: dict[str, Any] = {}
        self.qa_counts: dict[str, Counter] = {"vqa": Counter(), "gqa": Counter(), "vgqa": Counter()}

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
                self.rows.append(_Row(coco_img_id(split, image_id), "mscoco", caption.strip(), {}))

    def read_vqa(self) -> None:
        folder = self.inp.vqa
        if folder is None:
            return
        per_split: dict[str, tuple[list[dict], dict[int, dict]]] = {}
        mc: list[tuple[int, str]] = []
        for split in ("train2014", "val2014"):
            qpath = _find(folder, f"v2_OpenEnded_mscoco_{split}_questions.json")
            apath = _find(folder, f"v2_mscoco_{split}_annotations.json")
            questions = _list(_load_json(qpath), "questions", qpath)
            anns: dict[int, dict] = {}
            for i, ann in enumerate(_list(_load_json(apath), "annotations", apath)):
                qid = _get(ann, "question_id", apath, i, int)
                for j, a in enumerate(_get(ann, "answers", apath, i, list)):
                    _get(a, "answer", apath, f"{i}.answers[{j}]", str)
                mc.append((qid, _get(ann, "multiple_choice_answer", apath, i, str)))
                anns[qid] = ann
            per_split[split] = (questions, anns)
            for i, q in enumerate(questions):
                self.coco_split.setdefault(_get(q, "image_id", qpath, i, int), split)
        vocab = vqa_vocabulary(mc, self.inp.vqa_min_questions)
        self.vocabs["vqa"] = vocab
        vocab_set = set(vocab)
        seen: set[int] = set()
        for split, (questions, anns) in per_split.items():
            qpath = _find(folder, f"v2_OpenEnded_mscoco_{split}_questions.json")
            rows = []
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
                raw = [a["answer"] for a in ann["answers"]]
                labels = vqa_soft_labels(raw, vocab_set)
                img_id = coco_img_id(split, image_id)
                self.rows.append(_Row(img_id, "vqa", text, labels))
                self.qa_counts["vqa"].update(convert_ans(a) for a in labels)
                rows.append({"question_id": qid, "img_id": img_id, "sent": text, "label": labels,
                             "answer_type": ann.get("answer_type", ""), "question_type": ann.get("question_type", "")})
            self.finetune[f"vqa_{split}"] = rows
        for split, name in (("test2015", "test"), ("test-dev2015", "testdev")):
            qpath = _find(folder, f"v2_OpenEnded_mscoco_{split}_questions.json", required=False)
            if qpath is None:
                continue
            self.finetune[f"vqa_{name}"] = [
                {"question_id": _get(q, "question_id", qpath, i, int),
                 "img_id": coco_img_id("test2015", _get(q, "image_id", qpath, i, int)),
                 "sent": _get(q, "question", qpath, i, str), "label": {}, "answer_type": "", "question_type": ""}
                for i, q in enumerate(_list(_load_json(qpath), "questions", qpath))]

    def read_vg(self) -> None:
        folder = self.inp.vg
        if folder is None:
            return
        path = _find(folder, "image_data.json")
        for i, img in enumerate(_list(_load_json(path), None, path)):
            key = "image_id" if isinstance(img, dict) and "image_id" in img else "id"  # v1.0 used `id`
            vg_id = _get(img, key, path, i, int)
            if vg_id in self.vg_images:
                self.report["vg"]["duplicate_images"] += 1
            self.vg_images.add(vg_id)
            coco = img.get("coco_id")
            if coco is not None:
                self.vg_to_coco[vg_id] = int(coco)
        path = _find(folder, "region_descriptions.json")
        for i, entry in enumerate(_list(_load_json(path), None, path)):
            vg_id = _get(entry, "id", path, i, int)
            img_id = self.vg_img_id(vg_id, "vg")
            for j, region in enumerate(_get(entry, "regions", path, i, list)):
                phrase = _get(region, "phrase", path, f"{i}.regions[{j}]", str)
                if img_id is not None:
                    self.rows.append(_Row(img_id, "vg", phrase.strip(), {}))
        path = _find(folder, "question_answers.json")
        for i, entry in enumerate(_list(_load_json(path), None, path)):
            vg_id = _get(entry, "id", path, i, int)
            img_id = self.vg_img_id(vg_id, "vgqa")
            for j, qa in enumerate(_get(entry, "qas", path, i, list)):
                q = _get(qa, "question", path, f"{i}.qas[{j}]", str)
                a = convert_ans(_get(qa, "answer", path, f"{i}.qas[{j}]", str))
                if img_id is not None:
                    self.rows.append(_Row(img_id, "vgqa", q, {a: 1.0}))
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
        answers: list[str] = []
        for name, split in (("train", "train"), ("val", "valid")):
            path = _find(folder, f"{name}_balanced_questions.json")
            data = _load_json(path)
            if not isinstance(data, dict):
                raise CorpusError(f"{path}: expected a JSON object keyed by question id")
            rows = []
            for qid, q in data.items():
                image = _get(q, "imageId", path, qid, str)
                text = _get(q, "question", path, qid, str)
                answer = _get(q, "answer", path, qid, str)
                answers.append(answer)
                img_id = self.vg_img_id(int(image), "gqa") if image.isdigit() else image
                if img_id is None:
                    continue
                self.rows.append(_Row(img_id, "gqa", text, {answer: 1.0}))
                self.qa_counts["gqa"][convert_ans(answer)] += 1
                rows.append({"question_id": qid, "img_id": img_id, "sent": text, "label": {answer: 1.0}})
            self.finetune[f"gqa_{split}"] = rows
        self.vocabs["gqa"] = list(dict.fromkeys(answers))
        vocab = set(self.vocabs["gqa"])
        for name, split in (("testdev_balanced_questions.json", "testdev"), ("submission_all_questions.json", "submit")):
            path = _find(folder, name, required=False)
            if path is None:
                continue
            data = _load_json(path)
            if not isinstance(data, dict):
                raise CorpusError(f"{path}: expected a JSON object keyed by question id")
            rows = []
            for qid, q in data.items():
                answer = q.get("answer") if isinstance(q, dict) else None
                rows.append({"question_id": qid, "img_id": _get(q, "imageId", path, qid, str),
                             "sent": _get(q, "question", path, qid, str),
                             "label": {answer: 1.0} if answer in vocab else {}})
            self.finetune[f"gqa_{split}"] = rows

    def read_nlvr2(self) -> None:
        folder = self.inp.nlvr2
        if folder is None:
            return
        for split in ("train", "dev", "test1", "test2"):
            path = _find(folder, f"{split}.json", required=split != "test2")
            if path is None:
                continue
            rows = []
            with path.open() as f:
                for lineno, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{path}: record {lineno}: not valid JSON ({exc})") from None
                    ident = _get(rec, "identifier", path, lineno, str)
                    stem = "-".join(ident.split("-")[:-1])
                    label = rec.get("label")
                    rows.append({"identifier": ident, "img0": f"{stem}-img0", "img1": f"{stem}-img1",
                                 "label": 1 if label == "True" else 0 if label == "False" else -1,
                                 "sent": _get(rec, "sentence", path, lineno, str),
                                 "uid": f"nlvr2_{split}_{len(rows)}"})
            self.finetune[f"nlvr2_{split}"] = rows

    # ---- assembly
    def minival(self) -> set[str]:
        if self.inp.minival_ids is None:
            return set()
        data = _load_json(self.inp.minival_ids)
        ids = []
        for i, item in enumerate(_list(data, None, self.inp.minival_ids)):
            ids.append(item if isinstance(item, str) else _get(item, "img_id", self.inp.minival_ids, i, str))
        return set(ids)

    def split_of(self, img_id: str, minival: set[str]) -> str:
        if img_id.startswith("COCO_train2014_"):
            return "train"
        if img_id.startswith("COCO_val2014_"):
            return "minival" if img_id in minival else "nominival"
        return "vgnococo"

    def build(self) -> dict[str, Any]:
        self.read_coco()
        self.read_vqa()
        self.read_vg()
        self.read_gqa()
        self.read_nlvr2()
        minival = self.minival()
        dropped: Counter = Counter()
        if self.inp.features:
            from lxm.extract.store import FeatureStore

            have: set[str] = set()
            for root in self.inp.features:
                have.update(FeatureStore(root).ids())
            kept = []
            for row in self.rows:
                if row.img_id in have:
                    kept.append(row)
                else:
                    dropped[row.source] += 1
            self.rows = kept
        if self.inp.qa_table is not None:
            table = _load_json(self.inp.qa_table)
            for i, rec in enumerate(_list(table, None, self.inp.qa_table)):
                _get(rec, "ans", self.inp.qa_table, i, str)
        else:
            table = qa_answer_table(self.qa_counts, self.inp.qa_table_size)
        self.vocabs["qa"] = table
        counters: dict[tuple[str, str], int] = defaultdict(int)
        records = []
        for row in self.rows:
            idx = counters[(row.img_id, row.source)]
            counters[(row.img_id, row.source)] += 1
            records.append({"uid": f"{row.img_id}_{row.source}_{idx:03d}", "img_id": row.img_id,
                            "source": row.source, "split": self.split_of(row.img_id, minival), "text": row.text,
                            "labels": row.labels})
        for name in ("vqa_val2014",):  # VQA val questions split into nominival / minival by image
            if name in self.finetune:
                val = self.finetune.pop(name)
                self.finetune["vqa_nominival"] = [r for r in val if r["img_id"] not in minival]
                self.finetune["vqa_minival"] = [r for r in val if r["img_id"] in minival]
        if "vqa_train2014" in self.finetune:
            self.finetune["vqa_train"] = self.finetune.pop("vqa_train2014")
        return {"records": records, "stats": self.stats(records),
                "report": {k: dict(v) for k, v in self.report.items()}, "dropped_without_features": dict(dropped)}

    def stats(self, records: list[dict]) -> dict[str, Any]:
        linked_coco = {coco_img_id(self.coco_split[c], c) for c in self.vg_to_coco.values() if c in self.coco_split}
        by_source: dict[str, set[str]] = defaultdict(set)
        sent_source: Counter = Counter()
        image_split: dict[str, set[str]] = defaultdict(set)
        split_sent: dict[str, Counter] = defaultdict(Counter)
        lx_images: dict[str, set[str]] = defaultdict(set)
        lx_sent: Counter = Counter()
        for r in records:
            img, src = r["img_id"], r["source"]
            by_source[src].add(img)
            sent_source[src] += 1
            if img.startswith("COCO_"):
                part = "coco_and_vg" if img in linked_coco else "coco_minus_vg"
            else:
                part = "vg_minus_coco"
            for p in (part, "all"):
                image_split[p].add(img)
                split_sent[p][src] += 1
                split_sent[p]["all"] += 1
            lx_images[r["split"]].add(img)
            lx_sent[r["split"]] += 1
        return {
            "sources": {s: {"images": len(by_source[s]), "sentences": sent_source[s]} for s in SOURCES},
            "image_splits": {p: {"images": len(image_split[p]),
                                 "sentences": {s: split_sent[p][s] for s in (*SOURCES, "all")}}
                             for p in IMAGE_SPLITS},
            "lxmert_splits": {s: {"images": len(lx_images[s]), "sentences": lx_sent[s]} for s in LXMERT_SPLITS},
        }


# --------------------------------------------------------------------------------------------------- writing


def _write_parquet(rows: list[dict], path: Path, schema: pa.Schema) -> None:
    table = pa.Table.from_pylist([{**r, **({"labels": list(r["labels"].items())} if "labels" in r else {}),
                                   **({"label": list(r["label"].items())} if isinstance(r.get("label"), dict) else {})}
                                  for r in rows], schema=schema)
    pq.write_table(table, path)


CORPUS_SCHEMA = pa.schema([("uid", pa.string()), ("img_id", pa.string()), ("source", pa.string()),
                           ("split", pa.string()), ("text", pa.string()), ("labels", LABELS_TYPE)])
VQA_SCHEMA = pa.schema([("question_id", pa.int64()), ("img_id", pa.string()), ("sent", pa.string()),
                        ("label", LABELS_TYPE), ("answer_type", pa.string()), ("question_type", pa.string())])
GQA_SCHEMA = pa.schema([("question_id", pa.string()), ("img_id", pa.string()), ("sent", pa.string()),
                        ("label", LABELS_TYPE)])
NLVR2_SCHEMA = pa.schema([("identifier", pa.string()), ("img0", pa.string()), ("img1", pa.string()),
                          ("label", pa.int8()), ("sent", pa.string()), ("uid", pa.string())])


def _lxmert_json(records: list[dict]) -> dict[str, list[dict]]:
    """The original per-image files: {img_id, sentf: {source: [...]}, labelf: {qa source: [...]}} per split."""
    names = {"mscoco": "mscoco", "vg": "vg", "vqa": "vqa", "gqa": "gqa", "vgqa": "visual7w"}
    images: dict[str, dict[str, Any]] = {}
    split_of: dict[str, str] = {}
    for r in records:
        rec = images.setdefault(r["img_id"], {"img_id": r["img_id"], "sentf": {}, "labelf": {}})
        split_of[r["img_id"]] = r["split"]
        src = names[r["source"]]
        rec["sentf"].setdefault(src, []).append(r["text"])
        if r["source"] in ("vqa", "gqa", "vgqa"):
            rec["labelf"].setdefault(src, []).append(r["labels"])
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
        (tmp / "finetune").mkdir(parents=True)
        (tmp / "vocab").mkdir()
        _write_parquet(result["records"], tmp / "corpus.parquet", CORPUS_SCHEMA)
        for name, rows in sorted(builder.finetune.items()):
            schema = VQA_SCHEMA if name.startswith("vqa") else GQA_SCHEMA if name.startswith("gqa") else NLVR2_SCHEMA
            _write_parquet(rows, tmp / "finetune" / f"{name}.parquet", schema)
        vocab_files = {"vqa": "vqa_answers.json", "gqa": "gqa_answers.json", "qa": "qa_answers.json"}
        for key, fname in vocab_files.items():
            if key in builder.vocabs:
                (tmp / "vocab" / fname).write_text(json.dumps(builder.vocabs[key], indent=1) + "\n")
        (tmp / "stats.json").write_text(json.dumps(result["stats"], indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps({"problems": result["report"],
                                                     "dropped_without_features": result["dropped_without_features"]},
                                                    indent=2) + "\n")
        if inputs.export_lxmert_json:
            (tmp / "lxmert").mkdir()
            for name, recs in _lxmert_json(result["records"]).items():
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
