"""LXMERT model package: config, encoder, heads, pretraining and finetuning models, losses, checkpoint I/O, tokenizer.

Reproduces airsplay/lxmert `src/lxrt/modeling.py` (model), `src/lxrt/entry.py` (text input) and the pretraining
losses of `LXRTPretraining`; see each module's docstring. Imports only torch, numpy, safetensors and tokenizers.
"""

from lxm.model.config import LxmertConfig, lxmert_base, lxmert_small, lxmert_tiny, preset
from lxm.model.losses import (
    IGNORE_INDEX,
    LOSS_NAMES,
    PretrainLabels,
    PretrainLossConfig,
    feat_regression_loss,
    masked_lm_loss,
    match_loss,
    pair_loss,
    pretraining_losses,
    pretraining_step_losses,
    qa_loss,
    soft_answer_loss,
    weighted_box_ce,
)
from lxm.model.modeling import (LxmertForFinetuning, LxmertForPreTraining, LxmertModel, LxmertOutput, build_lxmert,
                                is_task_model)
from lxm.model.tokenizer import Encoding, LxmertTokenizer, TokenizerError
from lxm.model.weights import (
    CheckpointError,
    LoadReport,
    convert_checkpoint,
    load_pretrained,
    load_pretrained_with_report,
    save_hf,
    save_lxm,
    save_original,
)

__all__ = [
    "LxmertConfig", "lxmert_base", "lxmert_small", "lxmert_tiny", "preset",
    "LxmertForPreTraining", "LxmertForFinetuning", "LxmertModel", "LxmertOutput", "build_lxmert", "is_task_model",
    "IGNORE_INDEX", "LOSS_NAMES", "PretrainLabels", "PretrainLossConfig", "pretraining_losses", "pretraining_step_losses",
    "masked_lm_loss", "match_loss", "weighted_box_ce", "feat_regression_loss", "qa_loss",
    "soft_answer_loss", "pair_loss",
    "LxmertTokenizer", "Encoding", "TokenizerError",
    "CheckpointError", "LoadReport", "load_pretrained", "load_pretrained_with_report", "convert_checkpoint",
    "save_lxm", "save_hf", "save_original",
]
