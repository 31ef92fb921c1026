"""A finetuned model exported with its labels (issue 32 part 4): `lxm convert-checkpoint RUN DIR --to hf` writes the
run's answer table (VQA / GQA / qa) or classification labels as the config's `id2label` / `label2id`, and transformers
(the oracle) names the same answer lxm predicts; NLVR2's pair head, which transformers cannot hold, is refused.

The runs are tiny models finetuned from scratch through the CLI on the synthetic world (`synthetic.make_custom_world`).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BERT_VOCAB, make_inputs
from synthetic import make_custom_world
from typer.testing import CliRunner

from lxm.cli import app
from lxm.infer.runs import load_run
from lxm.model import LxmertForPreTraining, lxmert_tiny, save_lxm

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_labels")
    files = make_custom_world(root, train=8, valid=4)
    common = ["--config", "tiny", "--set", "from_scratch=true", "--set", f"vocab={BERT_VOCAB}", "--features",
              root / "ft_feats", "--set", "batch_size=4", "--set", "epochs=1"]
    corpus = ["--corpus", root / "ft_corpus", "--set", "train_splits=train"]
    out = {}
    for task, data in (("vqa", [*corpus, "--set", "valid_split=minival"]),
                       ("classify", ["--train", files["classify_train"], "--valid", files["classify_valid"]]),
                       ("nlvr2", [*corpus, "--set", "valid_split=dev"])):
        out[task] = root / f"run_{task}"
        result = _invoke("finetune", task, *common, *data, "--out", out[task])
        assert result.exit_code == 0, result.output
    return out


def _hf_logits(hf, x):
    with torch.no_grad():
        return hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"],
                  visual_feats=x["visual_feats"], visual_pos=x["visual_boxes"]).question_answering_score


@pytest.mark.e2e  # tiny finetuning runs through the lxm CLI
@pytest.mark.parametrize("task", ["vqa", "classify"])
def test_a_run_exported_to_hf_names_its_answers_in_transformers(runs, tmp_path, task):
    run = runs[task]
    result = _invoke("convert-checkpoint", run, tmp_path / "hf", "--to", "hf")
    assert result.exit_code == 0, result.output
    _, task_obj, model = load_run(run)
    names = task_obj.class_names
    assert names == json.loads((run / "answers.json").read_text())  # the run's table, in head-row order
    assert f"{len(names)} answer names as id2label" in result.output

    hf = transformers.LxmertForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_qa_labels == len(names) == hf.config.num_labels
    assert hf.config.id2label == dict(enumerate(names))
    assert hf.config.label2id == {a: i for i, a in enumerate(names)}

    x, _ = make_inputs(model.config, batch=6, boxes=4, seed=3)
    model.eval()
    with torch.no_grad():
        ours = task_obj.logits(model(**x))
    theirs = _hf_logits(hf, x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert [hf.config.id2label[i] for i in theirs.argmax(-1).tolist()] == task_obj.decode(ours)

    # lxm reads the names back from the exported directory (lxm ask's transformers source)
    from lxm.infer import load_answerer

    assert load_answerer(tmp_path / "hf", vocab=BERT_VOCAB).task.class_names == names


@pytest.mark.e2e
def test_nlvr2_pair_head_is_refused_for_hf_and_written_in_the_other_formats(runs, tmp_path):
    run = runs["nlvr2"]
    result = _invoke("convert-checkpoint", run, tmp_path / "hf", "--to", "hf")
    assert result.exit_code == 1 and "NLVR2 pair head" in result.output and "--to lxm" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "hf").exists()
    result = _invoke("convert-checkpoint", run, tmp_path / "lxm", "--to", "lxm")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lxm" / "model.safetensors").exists()


def test_answer_names_must_name_every_row_once(tmp_path):
    save_lxm(LxmertForPreTraining(lxmert_tiny(task_mask_lm=False, task_matched=False, task_obj_predict=False,
                                              num_qa_labels=3)), tmp_path / "m")
    (tmp_path / "short.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "twice.json").write_text(json.dumps(["a", "b", "a"]))
    (tmp_path / "ok.json").write_text(json.dumps({"yes": 0, "no": 1, "2": 2}))
    for table, needle in (("short.json", "2 answer names for an answer head of 3 rows"),
                          ("twice.json", "the answer 'a' names rows 0 and 2")):
        result = _invoke("convert-checkpoint", tmp_path / "m", tmp_path / "h", "--to", "hf",
                         "--answers", tmp_path / table)
        assert result.exit_code == 1 and needle in result.output, result.output
        assert not (tmp_path / "h").exists()
    result = _invoke("convert-checkpoint", tmp_path / "m", tmp_path / "h", "--to", "lxm", "--answers",
                     tmp_path / "ok.json")
    assert result.exit_code == 1 and "hf config" in result.output
    result = _invoke("convert-checkpoint", tmp_path / "m", tmp_path / "h", "--to", "hf", "--answers",
                     tmp_path / "ok.json")
    assert result.exit_code == 0, result.output
    assert transformers.LxmertForQuestionAnswering.from_pretrained(tmp_path / "h").config.id2label == \
        {0: "yes", 1: "no", 2: "2"}
