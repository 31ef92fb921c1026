"""Official evaluation: the VQA / GQA / NLVR2 metrics, readers of the official file formats, submission writers.

Reproduces GT-Vision-Lab/VQA `vqaEval.py`, the GQA authors' `eval.py` and lil-lab/nlvr `nlvr2/eval/metrics.py`
(see `metrics` and `formats` for what each computes and every deliberate difference). Imports no torch, so a
notebook scores a file without the training stack::

    from lxm.eval import evaluate_vqa
    scores = evaluate_vqa("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
                          "minival_predict.json")   # {"overall": ..., "perAnswerType": ..., "perQuestionType": ...}
"""

from lxm.eval.evaluate import evaluate_gqa, evaluate_nlvr2, evaluate_vqa
from lxm.eval.formats import (gqa_predictions, nlvr2_labels, nlvr2_predictions, prediction_file_name, read_json,
                              vqa_inputs, write_predictions)
from lxm.eval.metrics import (MetricsInputError, PredictionError, gqa_metrics, nlvr2_metrics, vqa_accuracy,
                              vqa_question_accuracy)

__all__ = [
    "evaluate_vqa", "evaluate_gqa", "evaluate_nlvr2",
    "read_json", "vqa_inputs", "gqa_predictions", "nlvr2_labels", "nlvr2_predictions", "write_predictions",
    "prediction_file_name",
    "MetricsInputError", "PredictionError", "vqa_accuracy", "vqa_question_accuracy", "gqa_metrics", "nlvr2_metrics",
]
