"""Corpus builder on small, format-exact raw files (records modelled on ../shared/reference/datasets.md)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lxm.cli import app
from lxm.corpus.answers import (
    convert_ans,
    normalize_vqa_answer,
    process_punctuation,
    soft_score,
    vqa_soft_labels,
    vqa_vocabulary,
)
from synthetic import build_corpus, write_raw


@pytest.fixture()
def built(tmp_path):
    write_raw(tmp_path)
    result = build_corpus(tmp_path, "--export-lxmert-json")
    assert result.exit_code == 0, result.output
    return tmp_path / "out", result


def test_stats_follow_table1_and_the_lxmert_splits(built):
    out, result = built
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"] == {"mscoco": {"images": 4, "sentences": 5}, "vg": {"images": 2, "sentences": 3},
                                "vqa": {"images": 4, "sentences": 5}, "gqa": {"images": 2, "sentences": 3},
                                "vgqa": {"images": 2, "sentences": 3}}
    parts = stats["image_splits"]
    assert parts["coco_and_vg"]["images"] == 2  # 458752 (VG 2379215) and 393225 (VG 2401002)
    assert parts["coco_minus_vg"]["images"] == 2 and parts["vg_minus_coco"]["images"] == 1
    assert parts["all"]["sentences"]["all"] == 19 and parts["vg_minus_coco"]["sentences"]["vgqa"] == 2
    assert stats["lxmert_splits"]["minival"] == {"images": 1, "sentences": 2}
    assert stats["lxmert_splits"]["vgnococo"] == {"images": 1, "sentences": 4}
    assert "MS COCO ∩ VG" in result.output and "duplicate_ids 1" in result.output


def test_rows_ids_and_labels(built):
    out, _ = built
    rows = pq.read_table(out / "corpus.parquet").to_pylist()
    by_uid = {r["uid"]: r for r in rows}
    ball = by_uid["COCO_train2014_000000458752_vqa_000"]
    # soft scores on RAW strings inside the vocabulary (here: the multiple-choice answers): "baseball", "a ball" and
    # "pitch" are not vocabulary entries, so only "ball" (6 of 10 annotators) remains
    assert dict(ball["labels"]) == {"ball": 1.0}
    two = by_uid["COCO_train2014_000000262146_vqa_000"]
    assert dict(two["labels"]) == {"2": 1.0}  # the raw "two" is not merged into "2" (compute_softscore.py)
    assert by_uid["COCO_train2014_000000458752_vg_001"]["text"] == "green net in front"
    assert dict(by_uid["COCO_train2014_000000458752_gqa_000"]["labels"]) == {"orange": 1.0}  # VG id -> COCO image
    assert dict(by_uid["2400001_vgqa_001"]["labels"]) == {"1": 1.0}  # convert_ans("One.")
    assert by_uid["2400001_vgqa_000"]["split"] == "vgnococo"
    assert by_uid["COCO_val2014_000000500000_vqa_000"]["split"] == "minival"
    assert by_uid["COCO_val2014_000000393225_mscoco_000"]["split"] == "nominival"


def test_finetuning_sets_and_vocabularies(built):
    out, _ = built
    ft = out / "finetune"
    assert {p.stem for p in ft.iterdir()} == {"vqa_train", "vqa_nominival", "vqa_minival", "vqa_test", "vqa_testdev",
                                               "gqa_train", "gqa_valid", "gqa_testdev", "nlvr2_train", "nlvr2_dev",
                                               "nlvr2_test1"}
    minival = pq.read_table(ft / "vqa_minival.parquet").to_pylist()
    assert [r["question_id"] for r in minival] == [500000000]
    dev = pq.read_table(ft / "nlvr2_dev.parquet").to_pylist()
    assert dev[1] == {"identifier": "dev-1203-2-0", "img0": "dev-1203-2-img0", "img1": "dev-1203-2-img1", "label": 0,
                      "sent": "Each image contains exactly two dogs.", "uid": "nlvr2_dev_1"}
    testdev = pq.read_table(ft / "gqa_testdev.parquet").to_pylist()
    assert testdev[0]["img_id"] == "n161313" and dict(testdev[0]["label"]) == {"yes": 1.0}
    # an answer outside the GQA table is kept (the original scores it wrong instead of dropping the question)
    assert testdev[1]["question_id"] == "202" and dict(testdev[1]["label"]) == {"teal": 1.0}
    assert json.loads((out / "vocab" / "vqa_answers.json").read_text()) == ["ball", "no", "2", "soup", "yes"]
    assert json.loads((out / "vocab" / "gqa_answers.json").read_text()) == ["orange", "yes", "bus"]
    qa = json.loads((out / "vocab" / "qa_answers.json").read_text())
    assert {"ans": "orange", "dsets": ["gqa", "visual7w"]} in qa and [r["ans"] for r in qa] == sorted(r["ans"] for r in qa)


def test_lxmert_json_export_matches_the_original_layout(built):
    out, _ = built
    train = json.loads((out / "lxmert" / "mscoco_train.json").read_text())
    rec = next(r for r in train if r["img_id"] == "COCO_train2014_000000458752")
    assert set(rec["sentf"]) == {"mscoco", "vg", "vqa", "gqa", "visual7w"}
    assert len(rec["labelf"]["vqa"]) == len(rec["sentf"]["vqa"]) == 2
    assert rec["labelf"]["visual7w"] == [{"orange": 1.0}]
    assert [r["img_id"] for r in json.loads((out / "lxmert" / "vgnococo.json").read_text())] == ["2400001"]


def test_missing_field_names_file_record_and_field_and_writes_nothing(tmp_path):
    write_raw(tmp_path)
    path = tmp_path / "vg" / "question_answers.json"
    data = json.loads(path.read_text())
    del data[1]["qas"][1]["answer"]
    path.write_text(json.dumps(data))
    result = build_corpus(tmp_path)
    assert result.exit_code == 1
    assert "question_answers.json: record 1.qas[1]: field 'answer' missing" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_malformed_json_and_missing_files_are_named(tmp_path):
    write_raw(tmp_path)
    (tmp_path / "gqa" / "val_balanced_questions.json").write_text("{not json")
    assert "val_balanced_questions.json: not valid JSON" in build_corpus(tmp_path).output
    (tmp_path / "gqa" / "val_balanced_questions.json").unlink()
    assert "expected file val_balanced_questions.json" in build_corpus(tmp_path).output


def test_existing_output_is_kept_unless_overwrite(built, tmp_path):
    out, _ = built
    result = build_corpus(tmp_path)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert build_corpus(tmp_path, "--overwrite").exit_code == 0


def test_features_filter_reports_drops_per_source(tmp_path):
    import numpy as np

    from lxm.features.records import ImageFeatures
    from lxm.features.store import FeatureStoreWriter

    write_raw(tmp_path)
    with FeatureStoreWriter(tmp_path / "feats", num_boxes=1, feature_dim=2) as w:
        w.add(ImageFeatures("2400001", 10, 10, np.zeros(1, np.int64), np.zeros(1, np.float32),
                            np.zeros(1, np.int64), np.zeros(1, np.float32), np.zeros((1, 4), np.float32),
                            np.zeros((1, 2), np.float32)))
    result = build_corpus(tmp_path, "--features", str(tmp_path / "feats"))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out" / "corpus.parquet").to_pylist()
    assert {r["img_id"] for r in rows} == {"2400001"} and len(rows) == 4
    assert "dropped (no features): gqa 2, mscoco 5, vg 2, vgqa 1, vqa 5" in result.output


def test_vqa_normalisation_rules():
    assert process_punctuation("1,000") == "1000"
    assert normalize_vqa_answer("red/white") == "red white"
    assert normalize_vqa_answer("red / white") == "red white"
    assert normalize_vqa_answer("3.") == "3" and normalize_vqa_answer("2.5") == "2.5"
    assert normalize_vqa_answer("Two dogs") == "2 dogs" and normalize_vqa_answer("none") == "0"
    assert normalize_vqa_answer("The  Man") == "man" and normalize_vqa_answer("dont") == "don't"
    assert process_punctuation("." * 40) == "." * 8  # the evaluator removes at most 32 periods
    assert [soft_score(k) for k in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert vqa_soft_labels(["a", "a", "b", "c"], {"a", "b"}) == {"a": 0.6, "b": 0.3}
    assert vqa_vocabulary([(1, "Yes"), (2, "yes"), (3, "no")], min_questions=2) == ["yes"]
    assert convert_ans("A man.") == "man" and convert_ans("Grey") == "gray" and convert_ans("") == ""
    assert convert_ans("The Eiffel tower.") == "eiffel tower"


def test_streaming_json_readers_across_buffer_boundaries(tmp_path, monkeypatch):
    import lxm.corpus.jsonstream as js

    monkeypatch.setattr(js, "_CHUNK", 7)  # force values to straddle many reads
    items = [{"id": i, "qas": [{"q": "x" * i, "a": [1.5, -2e3, None, True]}]} for i in range(30)] + [123456789]
    (tmp_path / "l.json").write_text(" \n" + json.dumps(items, indent=1) + "\n")
    assert list(js.iter_json_list(tmp_path / "l.json")) == items
    obj = {f"{i:08d}": {"imageId": str(i), "answer": "yes" * i} for i in range(25)}
    (tmp_path / "o.json").write_text(json.dumps(obj))
    assert dict(js.iter_json_object(tmp_path / "o.json")) == obj
    (tmp_path / "e.json").write_text("[ ]")
    assert list(js.iter_json_list(tmp_path / "e.json")) == []
    (tmp_path / "bad.json").write_text('[{"a": 1}, {"b": ]')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        list(js.iter_json_list(tmp_path / "bad.json"))
    (tmp_path / "cut.json").write_text('[{"a": 1}, {"b": 2}')
    with pytest.raises(ValueError, match="cut.json: not valid JSON"):
        list(js.iter_json_list(tmp_path / "cut.json"))


# ---- NLVR2 from a clone of lil-lab/nlvr: NLVR1 under nlvr/, NLVR2 under nlvr2/data/ (same file names in both)

def _nlvr1_line(identifier, label="true"):
    # NLVR1 (synthetic images): lower-case labels, `set-sentence` identifiers, structured_rep instead of urls
    return {"sentence": "There is a tower with four blocks.", "label": label, "identifier": identifier,
            "directory": "2", "evals": {"r1": label, "r6": label, "r0": label},
            "structured_rep": [[{"y_loc": 80, "type": "square", "color": "Yellow", "x_loc": 40, "size": 20}], [], []]}


def _nlvr2_line(identifier, label="True", sentence="Each image contains exactly two dogs.", **extra):
    rec = {"validation": {"61": label}, "sentence": sentence, "left_url": "https://example.org/a1.jpg",
           "writer": "61", "label": label, "right_url": "https://example.org/b7.jpg", "synset": "dog",
           "query": "two dogs on grass12", "identifier": identifier, **extra}
    if not identifier.startswith("train"):
        rec["extra_validations"] = {"154": label, "139": label, "149": label, "62": label}
    return rec


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_nlvr_clone(root):
    """The lil-lab/nlvr layout: README.md, nlvr/{train,dev,test,hidden}/*.json, nlvr2/data/*.json + subsets."""
    root.mkdir(parents=True)
    (root / "README.md").write_text("# Cornell NLVR and NLVR2\n")
    for split, n in (("train", 3), ("dev", 2), ("test", 2), ("hidden", 1)):
        _jsonl(root / "nlvr" / split / f"{split}.json", [_nlvr1_line(f"{1572 + i}-{i % 3}") for i in range(n)])
    data = root / "nlvr2" / "data"
    nlvr2 = {
        "train": [_nlvr2_line("train-10171-0-0", directory="42"),
                  _nlvr2_line("train-10171-1-0", "False", directory="42")],
        "dev": [_nlvr2_line("dev-850-0-0", "False"), _nlvr2_line("dev-850-2-0"),
                _nlvr2_line("dev-850-2-1", sentence="The left image shows a dog on a red blanket.")],
        "test1": [_nlvr2_line("test1-0-1-0", "False"), _nlvr2_line("test1-0-0-0")],
        "test2": [_nlvr2_line("test2-189-0-0"), _nlvr2_line("test2-189-1-0", "False")],
    }
    for split, recs in nlvr2.items():
        _jsonl(data / f"{split}.json", recs)
    for subset in ("balanced", "unbalanced"):  # filter_data.py's subsets of dev / test1: not separate splits
        _jsonl(data / subset / f"{subset}_dev.json", nlvr2["dev"][:1])
        _jsonl(data / subset / f"{subset}_test1.json", nlvr2["test1"][:1])
    (root / "nlvr2" / "util" / "hashes").mkdir(parents=True)
    (root / "nlvr2" / "util" / "hashes" / "dev_hashes.json").write_text(json.dumps({"dev-850-0-img0.png": "ffe0"}))
    return nlvr2


def _build_nlvr2(tmp_path, folder):
    return CliRunner().invoke(app, ["build-corpus", "--out", str(tmp_path / "out"), "--nlvr2", str(folder)])


def test_nlvr2_reads_only_nlvr2_from_a_clone_of_the_nlvr_repository(tmp_path):
    lines = write_nlvr_clone(tmp_path / "nlvr")
    result = _build_nlvr2(tmp_path, tmp_path / "nlvr")
    assert result.exit_code == 0, result.output
    ft = tmp_path / "out" / "finetune"
    assert {p.stem for p in ft.iterdir()} == {"nlvr2_train", "nlvr2_dev", "nlvr2_test1", "nlvr2_test2"}
    for split, recs in lines.items():
        rows = pq.read_table(ft / f"nlvr2_{split}.parquet").to_pylist()
        assert [r["identifier"] for r in rows] == [r["identifier"] for r in recs]
        assert [r["label"] for r in rows] == [int(r["label"] == "True") for r in recs]
    dev = pq.read_table(ft / "nlvr2_dev.parquet").to_pylist()
    assert dev[2] == {"identifier": "dev-850-2-1", "img0": "dev-850-2-img0", "img1": "dev-850-2-img1", "label": 1,
                      "sent": "The left image shows a dog on a red blanket.", "uid": "nlvr2_dev_2"}
    # the nlvr2/ folder itself and its data/ folder are read the same way
    for folder in (tmp_path / "nlvr" / "nlvr2", tmp_path / "nlvr" / "nlvr2" / "data"):
        assert CliRunner().invoke(app, ["build-corpus", "--out", str(tmp_path / "o2"), "--nlvr2", str(folder),
                                        "--overwrite"]).exit_code == 0
        assert pq.read_table(tmp_path / "o2" / "finetune" / "nlvr2_dev.parquet").num_rows == 3


def test_nlvr2_folder_without_nlvr2_files_is_named(tmp_path):
    write_nlvr_clone(tmp_path / "nlvr")
    result = _build_nlvr2(tmp_path, tmp_path / "nlvr" / "nlvr")  # NLVR1's folder: dev/dev.json, train/train.json
    assert result.exit_code == 1
    assert "no NLVR2 dev.json" in result.output and "nlvr2/data" in result.output


@pytest.mark.parametrize("split, line, message", [
    ("dev", _nlvr1_line("1572-0", "false"), "field 'identifier'"),  # an NLVR1 line
    ("dev", _nlvr2_line("dev-850-3-0", "true"), "field 'label'"),
    ("train", {k: v for k, v in _nlvr2_line("train-1-0-0").items() if k != "label"}, "field 'label' missing"),
    ("test1", _nlvr2_line("test1-0-2-0", None), "field 'label'"),
    ("dev", _nlvr2_line("dev-850-3", "True"), "field 'identifier'"),
    ("dev", _nlvr2_line("dev-850-x-0", "True"), "field 'identifier'"),
    ("dev", {k: v for k, v in _nlvr2_line("dev-850-3-0").items() if k != "sentence"}, "field 'sentence' missing"),
])
def test_nlvr2_lines_with_bad_label_or_identifier_name_file_line_and_field(tmp_path, split, line, message):
    write_nlvr_clone(tmp_path / "nlvr")
    path = tmp_path / "nlvr" / "nlvr2" / "data" / f"{split}.json"
    with path.open("a") as f:
        f.write("\n" + json.dumps(line) + "\n")  # a blank line does not count as a record but keeps its number
    lineno = len(path.read_text().splitlines())
    result = _build_nlvr2(tmp_path, tmp_path / "nlvr")
    assert result.exit_code == 1
    assert f"{split}.json:{lineno}: {message}" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_nlvr2_hidden_test_lines_may_be_unlabelled(tmp_path):
    lines = write_nlvr_clone(tmp_path / "nlvr")
    hidden = [{k: v for k, v in r.items() if k != "label"} for r in lines["test2"]]  # the pre-2022 hidden set
    _jsonl(tmp_path / "nlvr" / "nlvr2" / "data" / "test2.json", hidden)
    result = _build_nlvr2(tmp_path, tmp_path / "nlvr")
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "out" / "finetune" / "nlvr2_test2.parquet").to_pylist()
    assert [r["label"] for r in rows] == [-1, -1]


def test_the_synthetic_world_is_the_same_for_a_seed_and_read_by_the_builder(tmp_path):
    """`lxm.demo.world` (the quickstart's world): the same files, byte for byte, for one seed, in the formats `lxm
    build-corpus` reads: two captions and three VQA questions per image, the first half of val2014 minival."""
    from lxm.demo.world import make_world

    sizes = dict(train_images=4, val_images=4, nlvr2_pairs=4, image_size=64)
    counts = make_world(tmp_path / "a", **sizes)
    make_world(tmp_path / "b", **sizes)
    assert counts == {"train2014": 4, "val2014": 4, "nlvr2_train": 4, "nlvr2_dev": 4, "nlvr2_test1": 4}
    files = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert files == {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert len([f for f in files if f.parts[0] == "images"]) == 4 + 4 + 2 * 12  # NLVR2: two images a pair
    raw = tmp_path / "a" / "raw"
    result = CliRunner().invoke(app, ["build-corpus", "--out", str(tmp_path / "corpus"), "--coco", str(raw / "coco"),
                                      "--vqa", str(raw / "vqa"), "--nlvr2", str(raw / "nlvr2"),
                                      "--minival-ids", str(raw / "minival.json"), "--vqa-min-questions", "1"])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "corpus" / "stats.json").read_text())
    assert stats["sources"]["mscoco"] == {"images": 8, "sentences": 16}
    assert stats["sources"]["vqa"] == {"images": 8, "sentences": 24}
    assert stats["lxmert_splits"]["minival"] == {"images": 2, "sentences": 10}
    finetune = tmp_path / "corpus" / "finetune"
    assert pq.read_table(finetune / "vqa_minival.parquet").num_rows == 6
    assert [pq.read_table(finetune / f"nlvr2_{s}.parquet").num_rows for s in ("train", "dev", "test1")] == [4, 4, 4]
