"""`lxm ask`: raw image(s) + a question or statement -> the finetuned model's answer (thin wrapper over `lxm.infer`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from lxm.cli.common import (EXPLAIN_METHOD_HELP, USER_ERRORS, DetectorPreset, Engine, ExplainMethod, SelectMode, err,
                            fail, parse_timm_args, progress)
from lxm.errors import ConfigError

DETECTOR_WEIGHTS_NEEDED = ("--detector-weights W is required (the Faster R-CNN weights, as lxm extract --weights), or "
                           "--features STORE --image-id ID for stored features, or --random-detector for a smoke test")


def _answer_line(answerer, reply) -> str:
    name, prob = reply.prediction.top[0]
    return f"{name} ({prob:.2f})"


def _print_reply(answerer, reply, model: str, detector: str) -> None:
    req = reply.request
    typer.echo(f"{'Q' if req.field == 'question' else 'S'}: {req.text}")
    if answerer.output in ("answers", "label"):  # --top answers / labels, as --json gives them
        width = max(len(a) for a, _ in reply.prediction.top)
        for answer, prob in reply.prediction.top:
            typer.echo(f"  {answer:<{width}}  {prob:.4f}")
    else:
        typer.echo(f"  {reply.prediction.top[0][0]}  {reply.prediction.top[0][1]:.4f}")
    typer.echo(f"model: {model}")
    typer.echo(f"detector: {detector}")


def _warn(message: str) -> None:
    err.print(f"warning: {message}", highlight=False, markup=False)


def _text_warnings(answerer, requests, most: int = 5) -> None:
    """Say what the model will not read of the requests' texts (cut at max_length, all [UNK]); at most `most`."""
    notes = [f"{req.where}: {note}" for req in requests for note in answerer.text_warnings(req.text)]
    for note in notes[:most]:
        _warn(note)
    if len(notes) > most:
        _warn(f"... and {len(notes) - most} more such warnings")


