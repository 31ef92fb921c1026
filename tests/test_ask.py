"""`lxm ask`: raw images + text -> the answer `lxm predict` gives, from the three model sources; the attention
picture; one-line errors for bad input.

The world: four real COCO images (the butd-coco-sample fixture) extracted by `lxm extract` with the tiny
random-weight detector into a float32 store, small VQA / GQA / NLVR2 tables over them, and tiny models finetuned
from scratch through the CLI (seconds each). `lxm ask` runs the same detector on the image files itself.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import BERT_VOCAB, FIXTURE, tiny_fixture_store
from typer.testing import CliRunner

from lxm.cli import app
from lxm.corpus.build import GQA_SCHEMA, NLVR2_SCHEMA, VQA_SCHEMA
from lxm.features.store import FeatureStore
from lxm.infer import ImageRef, Request, answer_requests, load_answerer
from lxm.infer.detect import Detector, StoredFeatures, detector_config
from lxm.extract.draw import read_names
from lxm.infer.explain import cls_to_boxes, render_attention
from lxm.model import LxmertForFinetuning, LxmertForPreTraining, lxmert_tiny, save_hf, save_lxm, save_original
from lxm.model.weights import read_checkpoint
from lxm.infer.runs import load_run, predict_top
from lxm.train.finetune_data import FinetuneDataset, collate_finetune, encode_example

pytestmark = pytest.mark.e2e  # whole recipes through the lxm CLI (README: Tests)

STEMS = ["COCO_train2014_000000084002", "COCO_train2014_000000131486", "COCO_train2014_000000132417",
         "COCO_train2014_000000201446"]
ANSWERS = ["red", "blue", "dog", "cat", "two", "yes"]
QUESTIONS = ["what is in the picture?", "what color is it?", "how many are there?"]
DETECT = ["--detector", "tiny", "--engine", "torch", "--random-detector"]
runner = CliRunner()


def _invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def _finetune(root: Path, task: str, valid: str, *extra) -> Path:
    out = root / f"run_{task}"
    data = ["--corpus", root / "corpus"] if not extra else []
    result = _invoke(["finetune", task, "--config", "tiny", "--set", "from_scratch=true",
                      "--set", f"vocab={BERT_VOCAB}", *data, "--features", root / "store", "--out", out,
                      "--set", "train_splits=train", "--set", f"valid_split={valid}", "--set", "batch_size=4",
                      "--set", "epochs=1", *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask")
    tiny_fixture_store(root, STEMS)
    rng = np.random.default_rng(0)
    vqa, qid = [], 0
    for stem in STEMS:
        for q in QUESTIONS:
            qid += 1
            vqa.append(dict(question_id=qid, img_id=stem, sent=q, label=[(ANSWERS[int(rng.integers(6))], 1.0)],
                            answer_type="other", question_type="what"))
    pairs = [dict(identifier=f"dev-{i}-0-{k}", img0=STEMS[i], img1=STEMS[(i + 1) % 4], label=(i + k) % 2, sent=s,
                  uid=f"nlvr2_{i}_{k}") for i in range(4) for k, s in enumerate(["there are two dogs", "a red car"])]
    gqa = [dict(question_id=f"g{r['question_id']}", img_id=r["img_id"], sent=r["sent"], label=r["label"]) for r in vqa]
    ft = root / "corpus" / "finetune"
    ft.mkdir(parents=True)
    (root / "corpus" / "vocab").mkdir()
    for split in ("train", "minival"):
        pq.write_table(pa.Table.from_pylist(vqa, schema=VQA_SCHEMA), ft / f"vqa_{split}.parquet")
    for split in ("train", "dev"):
        pq.write_table(pa.Table.from_pylist(pairs, schema=NLVR2_SCHEMA), ft / f"nlvr2_{split}.parquet")
    for split in ("train", "testdev"):
        pq.write_table(pa.Table.from_pylist(gqa, schema=GQA_SCHEMA), ft / f"gqa_{split}.parquet")
    for task in ("vqa", "gqa"):
        (root / "corpus" / "vocab" / f"{task}_answers.json").write_text(json.dumps(ANSWERS))
    classify = root / "classify.jsonl"  # lxm finetune classify's own files: one example per line
    classify.write_text("".join(json.dumps({"id": i, "img_id": r["img_id"], "text": r["sent"], "label": "abc"[i % 3]})
                                + "\n" for i, r in enumerate(vqa)))
    return {"root": root, "vqa": vqa, "pairs": pairs, "vqa_run": _finetune(root, "vqa", "minival"),
            "nlvr2_run": _finetune(root, "nlvr2", "dev"), "gqa_run": _finetune(root, "gqa", "testdev"),
            "classify_run": _finetune(root, "classify", "valid", "--train", classify, "--valid", classify),
            "classify": classify}


def _image(world, stem: str) -> Path:
    return world["root"] / "images" / f"{stem}.jpg"


def _ask(*args) -> dict:
    result = _invoke(["ask", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _predict_top(world, task: str, split: str) -> dict:
    _, task_obj, model = load_run(world[f"{task}_run"], task)
    data = FinetuneDataset(task_obj, world["root"] / "corpus", [split], [world["root"] / "store"], BERT_VOCAB)
    return predict_top(task_obj, model, data, k=5)


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------- answers


def test_ask_gives_lxm_predicts_answer_from_the_image_and_from_stored_features(world, tmp_path):
    result = _invoke(["predict", "vqa", "--checkpoint", world["vqa_run"], "--split", "minival",
                      "--out", tmp_path / "minival.json"])
    assert result.exit_code == 0, result.output
    predicted = {r["question_id"]: r["answer"] for r in json.loads((tmp_path / "minival.json").read_text())}
    top = _predict_top(world, "vqa", "minival")
    for row in world["vqa"][::4]:  # every image, every question
        raw = _ask("--model", world["vqa_run"], "--image", _image(world, row["img_id"]), "--question", row["sent"],
                   *DETECT)
        assert set(raw) == {"answers", "model", "detector"}
        assert "RANDOM" in raw["detector"] and raw["model"] == str(world["vqa_run"])
        assert raw["answers"][0]["answer"] == predicted[row["question_id"]]
        assert [a["answer"] for a in raw["answers"]] == [a for a, _ in top[row["question_id"]]]
        assert [a["score"] for a in raw["answers"]] == pytest.approx([p for _, p in top[row["question_id"]]],
                                                                     abs=1e-5)
        stored = _ask("--model", world["vqa_run"], "--features", world["root"] / "store", "--image-id",
                      row["img_id"], "--question", row["sent"])
        assert stored["answers"] == raw["answers"]
        assert "stored features" in stored["detector"] and "RANDOM" in stored["detector"]
    text = _invoke(["ask", "--model", world["vqa_run"], "--image", _image(world, STEMS[0]), "--question",
                    QUESTIONS[0], *DETECT, "--top", "3"])
    assert text.exit_code == 0, text.output
    assert text.stdout.startswith(f"Q: {QUESTIONS[0]}\n") and "RANDOM" in text.stdout
    assert len([line for line in text.stdout.splitlines() if line.startswith("  ")]) == 3


def test_in_memory_features_equal_what_lxm_extract_stores(world):
    det = Detector(detector_config(None, detector="tiny", engine="torch"))
    store = FeatureStore(world["root"] / "store")
    for rec in det.records([_image(world, s) for s in STEMS[:2]]):
        stored = store.get(rec.img_id)
        assert rec.features.dtype == np.float32
        for name in ("img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features"):
            np.testing.assert_array_equal(getattr(rec, name), getattr(stored, name), err_msg=name)


def test_nlvr2_statement_gives_predicts_label(world, tmp_path):
    result = _invoke(["predict", "nlvr2", "--checkpoint", world["nlvr2_run"], "--split", "dev",
                      "--out", tmp_path / "dev.csv"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "dev.csv") as f:
        predicted = {row[0]: row[1] for row in csv.reader(f)}
    top = _predict_top(world, "nlvr2", "dev")
    for pair in world["pairs"][1:3]:
        got = _ask("--model", world["nlvr2_run"], "--image", _image(world, pair["img0"]), "--image",
                   _image(world, pair["img1"]), "--statement", pair["sent"], *DETECT)
        assert set(got) == {"label", "score", "model", "detector"}
        assert got["label"] is (predicted[pair["identifier"]] == "True")
        assert got["score"] == pytest.approx(top[pair["identifier"]][0][1], abs=1e-5)


def test_a_classification_model_judges_a_statement_as_predict_does(world):
    _, task, model = load_run(world["classify_run"], "classify")
    data = FinetuneDataset(task, None, ["valid"], [world["root"] / "store"], BERT_VOCAB)
    top = predict_top(task, model, data, k=5)
    for i in (0, 4):
        got = _ask("--model", world["classify_run"], "--image", _image(world, data.images[i][0]), "--statement",
                   data.texts[i], *DETECT)
        assert set(got) == {"label", "score", "labels", "model", "detector"}
        assert (got["label"], got["score"]) == (top[data.ids[i]][0][0], pytest.approx(top[data.ids[i]][0][1], abs=1e-5))
        assert [x["label"] for x in got["labels"]] == [a for a, _ in top[data.ids[i]]]
    result = _invoke(["ask", "--model", world["classify_run"], "--image", _image(world, STEMS[0]), "--question",
                      "what?", *DETECT])
    _one_line_error(result, "classify model", "--statement")


def test_questions_jsonl_equals_single_calls_and_detects_each_image_once(world, tmp_path):
    rows = [world["vqa"][i] for i in (0, 4, 1, 8, 5, 0)]  # images repeat, one request twice
    lines = [{"image": f"images/{r['img_id']}.jpg", "question": r["sent"], "qid": r["question_id"]} for r in rows]
    file = world["root"] / "q.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = _invoke(["ask", "--model", world["vqa_run"], "--questions", file, *DETECT, "--batch-size", "4",
                      "--out", tmp_path / "answers.jsonl"])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(out) == len(lines)
    answerer = load_answerer(world["vqa_run"])
    detector = Detector(detector_config(None, detector="tiny", engine="torch"))
    for line, got in zip(lines, out):
        assert {k: got[k] for k in line} == line  # input fields echoed
        # a single call: the one request of `lxm ask --image --question` (test_ask_gives_lxm_predicts_answer...)
        single = Request(line["question"], "question", (ImageRef(str(file.parent / line["image"])),), "single")
        top = next(answer_requests(answerer, [single], detector)).prediction.top
        assert [a["answer"] for a in got["answers"]] == [a for a, _ in top]
        # batched rows round differently in the last digits
        assert [a["score"] for a in got["answers"]] == pytest.approx([p for _, p in top], abs=1e-5)

    class Counting(Detector):
        def records(self, paths):
            calls.extend(paths)
            return super().records(paths)

    calls: list = []
    requests = [Request(r["sent"], "question", (ImageRef(str(_image(world, r["img_id"]))),), f"q:{i}")
                for i, r in enumerate(rows)]
    replies = list(answer_requests(answerer, requests, Counting(detector_config(None, detector="tiny",
                                                                                engine="torch")), batch_size=2))
    assert sorted(calls) == sorted({str(_image(world, r["img_id"])) for r in rows})
    assert [r.prediction.top[0][0] for r in replies] == [o["answers"][0]["answer"] for o in out]
    # to stdout, with a picture per line
    result = _invoke(["ask", "--model", world["vqa_run"], "--questions", file, *DETECT, "--explain-dir",
                      tmp_path / "pics"])
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    # the same answers; asking the model for its attentions writes the attention out (SDPA returns no
    # probabilities), so the scores may round differently in the last digits
    assert [[a["answer"] for a in p["answers"]] for p in printed] == [[a["answer"] for a in o["answers"]] for o in out]
    assert [a["score"] for p in printed for a in p["answers"]] == \
        pytest.approx([a["score"] for o in out for a in o["answers"]], abs=1e-5)
    assert [Path(p["explain"]).name for p in printed] == [f"{n}.png" for n in range(1, 7)]
    assert all(cv2.imread(p["explain"]) is not None for p in printed)


# ---------------------------------------------------------------------------------------------------- model sources


def _original_finetuned(model, path: Path) -> Path:
    """The key layout of airsplay/lxmert src/tasks/vqa_model.py's state_dict (what its BEST.pth holds)."""
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith("lxmert."):
            sd["lxrt_encoder.model.bert." + key[len("lxmert."):]] = value.clone()
        elif key.startswith("answer_head.logit_fc."):
            sd["logit_fc." + key[len("answer_head.logit_fc."):]] = value.clone()
    torch.save(sd, path)
    return path


