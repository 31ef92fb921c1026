"""The table of `benchmarks/gpu.sh`: reads the JSON files its steps wrote into DIR, prints one table, writes
DIR/gpu.json (everything, one file) and checks the issue's GPU targets (lxm >= 2x transformers samples/s at base
bf16, MFU >= 0.4, extraction >= 30 img/s), saying which are met. For each lxm step mode measured both ways it also
prints the plain path's time (the default on CUDA) beside the forced CPU-kernel path's (`LXM_CPU_KERNELS=1`) and
which is faster, one line each: `kernels <config> <precision>: plain <ms> ms, cpu kernels <ms> ms -> <faster>`.

    python benchmarks/gpu_report.py benchmarks/gpu-results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folder: str) -> None:
    root = Path(folder)
    step = json.loads((root / "model_step.json").read_text())
    trainer = json.loads((root / "trainer.json").read_text())
    parts = json.loads((root / "train_step_parts.json").read_text())
    extract = {k: json.loads((root / f"extract_{k}.json").read_text()) for k in ("fp32", "bf16")}
    rows = [("what", "setting", "figure")]
    for r in step["rows"]:
        rows.append(("model step", f"{r['config']} batch {r['batch']}, {r['label']}",
                     f"{r['ms']:.1f} ms, {r['samples_per_s']:.0f} samples/s, MFU {r['mfu']:.2f}, "
                     f"{r['peak_step_memory_mb']:.0f} MB"))
    for name, ms in parts["medians_ms"].items():
        rows.append(("optimizer step", f"{parts['config']} batch {parts['batch']} {parts['precision']}, {name}",
                     f"{sum(ms.values()):.1f} ms (optimizer {ms['optimizer']:.1f}, forward + backward "
                     f"{ms['forward_backward']:.1f})"))
    for w, rate in trainer["loader"].items():
        rows.append(("loader", f"{w} workers", f"{rate:.0f} samples/s"))
    rows.append(("trainer", f"{trainer['model']} {trainer['precision']}",
                 f"{trainer['trainer']:.1f} samples/s = {100 * trainer['trainer_vs_step']:.0f} % of the bare step "
                 f"({trainer['step']:.1f})"))
    for k, data in extract.items():
        for r in data["rows"]:
            rows.append(("extraction", f"{data['detector']} batch {r['batch']} {k}", f"{r['img_s']:.2f} img/s"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    checks = {}
    base = [r for r in step["rows"] if r["config"] == "base" and r["precision"].startswith("bf16")]
    if base:
        hf = max(r["samples_per_s"] for r in base if r["implementation"] == "transformers")
        lx = max(base, key=lambda r: r["samples_per_s"] if r["implementation"] == "lxm" else -1)
        checks["lxm_vs_transformers_base_bf16"] = (lx["samples_per_s"] / hf, 2.0)
        checks["mfu_base_bf16"] = (lx["mfu"], 0.4)
    checks["extraction_img_s"] = (max(r["img_s"] for d in extract.values() for r in d["rows"]), 30.0)
    for name, (value, target) in checks.items():
        print(f"{name}={value:.2f} (target >= {target}: {'met' if value >= target else 'NOT met'})")
    kernels = kernels_vs_plain(step["rows"])
    for k in kernels:
        print(f"kernels {k['config']} {k['precision']}: plain {k['plain_ms']:.1f} ms, cpu kernels "
              f"{k['cpu_kernels_ms']:.1f} ms -> {k['faster']} ({k['plain_ms'] / k['cpu_kernels_ms']:.2f}x)")
    (root / "gpu.json").write_text(json.dumps({"model_step": step, "train_step_parts": parts, "trainer": trainer,
                                               "extraction": extract, "kernels_vs_plain": kernels,
                                               "checks": {k: {"value": v, "target": t}
                                                          for k, (v, t) in checks.items()}}, indent=2) + "\n")
    print(f"wrote {root / 'gpu.json'}")


def kernels_vs_plain(step_rows: list[dict]) -> list[dict]:
    """The lxm step modes measured both with lxm's CPU kernels and on the plain path: both times, and the faster."""
    by = {(r["config"], r["precision"], r["compiled"], r["cpu_kernels"]): r for r in step_rows
          if r["implementation"] == "lxm"}
    out = []
    for (config, precision, compiled, kernels), r in by.items():
        plain = by.get((config, precision, compiled, False))
        if kernels and plain is not None:
            out.append({"config": config, "precision": precision + (" compiled" if compiled else ""),
                        "plain_ms": plain["ms"], "cpu_kernels_ms": r["ms"],
                        "faster": "plain" if plain["ms"] <= r["ms"] else "cpu kernels"})
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/gpu-results")
