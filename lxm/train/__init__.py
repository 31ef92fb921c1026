"""Pretraining and finetuning, clients of `lxm.model`, `lxm.features` and `lxm.eval`.

Reproduces airsplay/lxmert `src/pretrain/lxmert_pretrain.py` (`pretrain`) and `src/tasks/{vqa,gqa,nlvr2}.py`
(`finetune`): `config` (run configs), `data` / `finetune_data` (datasets over the corpus and the feature stores),
`loop` (the shared train step, DDP, checkpoints), `optim` (BertAdam) and `plot` (`lxm plot`).
"""
