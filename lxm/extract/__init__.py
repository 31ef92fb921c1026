"""Region features from raw images: the bottom-up-attention Visual Genome Faster R-CNN and LXMERT's 36-box selection.

Reproduces airsplay/py-bottom-up-attention `demo/detectron2_mscoco_proposal_maxnms.py` and the released features'
rule (detector spec): `images` (Caffe preprocessing), `detector` (the torch engine), `engine_d2` (the same network
in detectron2), `weights` (checked loading of the released weights), `select` (the 36-box selection), `pipeline`
(`lxm extract`: folder -> feature store) and `show` (boxes drawn with their labels). The records it writes and the
store live in `lxm.features`.
"""
