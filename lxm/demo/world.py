"""A synthetic world in the real raw-file formats: images of coloured shapes, their COCO captions, VQA v2 questions
and annotations, NLVR2 statements over image pairs, and a WordPiece vocabulary trained on that text.

The formats are those of the original files (../shared/reference/datasets.md), so the world goes through the same
commands as the real data: `lxm extract` reads the images, `lxm build-corpus` the annotation files, and the official
evaluators score against them. The text names what the image shows ("What color is the square?" - "red"), so a model
that reads the region features can learn it. Every random choice comes from one seeded generator, so a seed gives
the same files, byte for byte.

No torch and nothing else of lxm: numpy, and Pillow / tokenizers inside the functions that draw and train.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

_logger = logging.getLogger(__name__)

SHAPES = ["circle", "square", "triangle"]
COLORS = ["red", "green", "blue", "yellow"]
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
FIRST_VAL_ID = 1001  # image_id of the first val2014 image: a minival one, shown by `lxm show` and asked by `lxm ask`


def draw_shape(shape: str, color: str, size: int, rng: np.random.Generator):
    """A `size`-pixel square PIL image of one filled `shape` in `color` at a random place and scale."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.22, 0.34))
    cx, cy = (int(rng.integers(r + 4, size - r - 4)) for _ in range(2))
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=RGB[color])
    elif shape == "square":
        d.rectangle(box, fill=RGB[color])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=RGB[color])
    return img


def vqa_annotation(question_id: int, image_id: int, answer: str, question_type: str, answer_type: str,
                   answers: list[str] | None = None) -> dict:
    """One record of v2_mscoco_*_annotations.json: `answers` are the ten annotators' (default: all `answer`)."""
    answers = [answer] * 10 if answers is None else answers
    return {"question_type": question_type, "multiple_choice_answer": answer, "image_id": image_id,
            "answer_type": answer_type, "question_id": question_id,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def make_world(root: str | Path, train_images: int = 48, val_images: int = 16, nlvr2_pairs: int = 40,
               image_size: int = 128, seed: int = 0) -> dict[str, int]:
    """Write the world into `root`: images under root/images/{train2014,val2014,nlvr2}, raw files under
    root/raw/{coco,vqa,nlvr2} and root/raw/minival.json.

    COCO-style images (`train_images` in train2014, `val_images` in val2014, whose first half is minival) get two
    captions and three VQA questions each (colour, shape, "is there a ...?"); NLVR2 has `nlvr2_pairs` train pairs and
    a quarter as many (at least 4) in dev and in test1, each statement true of both images or of one. The VQA
    minival questions are also written alone (raw/vqa/minival_questions.json), as the evaluator's --questions file.
    Returns the counts: train2014, val2014 (images) and nlvr2_train, nlvr2_dev, nlvr2_test1 (pairs).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    for sub in ("images/train2014", "images/val2014", "images/nlvr2", "raw/coco", "raw/vqa", "raw/nlvr2"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    minival = []
    for split, n, first in (("train2014", train_images, 1), ("val2014", val_images, FIRST_VAL_ID)):
        images, captions, questions, annotations = [], [], [], []
        for k in range(n):
            image_id = first + k
            name = f"COCO_{split}_{image_id:012d}"
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
            draw_shape(shape, color, image_size, rng).save(root / "images" / split / f"{name}.jpg", quality=95)
            images.append({"id": image_id, "file_name": f"{name}.jpg", "width": image_size, "height": image_size})
            for c, text in enumerate((f"A {color} {shape}.", f"a {color} {shape} on a white background")):
                captions.append({"image_id": image_id, "id": image_id * 10 + c, "caption": text})
            probe = SHAPES[int(rng.integers(len(SHAPES)))]
            for q, (text, answer, qtype, atype) in enumerate((
                    (f"What color is the {shape}?", color, "what color is the", "other"),
                    ("What shape is this?", shape, "what", "other"),
                    (f"Is there a {probe}?", "yes" if probe == shape else "no", "is there a", "yes/no"))):
                qid = image_id * 10 + q
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                annotations.append(vqa_annotation(qid, image_id, answer, qtype, atype))
            if split == "val2014" and k < n // 2:
                minival.append({"img_id": name, "sentf": {}})
        (raw / "coco" / f"captions_{split}.json").write_text(json.dumps(
            {"info": {}, "licenses": [], "images": images, "annotations": captions}))
        (raw / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": questions}))
        (raw / "vqa" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
        counts[split] = n
    (raw / "minival.json").write_text(json.dumps(minival))
    for split, n in (("train", nlvr2_pairs), ("dev", max(4, nlvr2_pairs // 4)), ("test1", max(4, nlvr2_pairs // 4))):
        lines = []
        for p in range(n):
            shape, color = SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))]
            true = bool(rng.random() < 0.5)
            shown = [(shape, color), (shape, color)]
            if not true:
                other = SHAPES[(SHAPES.index(shape) + int(rng.integers(1, len(SHAPES)))) % len(SHAPES)]
                shown[int(rng.integers(2))] = (other, COLORS[int(rng.integers(len(COLORS)))])
            stem = f"{split}-{p}-0"
            for k, (s, c) in enumerate(shown):
                draw_shape(s, c, image_size, rng).save(root / "images" / "nlvr2" / f"{stem}-img{k}.png")
            lines.append(json.dumps({"identifier": f"{stem}-0", "sentence": f"Both images show a {color} {shape}.",
                                     "label": "True" if true else "False", "left_url": "", "right_url": "",
                                     "writer": "quickstart", "synset": shape, "query": shape,
                                     "validation": {}, "extra_validations": {}}))
        (raw / "nlvr2" / f"{split}.json").write_text("\n".join(lines) + "\n")
        counts[f"nlvr2_{split}"] = n
    val_q = json.loads((raw / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    mini_ids = {int(m["img_id"].rsplit("_", 1)[1]) for m in minival}
    (raw / "vqa" / "minival_questions.json").write_text(json.dumps(
        {"questions": [q for q in val_q if q["image_id"] in mini_ids]}))
    _logger.debug("synthetic world in %s: %s", root, counts)
    return counts


def train_vocab(root: str | Path) -> Path:
    """A small WordPiece vocabulary trained on the text of root/raw (lxmert.md §11.6), written to
    root/vocab/vocab.txt; [PAD] first, as BERT's, so its id is 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    root = Path(root)
    texts = [path.read_text() for path in (root / "raw").rglob("*.json")]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(texts, trainer=trainer)
    out = root / "vocab"
    out.mkdir(exist_ok=True)
    tok.model.save(str(out))
    return out / "vocab.txt"
