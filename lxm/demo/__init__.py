"""`lxm quickstart`'s library: a synthetic world in the real raw-file formats, and the report of a quickstart folder.

No counterpart in airsplay/lxmert, which starts from the released features. As open_clip ships its
`SyntheticDataset` beside the real loaders, lxm ships a world small enough to run the whole chain on a laptop:

- `world`: images of coloured shapes and their COCO captions / VQA v2 / NLVR2 annotation files (the formats
  `lxm build-corpus` and the official evaluators read), and a WordPiece vocabulary trained on their text. Imports
  no torch and nothing else of lxm, so the tests' worlds build on it;
- `report`: report.md of a quickstart folder, with the metrics read from the files the commands wrote there (the
  runs' logs and summaries, the predictions, the kept stdout of `lxm evaluate` and `lxm ask --json`).

The stages themselves are the program's (`lxm.cli.quickstart`). This module imports nothing, so `lxm.demo.world`
imports without the training stack.
"""