def test_the_three_model_sources_answer_alike(world, tmp_path):
    run = world["vqa_run"]
    answers = run / "answers.json"
    _, _, trained = load_run(run)
    # An original BEST.pth holds no config: its heads are inferred as 64-d (every released model). The run's tiny
    # model has 8-d heads, so its tensors go into the one-head model such a file is read as, and every source must
    # answer as that model does in lxm's own format (which keeps its config).
    model = LxmertForFinetuning(trained.config.replace(num_attention_heads=1))
    model.load_state_dict(trained.state_dict())
    save_lxm(model, tmp_path / "lxm")
    best = _original_finetuned(model, tmp_path / "BEST.pth")
    assert read_checkpoint(best).format == "original-finetuned"
    # lxm's own writer of the original layout writes exactly that BEST.pth layout for a task model
    written = save_original(model, tmp_path / "orig_BEST.pth")
    assert read_checkpoint(written).format == "original-finetuned"
    ref, got = torch.load(best, weights_only=True), torch.load(written, weights_only=True)
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    save_hf(model, tmp_path / "hf")
    args = ["--image", _image(world, STEMS[1]), "--question", QUESTIONS[1], *DETECT]
    vocab = ["--vocab", BERT_VOCAB]
    reference = _ask("--model", tmp_path / "lxm", "--answers", answers, *vocab, *args)["answers"]
    for source in (best, written, tmp_path / "hf"):
        got = _ask("--model", source, "--answers", answers, *vocab, *args)
        assert got["answers"] == reference, source
    assert load_answerer(best, answers, BERT_VOCAB).kind == "original-finetuned checkpoint"
    # a transformers config naming every answer row needs no --answers
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["id2label"] = {str(i): a for i, a in enumerate(json.loads(answers.read_text()))}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert _ask("--model", tmp_path / "hf", *vocab, *args)["answers"] == reference


