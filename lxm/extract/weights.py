"""Detector weights: the airsplay detectron2 pickle or the transformers copy, loaded strictly and safely.

Sources (detector spec §3): `faster_rcnn_from_caffe_attr.pkl` (a pickle of `{"model": {name: ndarray}}` with
detectron2 names, from airsplay/py-bottom-up-attention) or `unc-nlp/frcnn-vg-finetuned/pytorch_model.bin` (a torch
state dict of the transformers research-project FRCNN, same names). A path, an http(s) URL (downloaded with resume
and an optional sha256 check) or a Hub id; `random` gives seeded random weights for tests and demos.

Pickles are read with a restricted unpickler that admits only dicts, strings, numbers and numpy arrays; torch files
with `weights_only=True`. Every load compares keys and shapes with the network and fails on any gap (fvcore, which
the original fork used, silently skips mis-shaped tensors); cell anchors stored in the file (transformers' copy keeps
them) must equal the generated ones.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lxm.errors import LxmError
from lxm.extract.detector import GeneralizedRCNN
from lxm.integrity import sha256_file

_logger = logging.getLogger(__name__)

RANDOM = "random"
# Keys some copies carry that are not parameters of the network: BatchNorm step counters.
IGNORED_SUFFIXES = ("num_batches_tracked",)
# The cell anchors transformers' FRCNN keeps in its state dict (an nn.ParameterList). Not parameters, but the RPN's
# deltas only mean something relative to the anchors it was trained with, so they are compared, not skipped.
ANCHOR_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
ANCHOR_TOLERANCE = 1e-3  # px: float rounding of detectron2's formula passes; any other anchor definition does not


class WeightsError(LxmError, ValueError):
    """Weights could not be read, are unsafe, or do not match the detector; the message names file and keys."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits the classes that plain dicts of numpy arrays need, nothing that could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise WeightsError(f"refusing to unpickle {module}.{name}: detector pickles may only hold dicts, strings, "
                           f"numbers and numpy arrays")


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable pickle ({exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected {{'model': {{name: array}}}}, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise WeightsError(f"{path}: entry {key!r} is {type(value).__name__}, not a numpy array")
        if value.dtype.kind not in "biuf":  # object / string arrays unpickle fine but are no weights
            raise WeightsError(f"{path}: entry {key!r} is a numpy array of dtype {value.dtype}, not numbers")
        out[str(key)] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def load_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: refusing to load: needs arbitrary unpickling ({str(exc).splitlines()[0]})") \
            from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable torch file ({exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return obj


def download(url: str, dest: Path, sha256: str | None = None, *, chunk: int = 1 << 20,
             on_bytes: Callable[[int, int], None] | None = None) -> Path:
    """Download `url` to `dest`, resuming a previous partial download (`dest.part`), then check sha256.

    `on_bytes(done, total)` is called after each chunk with the bytes of `dest` so far and its size (0 when the
    server does not say), e.g. for a progress bar; the start and the end of the download are logged.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    _logger.info("downloading %s to %s%s", url, dest, f" (resuming after {have} bytes)" if have else "")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            if have and resp.status != 206:  # server ignored the range: start over
                have = 0
            total = have + int(resp.headers.get("Content-Length") or 0)
            with part.open("ab" if have else "wb") as f:
                done = have
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if on_bytes is not None:
                        on_bytes(done, total)
    except OSError as exc:
        raise WeightsError(f"{url}: download failed ({exc}); a partial file is kept at {part} and the next run "
                           f"resumes it") from None
    if sha256 is not None:
        got = sha256_file(part)
        if got != sha256:
            part.unlink()
            raise WeightsError(f"{url}: sha256 mismatch (expected {sha256}, got {got}); the download was removed")
    os.replace(part, dest)
    _logger.info("downloaded %s (%.1f MiB)", dest, dest.stat().st_size / 2**20)
    return dest


def resolve_weights(source: str, cache_dir: Path | None = None, sha256: str | None = None, *,
                    on_bytes: Callable[[int, int], None] | None = None) -> Path:
    """A local path, an http(s) URL (cached download; `on_bytes` as in `download`) or a Hub id (`pytorch_model.bin`)
    -> local file."""
    if source.startswith(("http://", "https://")):
        cache = cache_dir or Path(os.environ.get("LXM_CACHE", Path.home() / ".cache" / "lxm"))
        return download(source, cache / Path(source.split("?")[0]).name, sha256, on_bytes=on_bytes)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if path.suffix in (".pkl", ".pth", ".bin", ".pt") or source.startswith((".", "/", "~")):
        raise WeightsError(f"{source}: no such file")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=source, filename="pytorch_model.bin"))
    except Exception as exc:
        raise WeightsError(f"could not fetch '{source}' from the Hugging Face Hub ({type(exc).__name__}). Offline, "
                           f"download faster_rcnn_from_caffe_attr.pkl or pytorch_model.bin elsewhere and pass its "
                           f"path with --weights") from None


@dataclass
class WeightsReport:
    source: str
    sha256: str
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # non-parameter entries that were compared with the detector

    def summary(self) -> str:
        extra = f"; ignored {len(self.ignored)} non-parameter entries" if self.ignored else ""
        extra += f"; {', '.join(self.checked)} equal the detector's" if self.checked else ""
        return f"detector: loaded {self.loaded} tensors from {self.source} (sha256 {self.sha256[:12]}...){extra}"


def _anchor_difference(stored: torch.Tensor, generated: torch.Tensor) -> str | None:
    """None if `stored` are the generated cell anchors [A, 4] (to ANCHOR_TOLERANCE), else what differs."""
    if tuple(stored.shape) != tuple(generated.shape):
        return f"file {tuple(stored.shape)} vs generated {tuple(generated.shape)}"
    stored, generated = stored.detach().cpu().double(), generated.detach().cpu().double()
    diff = (stored - generated).abs().amax(dim=1)
    worst = int(diff.argmax()) if diff.numel() else 0
    if diff.numel() == 0 or bool(diff[worst] <= ANCHOR_TOLERANCE):  # written so that NaN is a difference
        return None
    file_row, generated_row = ([round(v, 2) for v in t[worst].tolist()] for t in (stored, generated))
    return f"by up to {float(diff[worst]):.4g} px (anchor {worst}: file {file_row} vs generated {generated_row})"


def load_detector_weights(model: GeneralizedRCNN, source: str, *, sha256: str | None = None, seed: int = 0,
                          on_bytes: Callable[[int, int], None] | None = None) -> WeightsReport:
    """Fill `model` from `source` (strict key/shape check) or with seeded random weights for `random`.

    `on_bytes(done, total)` follows the download when `source` is a URL (see `download`).
    """
    if source == RANDOM:
        model.init_random(seed)
        _logger.warning("detector weights are RANDOM (seed %d): features are meaningless", seed)
        return WeightsReport(source=f"random(seed={seed})", sha256="random", loaded=len(model.state_dict()))
    path = resolve_weights(source, sha256=sha256, on_bytes=on_bytes)
    sd = load_pickle_weights(path) if path.suffix == ".pkl" else load_torch_weights(path)
    digest = sha256_file(path)
    target = model.state_dict()
    report = WeightsReport(source=str(path), sha256=digest)
    missing = [k for k in target if k not in sd]
    unexpected, mismatched, anchors = [], [], []
    for key, value in sd.items():
        if key in target:
            if tuple(value.shape) != tuple(target[key].shape):
                mismatched.append(f"{key} file {tuple(value.shape)} vs model {tuple(target[key].shape)}")
        elif key == ANCHOR_KEY:
            problem = _anchor_difference(value, model.proposal_generator.cell_anchors)
            if problem:
                anchors.append(f"{key} {problem}")
            else:
                report.checked.append(key)
        elif key.endswith(IGNORED_SUFFIXES):
            report.ignored.append(key)
        else:
            unexpected.append(key)
    if missing or unexpected or mismatched or anchors:
        parts = [f"{title} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                 for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched),
                                     ("anchors differ", anchors))
                 if keys]
        raise WeightsError(f"{path}: weights do not match the detector: " + "; ".join(parts))
    with torch.no_grad():
        for key, value in target.items():
            value.copy_(sd[key].to(value.dtype))
    report.loaded = len(target)
    return report


def save_pickle_weights(model: GeneralizedRCNN, path: Path) -> None:
    """Write weights in the airsplay pickle layout ({"model": {name: float32 ndarray}}) — for tests and exchange."""
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    pickle.dump({"model": sd, "__author__": "lxm"}, buf, protocol=4)
    path.write_bytes(buf.getvalue())
