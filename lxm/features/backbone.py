"""Which visual backend made a feature store, read from its manifest (torch-free: what every later stage asks).

`lxm extract --backbone NAME` records the backend under the manifest's "backbone" key (`BackboneInfo.manifest`);
stores written before backends existed, and stores imported from LXMERT TSVs or HDF5 files, have no such key and
read as "butd" with labels (the VG detector's 36 regions: airsplay/lxmert `src/utils.py` `load_obj_tsv` rows).

Backends (issue 31; `lxm.extract.backends` runs them):

- "butd": the VG Faster R-CNN's selected regions, object/attribute labels (`boxes_file` set: the regions at boxes
  given per image, labels from the detector's classifier, a varying count per image);
- "grid": the same detector's res5 over the whole res4 map, average-pooled to grid x grid cells (Jiang et al. 2020,
  facebookresearch/grid-feats-vqa `extract_grid_feature.py`); no labels;
- "timm": a timm image model's last feature map or patch tokens; no labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

BACKBONES = ("butd", "grid", "timm")


@dataclass(frozen=True)
class BackboneInfo:
    """The backend of a store, as its manifest records it (N and D are the store's too)."""

    name: str  # "butd", "grid" or "timm"
    num_boxes: int  # N: the most boxes a record holds (each record's own count is its num_boxes)
    feature_dim: int  # D
    labels: bool  # records carry object/attribute labels (False: ids are NO_LABEL, confidences 0.0)
    weights: str | None = None  # what --weights / --backbone-weights named: path, URL, Hub id or "random"
    weights_sha256: str | None = None  # sha256 of the weights file read (None: random weights, or not recorded)
    detector: str | None = None  # "butd"/"grid": the detector preset ("vg-r101", "tiny")
    grid: int | None = None  # "grid": cells per side (N = grid * grid)
    model: str | None = None  # "timm": the timm model name (e.g. "vit_base_patch16_clip_224.openai")
    model_args: dict[str, Any] = field(default_factory=dict)  # "timm": create_model keyword overrides (tests)
    input_size: tuple[int, int] | None = None  # "timm": (height, width) the model sees after resize and crop
    boxes_file: str | None = None  # "butd" at given boxes: the JSONL file (absolute path) ...
    boxes_sha256: str | None = None  # ... and its sha256

    @property
    def given_boxes(self) -> bool:
        """Records hold the boxes of a file, a varying number per image (<= N)."""
        return self.boxes_file is not None

    def manifest(self) -> dict[str, Any]:
        """The JSON object written under the manifest's "backbone" key (None fields left out)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and v != {}}
        if self.input_size is not None:
            out["input_size"] = list(self.input_size)
        return out

    def summary(self) -> str:
        """One line, e.g. "timm vit_base_patch16_224 (random weights): 196 x 768, no labels"."""
        what = {"butd": f"butd {self.detector or 'vg-r101'}" + (" at given boxes" if self.given_boxes else ""),
                "grid": f"grid {self.grid}x{self.grid} of {self.detector or 'vg-r101'}",
                "timm": f"timm {self.model}"}.get(self.name, self.name)
        return (f"{what} ({self.weights or 'weights not recorded'}): up to {self.num_boxes} x {self.feature_dim}, "
                f"{'labels' if self.labels else 'no labels'}")


def store_backbone(manifest: Mapping[str, Any]) -> BackboneInfo:
    """The backend of the store whose manifest.json is `manifest` (`FeatureStore(...).manifest`).

    A manifest without "backbone" (older stores, TSV/HDF5 imports) reads as "butd" with labels, its weights from
    the extractor metadata. Raises ValueError naming the field when the key is there but malformed.
    """
    n, d = int(manifest["num_boxes"]), int(manifest["feature_dim"])
    entry = manifest.get("backbone")
    if entry is None:
        ext = manifest.get("extractor") or {}
        return BackboneInfo(name="butd", num_boxes=n, feature_dim=d, labels=True, weights=ext.get("weights"),
                            weights_sha256=ext.get("weights_sha256"))
    if not isinstance(entry, Mapping) or entry.get("name") not in BACKBONES:
        raise ValueError(f"manifest field 'backbone' must be an object whose 'name' is one of {', '.join(BACKBONES)},"
                         f" got {entry!r:.80}")
    known = set(BackboneInfo.__dataclass_fields__)
    values = {k: v for k, v in entry.items() if k in known}
    if values.get("input_size") is not None:
        values["input_size"] = tuple(values["input_size"])
    values.update(num_boxes=n, feature_dim=d, labels=bool(entry.get("labels", entry["name"] == "butd")))
    return BackboneInfo(**values)


IDENTITY = ("name", "detector", "grid", "model", "model_args", "boxes_sha256")  # what one store must not mix


def backbone_clash(manifest: Mapping[str, Any], backbone: Mapping[str, Any]) -> str | None:
    """Why a writer of `backbone` (a `BackboneInfo.manifest()` dict) must not add to the store of `manifest`, or None.

    Compares the fields that change what a record means (IDENTITY); weights are not compared (as before backends,
    a resumed run may name its weights file by another path)."""
    try:
        have = store_backbone(manifest).manifest()
    except (ValueError, KeyError, TypeError):
        return None  # a damaged manifest is rebuilt from the shards; the schema check still guards N and D
    for key in IDENTITY:
        if key == "detector" and (have.get(key) is None or backbone.get(key) is None):
            continue  # older butd stores did not record the preset name
        if have.get(key) != backbone.get(key):
            return (f"the store holds backbone {have.get('name')!r} with {key}={have.get(key)!r}; this run asks for "
                    f"{backbone.get('name')!r} with {key}={backbone.get(key)!r}")
    return None


def stores_backbone(stores) -> BackboneInfo:
    """The one backend of the stores a run reads together (`FeatureStore`s), N the largest of theirs; a ValueError
    naming two stores whose backends differ (a model cannot read regions from one and patches from another: the
    features mean different things even where their sizes agree). Given boxes and detected regions of the same
    detector mix (the same features at other boxes); so do stores of the same backend with other N."""
    infos = [(str(s.root), store_backbone(s.manifest)) for s in stores]
    (first_root, first), *rest = infos
    for root, info in rest:
        for key in (*(k for k in IDENTITY if k != "boxes_sha256"), "feature_dim", "labels"):
            a, b = getattr(first, key), getattr(info, key)
            if key == "detector" and (a is None or b is None):
                continue  # older butd stores did not record the preset name
            if a != b:
                raise ValueError(f"feature stores of different backbones in one run: {first_root} is "
                                 f"{first.summary()}; {root} is {info.summary()} ({key} {a!r} vs {b!r})")
    return replace(first, num_boxes=max(info.num_boxes for _, info in infos))