def test_bad_inputs_give_one_line_errors(world, tmp_path):
    run, image = world["vqa_run"], _image(world, STEMS[0])
    q = ["--question", QUESTIONS[0]]
    _one_line_error(_invoke(["ask", "--model", run, "--image", tmp_path / "nope.jpg", *q, *DETECT]),
                    "nope.jpg", "no such image")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    _one_line_error(_invoke(["ask", "--model", run, "--image", tmp_path / "broken.jpg", *q, *DETECT]),
                    "broken.jpg", "not a decodable image")
    save_lxm(LxmertForPreTraining(lxmert_tiny(vocab_size=30522, visual_feat_dim=128)), tmp_path / "pre")
    _one_line_error(_invoke(["ask", "--model", tmp_path / "pre", "--image", image, *q, *DETECT]),
                    "no task head", "lxm finetune")
    from lxm.train.config import load_config  # a pretraining run's directory: its config.yaml has no task

    (tmp_path / "prerun").mkdir()
    (tmp_path / "prerun" / "config.yaml").write_text(load_config("tiny", ["corpus=c", "features=[f]"]).to_yaml())
    _one_line_error(_invoke(["ask", "--model", tmp_path / "prerun", "--image", image, *q, *DETECT]),
                    "no task head")
    _one_line_error(_invoke(["ask", "--model", world["gqa_run"], "--image", image, "--statement", "a dog", *DETECT]),
                    "gqa model", "--question")
    _one_line_error(_invoke(["ask", "--model", world["nlvr2_run"], "--image", image, "--statement", "a dog",
                             *DETECT]), "2 image")
    (tmp_path / "short.json").write_text(json.dumps(ANSWERS[:4]))
    _, _, model = load_run(run)
    best = _original_finetuned(model, tmp_path / "BEST.pth")
    _one_line_error(_invoke(["ask", "--model", best, "--answers", tmp_path / "short.json", "--vocab", BERT_VOCAB,
                             "--image", image, *q, *DETECT]), "4 answers", "6 rows")
    _one_line_error(_invoke(["ask", "--model", best, "--vocab", BERT_VOCAB, "--image", image, *q, *DETECT]),
                    "--answers")
    _one_line_error(_invoke(["ask", "--model", run, "--image", image, *q]), "--detector-weights")
    _one_line_error(_invoke(["ask", "--model", run, "--features", world["root"] / "store", "--image-id", "nope",
                             *q]), "'nope'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": str(image), "question": QUESTIONS[0]}) + "\n" + json.dumps({"image": 3}))
    _one_line_error(_invoke(["ask", "--model", run, "--questions", bad, *DETECT]), f"{bad}:2: field 'question'")
    bad.write_text(json.dumps({"image": 3, "question": "q"}))
    _one_line_error(_invoke(["ask", "--model", run, "--questions", bad, *DETECT]), f"{bad}:1: field 'image'")