def ask_cmd(
    model: str = typer.Option(..., "--model", help="A finetuning run (lxm finetune --out), an original fine-tuned "
                                                   "BEST.pth (with --answers), or a transformers LXMERT QA directory "
                                                   "or Hub id (unc-nlp/lxmert-vqa-uncased, with --answers)."),
    image: list[Path] = typer.Option(None, "--image", help="Image file; twice for NLVR2 (left, right)."),
    question: str = typer.Option(None, "--question", help="The question (VQA / GQA models)."),
    statement: str = typer.Option(None, "--statement", help="The statement (NLVR2, classification models)."),
    questions: Path = typer.Option(None, "--questions", help="JSONL, one request per line: {\"image\": path or "
                                                             "[left, right], \"question\" | \"statement\": text} "
                                                             "(+ \"image_id\" with --features); relative paths are "
                                                             "relative to the file. Answers one JSON line each."),
    out: Path = typer.Option(None, "--out", help="With --questions: write the JSONL answers here (default stdout)."),
    top: int = typer.Option(5, "--top", min=1, help="Answers (answer tasks) / labels (classification) shown."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: {\"answers\": [{\"answer\", \"score\"}], "
                                                       "\"model\", \"detector\"} ({\"label\": bool, \"score\"} for "
                                                       "NLVR2)."),
    answers: Path = typer.Option(None, "--answers", help="Answer table of a checkpoint's answer head (JSON list, "
                                                         "e.g. trainval_label2ans.json); a run has its own."),
    vocab: str = typer.Option(None, "--vocab", help="WordPiece vocabulary (default: the run's, else "
                                                    "bert-base-uncased)."),
    task: str = typer.Option(None, "--task", help="Task of a checkpoint's head: vqa (default), gqa, qa or classify "
                                                  "for an answer head, nlvr2 for a pair head."),
    detector_weights: str = typer.Option(None, "--detector-weights", help="Detector weights, as lxm extract "
                                                                          "--weights (faster_rcnn_from_caffe_attr.pkl,"
                                                                          " a URL or Hub id)."),
    random_detector: bool = typer.Option(False, "--random-detector", help="Random detector weights (meaningless "
                                                                          "features; for smoke tests; said in the "
                                                                          "output)."),
    detector: DetectorPreset = typer.Option(DetectorPreset.vg_r101, "--detector",
                                            help="Network: the BUTD ResNet-101 detector, or 'tiny' (tests)."),
    engine: Engine = typer.Option(Engine.auto, "--engine", help="As lxm extract: auto, torch or detectron2."),
    mode: SelectMode = typer.Option(SelectMode.lxmert, "--mode", help="Box selection, as lxm extract."),
    boxes: int = typer.Option(36, "--boxes", min=1, help="Boxes per image (the model was trained with 36)."),
    seed: int = typer.Option(0, "--seed", help="Seed of --random-detector (lxm extract --weights random --seed)."),
    features: list[Path] = typer.Option(None, "--features", help="Feature store(s) to read instead of running the "
                                                                 "detector (with --image-id)."),
    image_id: list[str] = typer.Option(None, "--image-id", help="img_id in --features; twice for NLVR2."),
    device: str = typer.Option("auto", "--device", help="auto (this machine's GPU when CUDA is available, else the "
                                                        "CPU), cpu, cuda or cuda:N (an error without CUDA)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Requests per model call (--questions)."),
    explain: Path = typer.Option(None, "--explain", help="Write a PNG: the image(s) shaded by each box's share of "
                                                         "the relevance for the answer (--explain-method), the top "
                                                         "boxes labelled, the question (its words shaded the same "
                                                         "way) and the answer on top."),
    explain_method: ExplainMethod = typer.Option(ExplainMethod.relevance, "--explain-method",
                                                 help=EXPLAIN_METHOD_HELP),
    explain_dir: Path = typer.Option(None, "--explain-dir", help="With --questions: one such PNG per line "
                                                                 "(LINE.png; its path added to the line's answer)."),
    vocab_dir: Path = typer.Option(None, "--vocab-dir", help="Folder with objects_vocab.txt and "
                                                             "attributes_vocab.txt, for the box labels of --explain "
                                                             "(default: ids)."),
    explain_boxes: int = typer.Option(5, "--explain-boxes", min=1, help="Boxes labelled per image in --explain."),
    backbone: str = typer.Option(None, "--backbone", help="Visual backbone, as lxm extract --backbone: butd (the "
                                                          "detector's regions), grid or timm:MODEL. Default: the one "
                                                          "recorded in the run's feature stores, else butd."),
    backbone_weights: str = typer.Option(None, "--backbone-weights", help="timm: weights, as lxm extract "
                                                                          "(default: the run's stores' record)."),
    timm_arg: list[str] = typer.Option(None, "--timm-arg", help="timm: KEY=VALUE create_model overrides, as lxm "
                                                                "extract (default: the run's stores' record)."),
    grid: int = typer.Option(None, "--grid", min=1, help="grid: cells per side (default: the run's, else 8)."),
) -> None:
    """Answer a question (VQA / GQA) or judge a statement (NLVR2) about raw images with a finetuned model.

    Runs the detector on the image as lxm extract does (Caffe preprocessing, 36 boxes; --detector-weights, or
    --features STORE --image-id ID to reuse stored features), then the model, and prints the top answers with
    their probabilities (sigmoid of the answer head, as it was trained) or True/False with its probability.
    --questions FILE.jsonl answers many, in batches, the detector running once per distinct image. The detector
    must give the feature size the model reads (2048: --detector vg-r101; 128: --detector tiny, as the quickstart's
    models with random detector weights); that, the device, the outputs and the images are checked before it runs.

    --explain PNG shows which boxes and words the answer drew on. By default (--explain-method relevance) the
    relevance of Chefer et al. (ICCV 2021): the gradient of the answer's logit weights every self- and
    cross-attention map, and the maps are combined through the layers; each box's and each word's share of it is
    shown (boxes shaded, words highlighted in the title). --explain-method attention shows the attention of the
    [CLS] query over the boxes in the last cross-modality layer (mean over heads) instead, boxes only. The strongest
    boxes are outlined and labelled "attribute object weight".

    Example: lxm ask --model runs/vqa --image man.jpg --question "what is he holding?" --detector-weights frcnn.pkl
    """
    from lxm.atomic import atomic_path
    from lxm.devices import resolve_device
    from lxm.infer import ImageRef, Request, answer_requests, load_answerer, read_requests, reply_json
    from lxm.infer.detect import (Detector, StoredFeatures, check_image_file, detector_config, detectors_for,
                                  feature_dim, read_image)
    from lxm.extract.draw import detector_classes, read_names
    from lxm.infer.explain import render_attention, write_png
    from lxm.infer.outputs import check_output_dir, check_output_file

    single = question is not None or statement is not None
    given = question if question is not None else statement
    problems = [
        (questions is not None and single, "give either --questions FILE or one --question / --statement"),
        (questions is None and not single, "give --question (VQA / GQA), --statement (NLVR2) or --questions FILE"),
        (question is not None and statement is not None, "give --question or --statement, not both"),
        (out is not None and questions is None, "--out writes the answers of --questions"),
        (explain is not None and questions is not None, "--explain draws one request; with --questions use "
                                                        "--explain-dir"),
        (explain_dir is not None and questions is None, "--explain-dir is for --questions (one request: --explain)"),
        (bool(features) and (detector_weights is not None or random_detector),
         "--features reads stored features: no detector runs (leave out --detector-weights / --random-detector)"),
        (detector_weights is not None and random_detector, "give --detector-weights or --random-detector, not both"),
        (bool(image_id) and not features, "--image-id needs --features STORE (it names a record of a feature store)"),
        # a run's stores may name a timm backbone (no detector weights): that case is checked once it is read
        (not features and detector_weights is None and not random_detector
         and not (backbone or "").startswith("timm:")
         and not (backbone is None and (Path(model) / "config.yaml").is_file()),
         DETECTOR_WEIGHTS_NEEDED),
        (single and given is not None and not given.strip(),
         f"--{'question' if question is not None else 'statement'}: empty text (give the words to ask about)"),
        (single and features and not image_id, "--features needs --image-id (twice for NLVR2)"),
        (single and not features and not image, "--image IMG is required (twice for NLVR2)"),
        (single and image and image_id and len(image) != len(image_id), "one --image-id per --image"),
        ((explain is not None or explain_dir is not None) and features and single and not image,
         "--explain draws on the image: give --image too"),
    ]
    for bad, message in problems:
        if bad:
            fail(ConfigError(message))
    if questions is not None and questions.is_dir():
        fail(ConfigError(f"--questions {questions}: is a directory (give a JSONL file)"))
    if questions is not None and not questions.is_file():
        fail(ConfigError(f"{questions}: no such file"))
    drawing = explain is not None or explain_dir is not None
    try:
        # everything a user can get wrong is checked before the model loads and the detector runs (minutes with
        # the full detector): the outputs, the device, the requests and images, the feature size
        if explain is not None:
            check_output_file(explain, "--explain")
        if out is not None:
            check_output_file(out, "--out")
        if explain_dir is not None:
            check_output_dir(explain_dir, "--explain-dir")
        dev = resolve_device(device)
        if single:
            field = "question" if question is not None else "statement"
            count = len(image_id) if features else len(image)
            refs = tuple(ImageRef(str(image[i]) if image else None, image_id[i] if image_id else None)
                         for i in range(count))
            requests = [Request(given, field, refs, "command line", {field: given})]
        else:
            requests = read_requests(questions)
        if not features:
            for req in requests:
                for ref in req.images:
                    if ref.path is None:
                        fail(ConfigError(f"{req.where}: field 'image': missing"))
                    try:
                        check_image_file(ref.path)
                    except USER_ERRORS as exc:
                        fail(ConfigError(f"{req.where}: {exc}"))
        answerer = load_answerer(model, answers=answers, vocab=vocab, task=task).to(dev)
        for req in requests:  # before the detector loads: a wrong request fails at once
            answerer.check_request(req.field, len(req.images), req.where)
        _text_warnings(answerer, requests)
        if features:
            source = StoredFeatures([str(f) for f in features])
            for store, root in zip(source.stores, source.roots):
                answerer.check_features(store.feature_dim, f"--features {root}",
                                        "give a store extracted with the detector the model was trained on")
        else:
            chosen = backbone_choice(backbone, backbone_weights, grid, timm_arg, answerer.backbone(),
                                     detector.value)
            if (detector_weights is None and not random_detector
                    and not chosen["backbone"].startswith("timm:")):  # a run whose stores are the detector's
                fail(ConfigError(DETECTOR_WEIGHTS_NEEDED))
            if chosen["backbone"] != "butd":  # grid cells or timm patches, as the run's stores hold them
                if random_detector and chosen["backbone"].startswith("timm:") and chosen["backbone_weights"] is None:
                    chosen["backbone_weights"] = "random"
                from lxm.extract.backends import make_backend

                cfg = detector_config(detector_weights, engine="torch", device=str(dev), **{"seed": seed, **chosen})
                answerer.check_features(make_backend(cfg, cfg.backbone_config()).info.feature_dim,
                                        f"--backbone {chosen['backbone']}",
                                        "use the backbone of the model's features (lxm inspect STORE)")
                err.print(f"backbone: {chosen['backbone']}" + (" (the run's)" if backbone is None else ""),
                          highlight=False)
            else:
                dim = feature_dim(detector.value)
                fits = detectors_for(answerer.feature_dim)
                answerer.check_features(dim, f"--detector {detector.value}",
                                        f"use --detector {fits[0]}" if fits else
                                        "no detector preset gives that size; use --features with the model's features")
                cfg = detector_config(detector_weights, detector=detector.value, engine=engine.value,
                                      device=str(dev), num_boxes=boxes, mode=mode.value, seed=seed)
            source = Detector(cfg, on_weights=lambda line: err.print(line, highlight=False))
        if drawing:  # the names of the detector that made the features, or ids (another detector's: a warning)
            made_by = source.stores[0].manifest if features else cfg.detector_config()
            names = read_names(vocab_dir, detector_classes(made_by))
        else:
            names = (None, None)
        described = source.describe()  # says RANDOM weights where they are (the weights loader warns too)

        def picture(reply, path: Path) -> Path:
            req = reply.request
            if any(ref.path is None for ref in req.images):
                raise ConfigError(f"{req.where}: field 'image': missing (--explain-dir draws on the image files)")
            imgs = [read_image(ref.path) for ref in req.images]
            pred = reply.prediction
            pic = render_attention(imgs, reply.records, pred.attention, req.text,
                                   _answer_line(answerer, reply), kind="Q" if req.field == "question" else "S",
                                   objects=names[0], attributes=names[1], top=explain_boxes, method=pred.method,
                                   words=pred.words)
            return write_png(pic, path)

        if single:
            reply = next(answer_requests(answerer, requests, source, stored=bool(features), k=top,
                                         explain=drawing, explain_method=explain_method.value))
            if explain is not None:
                written = picture(reply, explain)
                err.print(f"wrote {written}", highlight=False)
            if as_json:
                typer.echo(json.dumps({**reply_json(answerer, reply), "model": model, "detector": described}))
            else:
                _print_reply(answerer, reply, answerer.describe(), described)
            return
        err.print(f"model: {answerer.describe()}; detector: {described}", highlight=False)

        def write_all(write) -> None:
            with progress("questions") as bar:
                bar_task = bar.add_task(f"ask {questions.name}", total=len(requests))
                replies = answer_requests(answerer, requests, source, stored=bool(features), k=top,
                                          batch_size=batch_size, explain=drawing,
                                          explain_method=explain_method.value,
                                          on_progress=lambda done, total: bar.update(bar_task, completed=done))
                for reply in replies:
                    rec = {**reply.request.fields, **reply_json(answerer, reply)}
                    if explain_dir is not None:
                        rec["explain"] = str(picture(reply, explain_dir / f"{reply.request.line}.png"))
                    write(json.dumps(rec))

        if out is None:
            write_all(typer.echo)
        else:
            with atomic_path(out) as tmp, open(tmp, "w") as handle:
                write_all(lambda line: handle.write(line + "\n"))
            err.print(f"wrote {len(requests)} answers to {out}", highlight=False)
    except USER_ERRORS as exc:
        fail(exc)


def backbone_choice(backbone: str | None, weights: str | None, grid: int | None, timm_arg: list[str] | None,
                    recorded, detector: str) -> dict:
    """`detector_config`'s backbone keywords for `lxm ask`: what the options name, the rest from the backbone
    `recorded` in the run's stores (a `BackboneInfo`, or None), else butd."""

    name = backbone
    if name is None and recorded is not None and recorded.name != "butd":
        name = f"timm:{recorded.model}" if recorded.name == "timm" else recorded.name
    if name is None or name == "butd":
        return {"backbone": "butd"}
    from_run = recorded is not None and backbone is None
    args = {**(recorded.model_args if from_run and recorded.model_args else {}), **parse_timm_args(timm_arg)}
    seed = {}
    if weights is None and from_run and name.startswith("timm:"):
        weights = recorded.weights
        if weights and (m := re.fullmatch(r"random\(seed=(\d+)\)", weights)):  # seeded random weights, as recorded
            weights, seed = "random", {"seed": int(m.group(1))}
    return {**seed, "backbone": name, "backbone_weights": weights, "timm_args": args or None,
            "grid": grid or (recorded.grid if from_run and recorded.grid else 8),
            "detector": recorded.detector if from_run and recorded.detector else detector}
