"""Official evaluation: the VQA / GQA / NLVR2 metrics, readers of the official file formats, submission writers;
and the metrics and JSON lines readers of the custom QA / classification datasets of `lxm finetune qa|classify`.

Reproduces GT-Vision-Lab/VQA `vqaEval.py`, the GQA authors' `eval.py` and lil-lab/nlvr `nlvr2/eval/metrics.py`
(see `metrics` and `formats` for what each computes and every deliberate difference), and checks submission files
as the VQA / GQA / NLVR2 servers parse them (`submission`). Imports no torch, so a
notebook scores a file without the training stack::

    from lxm.eval import evaluate_vqa
    scores = evaluate_vqa("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                          "minival_predict.json")   # {"overall": ..., "perAnswerType": ..., "perQuestionType": ...}
"""

from lxm.eval.evaluate import evaluate_classify, evaluate_gqa, evaluate_nlvr2, evaluate_qa, evaluate_vqa
from lxm.eval.formats import (ClassifyRecord, QaRecord, classify_predictions, gqa_predictions, nlvr2_labels,
                              nlvr2_predictions, qa_predictions, read_classify_jsonl, read_json, read_qa_jsonl,
                              vqa_inputs, write_classify_predictions, write_gqa_predictions, write_nlvr2_predictions,
                              write_qa_predictions, write_vqa_predictions)
from lxm.eval.metrics import (MetricsInputError, PredictionError, classify_metrics, gqa_metrics, macro_f1,
                              nlvr2_metrics, qa_metrics, qa_question_score, vqa_accuracy, vqa_question_accuracy)
from lxm.eval.submission import (Problem, SubmissionError, SubmissionReport, check_submission,
                                 check_submission_ids, required_ids)

__all__ = [
    "evaluate_vqa", "evaluate_gqa", "evaluate_nlvr2", "evaluate_qa", "evaluate_classify",
    "read_json", "vqa_inputs", "gqa_predictions", "nlvr2_labels", "nlvr2_predictions", "write_vqa_predictions",
    "write_gqa_predictions", "write_nlvr2_predictions", "write_qa_predictions", "write_classify_predictions",
    "QaRecord", "ClassifyRecord", "read_qa_jsonl", "read_classify_jsonl", "qa_predictions", "classify_predictions",
    "MetricsInputError", "PredictionError", "vqa_accuracy", "vqa_question_accuracy", "gqa_metrics", "nlvr2_metrics",
    "qa_metrics", "qa_question_score", "classify_metrics", "macro_f1",
    "check_submission", "check_submission_ids", "required_ids", "SubmissionReport", "Problem", "SubmissionError",
]
