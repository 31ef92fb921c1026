"""The aggregated LXMERT pretraining corpus and the VQA / GQA / NLVR2 finetuning sets, built from the raw files.

Reproduces the data preparation of airsplay/lxmert (`data/lxmert/*.json`, `src/pretrain/qa_answer_table.py`,
`src/tasks/{vqa,gqa,nlvr2}_data.py`): `build` (`lxm build-corpus`), `layout` (the directory it writes and its
readers, what the trainers and `lxm.infer` read), `answers` (answer normalisation and tables) and
`jsonstream` (element-at-a-time reading of the huge VG / GQA files). Imports no torch.
"""
