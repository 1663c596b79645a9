"""The speed path on a GPU (marker `gpu`): flash attention's variable-length kernel passes dist-dpo's probe, and
packed rows, masked shared rows and plain trl give the same DPO loss and LoRA gradients on one batch (bf16, the
built-in tiny model). Run with -s to see the numbers:

    python3 -m pytest -q -s -m gpu tests/gpu/test_fast_path_gpu.py
"""

import pytest
import torch

from test_speed import build, pairs, step  # noqa: F401 - pairs is a fixture

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_kernel_passes_the_probe(head_dim):
    from dist_dpo.fast import attention

    assert attention.kernel_reason(0, torch.bfloat16, head_dim) is None


def test_packed_and_masked_rows_give_trls_loss_on_gpu(pairs):  # noqa: F811
    plain = build(pairs, cuda=True)
    rows = [plain.train_dataset[i] for i in range(6)]
    ref_loss, ref_grads, _ = step(plain, rows)
    for packed in ("auto", False):
        fast = build(pairs, fast=True, prefix_sharing=True, cuda=True, packed_rows=packed)
        assert fast.data_collator.packed is (packed == "auto"), fast._dd_speed_report
        loss, grads, batch = step(fast, rows)
        assert ("dd_varlen" in batch) is (packed == "auto")
        worst = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
        print(f"\npacked_rows={packed}: loss {loss.item():.6f} vs trl {ref_loss.item():.6f} "
              f"(diff {abs(loss.item() - ref_loss.item()):.2e}); LoRA grads max relative diff {worst:.3g}")
        assert abs(loss.item() - ref_loss.item()) < 2e-3  # bf16 weights: log-prob sums differ in the last bits
        assert worst < 0.1
