"""lxm: LXMERT (Tan & Bansal, EMNLP 2019) reproduced end to end.

Library packages (`lxm.model`, `lxm.corpus`, `lxm.extract`) import without the training stack; `lxm.train` and
`lxm.cli` are their clients.
"""

__version__ = "0.1.0"
