"""Pretraining and finetuning, clients of `lxm.model`, `lxm.features` and `lxm.eval`.

Reproduces airsplay/lxmert `src/pretrain/lxmert_pretrain.py` (`pretrain`) and `src/tasks/{vqa,gqa,nlvr2}.py`
(`finetune`): `config` (run configs), `data` / `finetune_data` (datasets and typed batches over the corpus and the
feature stores), `tasks` (one class per finetuning task), `run` (the run scaffold both recipes share: DDP, optimizer,
checkpoints, logs), `step` (the shared optimizer step and its micro-batches), `optim` (BertAdam) and `plot`
(`lxm plot`).
"""
