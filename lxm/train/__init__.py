"""Pretraining and finetuning loops, clients of lxm.model. Not implemented yet (issues 5 and 6)."""