# ---------------------------------------------------------------------------------------------------- explain


def _batch(answerer, recs, texts):
    examples = [encode_example(i, t, [(r, r.normalized_boxes())], answerer.tokenizer)
                for i, (t, r) in enumerate(zip(texts, recs))]
    return collate_finetune(examples)


def test_explain_weights_are_the_models_cls_attention_over_the_boxes(world):
    """`--explain`'s weights are the model's own attention output (`output_attentions=True`, no hook in the
    library): per row the [CLS] query's softmax over the boxes in the last cross layer, q_[CLS] . k_n / sqrt(d)
    through that layer's own query / key projections of its inputs (kept here by a test-only pre-hook), averaged
    over the heads; each row sums to 1 and a box masked out by visual_attention_mask gets 0."""
    answerer = load_answerer(world["vqa_run"])
    model = answerer.model.eval()
    recs = StoredFeatures([world["root"] / "store"]).records(STEMS[:3])
    batch = _batch(answerer, recs, QUESTIONS)
    (b, t), n = batch.input_ids.shape, batch.visual_feats.shape[1]
    boxes = torch.ones(b, n, dtype=torch.long)
    boxes[1, n - 3:] = 0  # the second example's last three boxes are padding
    layer = model.lxmert.encoder.x_layers[-1]
    seen = {}
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.update(lang=args[0], visn=args[2]))
    try:
        with torch.no_grad():
            out = model(**batch.model_inputs(), visual_attention_mask=boxes, output_attentions=True)
    finally:
        handle.remove()
    weights = cls_to_boxes(out)
    att = layer.visual_attention.att
    with torch.no_grad():
        q = att.query(seen["lang"].reshape(b, t, -1)[:, 0])  # the [CLS] rows of the dense text layout
        k = att.key(seen["visn"])
    heads, d = att.num_heads, att.head_dim
    expected = torch.zeros(b, n)
    for i in range(b):
        for h in range(heads):
            scores = k[i, :, h * d:(h + 1) * d] @ q[i, h * d:(h + 1) * d] / d ** 0.5
            expected[i] += torch.softmax(scores.masked_fill(boxes[i] == 0, float("-inf")), dim=0) / heads
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(1), torch.ones(b))
    assert (weights[1, n - 3:] == 0).all() and (weights[1, :n - 3] > 0).all() and (weights[[0, 2]] > 0).all()
    # what `Answerer.predict(explain=True)` returns (every box real): these weights, per image, and the answers it
    # gives without them
    with torch.no_grad():
        plain = model(**batch.model_inputs(), output_attentions=True)
    explained = answerer.predict(QUESTIONS, [[r] for r in recs], explain=True, method="attention")
    for pred, row in zip(explained, cls_to_boxes(plain)):
        assert len(pred.attention) == 1
        np.testing.assert_array_equal(pred.attention[0], row.numpy())
    assert [p.top[0][0] for p in explained] == [p.top[0][0] for p in answerer.predict(QUESTIONS, [[r] for r in recs])]


