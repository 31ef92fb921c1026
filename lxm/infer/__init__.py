"""`lxm ask`'s library: raw images (or stored features) + a question or statement -> the task model's answer.

The steps are those of finetuning and `lxm predict`, on inputs that are not in a corpus: region features from the
detector exactly as `lxm extract` computes them (`lxm.infer.detect`), the text encoded and collated as the finetuning
dataset does (`encode_example`, `collate_finetune`), the task's logits ranked by the task (`FinetuneTask.top`).
So a question about an image gets the answer `lxm predict` gives it once the image is extracted and the question is
in a corpus table. The model sources are in `lxm.infer.models`, the attention picture in `lxm.infer.explain`.

Typed records at the boundary: a `Request` (text, its field, image references, where it came from) in, a `Reply`
(the request, its `Prediction`, the image records it used) out. `answer_requests` answers many in batches and runs
the feature source once per distinct image (a record is kept only while a later request still needs it).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lxm.features.records import ImageFeatures
from lxm.infer.models import Answerer, AskError, Prediction, load_answerer
from lxm.jsonl import read_json_lines

__all__ = ["AskError", "Answerer", "ImageRef", "Prediction", "Reply", "Request", "answer_requests", "load_answerer",
           "read_requests", "reply_json"]


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: its file (the detector's input, and what --explain draws on) and/or its img_id in
    the feature stores (--features)."""

    path: str | None = None
    image_id: str | None = None


@dataclass
class Request:
    """One question (answer tasks) or statement (NLVR2, classification) about one or two images."""

    text: str
    field: str  # "question" or "statement"
    images: tuple[ImageRef, ...]
    where: str  # what errors name: "q.jsonl:3", or "command line"
    fields: dict[str, Any] = field(default_factory=dict)  # the input fields, echoed in the output
    line: int = 0  # its line in a JSONL file (0: not from a file)


@dataclass
class Reply:
    request: Request
    prediction: Prediction
    records: list[ImageFeatures]  # the features the model read, one per image


class FeatureSource(Protocol):
    """`lxm.infer.detect.Detector` (keys: image paths) or `StoredFeatures` (keys: img_ids)."""

    def records(self, keys: Sequence[str]) -> list[ImageFeatures]: ...

    def describe(self) -> str: ...


def _key(ref: ImageRef, stored: bool, where: str) -> str:
    key = ref.image_id if stored else ref.path
    if key is None:
        raise AskError(f"{where}: field {'image_id' if stored else 'image'!r}: missing (with --features the images "
                       f"are named by img_id, else by their file)")
    return key


def answer_requests(answerer: Answerer, requests: Sequence[Request], source: FeatureSource, *, stored: bool = False,
                    k: int = 5, batch_size: int = 32, explain: bool = False, explain_method: str = "relevance",
                    on_progress: Callable[[int, int], None] | None = None) -> Iterator[Reply]:
    """Answer `requests` in order, `batch_size` at a time; the source computes each distinct image once.

    Args:
        stored: the source is a feature store (images named by `ImageRef.image_id`), else a detector (by path).
        k: predictions kept per request.
        explain: also return each request's box weights (`Prediction.attention`) by `explain_method`: "relevance"
            (with the words' shares, `Prediction.words`) or "attention" (`lxm.infer.explain`).
        on_progress: called as (requests answered, total) after each batch.
    """
    for req in requests:
        answerer.check_request(req.field, len(req.images), req.where)
    keys = [[_key(ref, stored, req.where) for ref in req.images] for req in requests]
    left = Counter(key for ks in keys for key in ks)  # requests still to come per image: its record is kept so long
    cache: dict[str, ImageFeatures] = {}
    done = 0
    for start in range(0, len(requests), batch_size):
        batch, batch_keys = requests[start:start + batch_size], keys[start:start + batch_size]
        new = list(dict.fromkeys(key for ks in batch_keys for key in ks if key not in cache))
        if new:
            cache.update(zip(new, source.records(new)))
        images = [[cache[key] for key in ks] for ks in batch_keys]
        preds = answerer.predict([r.text for r in batch], images, k, explain=explain, method=explain_method)
        for req, ks, recs, pred in zip(batch, batch_keys, images, preds):
            yield Reply(req, pred, recs)
            for key in ks:
                left[key] -= 1
                if left[key] == 0:
                    cache.pop(key, None)
        done += len(batch)
        if on_progress is not None:
            on_progress(done, len(requests))


def reply_json(answerer: Answerer, reply: Reply) -> dict[str, Any]:
    """The prediction as `lxm ask --json` prints it: {"answers": [{"answer", "score"}, ...]} for an answer task,
    {"label": bool, "score"} for NLVR2, {"label": str, "score", "labels": [{"label", "score"}, ...]} for a
    classification task (score = the model's probability of that prediction)."""
    top = reply.prediction.top
    if answerer.output == "answers":
        return {"answers": [{"answer": a, "score": round(p, 6)} for a, p in top]}
    if answerer.output == "boolean":
        return {"label": top[0][0] == "True", "score": round(top[0][1], 6)}
    return {"label": top[0][0], "score": round(top[0][1], 6),
            "labels": [{"label": a, "score": round(p, 6)} for a, p in top]}


# ---------------------------------------------------------------------------------------------------- JSONL input


def _strings(value: Any, name: str, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise AskError(f"{where}: field {name!r}: expected a string or a list of strings (one per image), got "
                       f"{json.dumps(value)[:80]}")
    return items


def read_requests(path: str | os.PathLike, lines: Iterable[str] | None = None) -> list[Request]:
    """The requests of a JSONL file: per line {"image": path or [left, right], "question" | "statement": text},
    optionally "image_id" (an img_id or a pair, with --features); other fields are echoed in the output. Relative
    image paths are relative to the file's folder; `lines` (one str per line) are read instead of the file's.
    A bad line is an AskError "FILE:LINE: field ...: ..." (or "FILE:LINE: not JSON (...)")."""
    path = Path(path)
    out = []
    for n, rec in read_json_lines(path, lines=lines, objects=True, error=AskError):
        where = f"{path}:{n}"
        texts = [f for f in ("question", "statement") if f in rec]
        if len(texts) != 1:
            raise AskError(f"{where}: field 'question' (or 'statement'): "
                           + ("missing" if not texts else "give one of the two, not both"))
        text = rec[texts[0]]
        if not isinstance(text, str) or not text.strip():
            raise AskError(f"{where}: field {texts[0]!r}: expected a non-empty string")
        paths = _strings(rec["image"], "image", where) if "image" in rec else None
        ids = _strings(rec["image_id"], "image_id", where) if "image_id" in rec else None
        if paths is None and ids is None:
            raise AskError(f"{where}: field 'image': missing")
        if paths is not None and ids is not None and len(paths) != len(ids):
            raise AskError(f"{where}: field 'image_id': {len(ids)} ids for {len(paths)} images")
        count = len(paths if paths is not None else ids)
        resolved = [str(p if Path(p).is_absolute() else path.parent / p) for p in paths] if paths else [None] * count
        refs = tuple(ImageRef(p, i) for p, i in zip(resolved, ids or [None] * count))
        out.append(Request(text, texts[0], refs, where, rec, n))
    if not out:
        raise AskError(f"{path}: no requests (expected one JSON object per line)")
    return out
