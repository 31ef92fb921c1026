"""The aggregated LXMERT pretraining corpus and finetuning sets. Not implemented yet (issue 4)."""
