"""lxm: LXMERT (Tan & Bansal, EMNLP 2019) reproduced end to end.

Library packages, from the bottom up: `lxm.model` (the model, losses, checkpoints, tokenizer), `lxm.features` (the
per-image record and the feature store), `lxm.extract` (region features from images), `lxm.corpus` (the corpus
builder), `lxm.eval` (the official metrics and file formats, no torch) and `lxm.train` (pretraining, finetuning).
They import without the training stack where they can and never import `lxm.cli`, the program (README "Layout").
"""

__version__ = "0.1.0"