def test_cls_to_boxes_needs_the_attentions(world):
    answerer = load_answerer(world["vqa_run"])
    recs = StoredFeatures([world["root"] / "store"]).records(STEMS[:1])
    with torch.no_grad():
        out = answerer.model.eval()(**_batch(answerer, recs, QUESTIONS[:1]).model_inputs())
    with pytest.raises(ValueError, match="output_attentions=True"):
        cls_to_boxes(out)


def _no_overlap(labels):
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            ra, rb = a.rect, b.rect
            assert not (ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]), (a, b)


def test_explain_draws_a_readable_attention_picture(world, tmp_path):
    image = _image(world, STEMS[2])
    png = tmp_path / "explain.png"
    got = _ask("--model", world["vqa_run"], "--image", image, "--question", QUESTIONS[0], *DETECT,
               "--explain", png, "--vocab-dir", FIXTURE / "vocab")
    pic = cv2.imread(str(png))
    assert pic is not None and max(pic.shape[:2]) >= 800
    # the library's drawing of the same request: label rectangles inside the picture, never overlapping
    answerer = load_answerer(world["vqa_run"])
    rec = StoredFeatures([world["root"] / "store"]).records([STEMS[2]])[0]
    reply = next(answer_requests(answerer, [Request(QUESTIONS[0], "question", (ImageRef(str(image)),), "t")],
                                 Detector(detector_config(None, detector="tiny", engine="torch")), explain=True))
    objects, attributes = read_names(FIXTURE / "vocab")
    answer = f"{got['answers'][0]['answer']} ({got['answers'][0]['score']:.2f})"
    # the default --explain-method: relevance, its words shaded in the title
    assert reply.prediction.method == "relevance" and [w for w, _ in reply.prediction.words] == QUESTIONS[0].split()
    drawing = render_attention([cv2.imread(str(image))], [rec], reply.prediction.attention, QUESTIONS[0], answer,
                               objects=objects, attributes=attributes, method="relevance",
                               words=reply.prediction.words)
    assert drawing.image.shape == pic.shape
    assert len(drawing.labels) == 5 and not drawing.unlabelled
    h, w = drawing.image.shape[:2]
    for label in drawing.labels:
        assert 0 <= label.rect[0] < label.rect[2] <= w and drawing.title_height <= label.rect[1] < label.rect[3] <= h
        assert label.text.split()[1] in objects
    _no_overlap(drawing.labels)
    weights = reply.prediction.attention[0]
    assert [lab.box for lab in drawing.labels] == [int(i) for i in np.argsort(-weights, kind="stable")[:5]]
    assert any(QUESTIONS[0] in line for line in drawing.title) and any(answer in line for line in drawing.title)
    # NLVR2: two images side by side, 5 labels each, a long statement wrapped
    recs = StoredFeatures([world["root"] / "store"]).records(STEMS[:2])
    long = "the left image shows more animals than the right image and all of them are standing on green grass"
    pair = render_attention([cv2.imread(str(_image(world, s))) for s in STEMS[:2]], recs,
                            [np.full(36, 1 / 36), np.linspace(1, 2, 36) / np.linspace(1, 2, 36).sum()], long,
                            "True (0.73)", kind="S")
    assert len(pair.panels) == 2 and pair.panels[0][2] < pair.panels[1][0]
    assert sum(1 for lab in pair.labels if lab.image == 1) == 5 and len(pair.title) >= 3
    _no_overlap(pair.labels)


