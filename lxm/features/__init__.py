"""Region features between the stages: the per-image record, the Arrow feature store, TSV and HDF5 interop.

What `lxm extract` writes and the corpus builder, pretraining and finetuning read (airsplay/lxmert reads the same
records from `*_obj36.tsv` with `src/utils.py` `load_obj_tsv`). Imports numpy, pyarrow and h5py only: neither the
detector nor torch.
"""

from lxm.features.backbone import BackboneInfo, store_backbone, stores_backbone
from lxm.features.records import FIELDS, NO_LABEL, ImageFeatures, RecordError
from lxm.features.store import FeatureStore, FeatureStoreWriter, StoreError

__all__ = ["FIELDS", "NO_LABEL", "ImageFeatures", "RecordError", "FeatureStore", "FeatureStoreWriter", "StoreError",
           "BackboneInfo", "store_backbone", "stores_backbone"]
