"""Issue 28 item 4: same seed, same machine, same thread count — two fresh processes compute bit-identical losses
and gradients for one pretraining step, in fp32 and in bf16 (the `Bf16Replica` copy), with lxm's CPU kernels on and
off (`benchmarks/determinism.py`, `LXM_CPU_KERNELS` in its children).

The full check runs at base size, batch 16: 16 x 36 = 576 box rows, above the 512 rows from which the deleted timed
row split (`lxm.model.matmul`) could compute a product as two halves, with the 30522-word tied decoder, K = 768 /
3072 products and dropout everywhere. It takes minutes on a 2-core machine, so it is in the `slow` tier
(`python -m pytest -q -m slow tests/test_determinism.py`); the default tier checks the digests themselves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lxm.model import LOSS_NAMES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "determinism.py"


def _step_digests():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from determinism import step_digests

    return step_digests


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_step_digest_covers_every_loss_and_gradient_and_follows_the_seed(precision):
    step_digests = _step_digests()
    a = step_digests("tiny", 4, 0, precision, None)
    other = step_digests("tiny", 4, 1, precision, None)
    assert other["digest"] != a["digest"]
    assert set(other["tensors"]) == set(a["tensors"])
    # every pretraining loss and a gradient for every parameter of the model (the tied word table once)
    assert {n for n in a["tensors"] if n.startswith("loss.")} == {f"loss.{k}" for k in LOSS_NAMES}
    assert set(a["losses"]) == set(LOSS_NAMES)
    assert "grad.lxmert.embeddings.word_embeddings.weight" in a["tensors"]
    assert "grad.cls.predictions.decoder.weight" not in a["tensors"]  # tied: the same Parameter as the word table
    assert "grad.lxmert.encoder.x_layers.0.visual_attention.att.query.weight" in a["tensors"]


@pytest.mark.slow
def test_two_fresh_processes_give_bit_identical_base_steps_with_cpu_kernels_on_and_off():
    digests = {}
    for kernels in ("on", "off"):
        result = subprocess.run([sys.executable, str(SCRIPT), "--config", "base", "--batch", "16", "--threads", "2",
                                 "--cpu-kernels", kernels], capture_output=True, text=True, timeout=1800, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        out = result.stdout
        for precision in ("fp32", "bf16"):
            line = re.search(rf"^{precision} identical=(\w+) digest (\w+) / (\w+), cpu kernels (\w+),", out,
                             re.MULTILINE)
            assert line, out
            assert line[1] == "true", line[0]
            assert line[4] == kernels  # the children's models ran the path LXM_CPU_KERNELS asked for
            digests[precision, kernels] = line[2]
        assert out.strip().splitlines()[-1] == "identical=true"
    # the two paths draw dropout differently: the switch reached the children and the digests see the difference
    assert digests["fp32", "on"] != digests["fp32", "off"]
    assert digests["bf16", "on"] != digests["bf16", "off"]