def test_ask_explain_method_relevance_shades_the_boxes_and_the_words(world, tmp_path):
    """`lxm ask --explain PNG --explain-method relevance` (the default) writes the picture with the question's words
    on highlights in the title band (the word with the largest share on the full highlight colour); the attention
    picture of the same request has the same width and no highlight."""
    from lxm.infer.explain import WORD_COLOUR

    image = _image(world, STEMS[2])
    pics = {}
    for method in ("relevance", "attention"):
        png = tmp_path / f"{method}.png"
        got = _ask("--model", world["vqa_run"], "--image", image, "--question", QUESTIONS[0], *DETECT,
                   "--explain", png, "--explain-method", method)
        pics[method] = cv2.imread(str(png))
        assert pics[method] is not None and got["answers"]
    assert pics["relevance"].shape[1] == pics["attention"].shape[1]

    def highlighted(pic):  # pixels of the full highlight in the band's first line (the question)
        return int((np.abs(pic[:60].astype(int) - np.array(WORD_COLOUR)).sum(-1) == 0).sum())

    assert highlighted(pics["relevance"]) > 100 and highlighted(pics["attention"]) == 0
    assert not np.array_equal(pics["relevance"], pics["attention"])
    result = _invoke(["ask", "--model", world["vqa_run"], "--image", image, "--question", QUESTIONS[0], *DETECT,
                      "--explain", tmp_path / "x.png", "--explain-method", "gradcam"])
    assert result.exit_code == 2 and "gradcam" in result.output
