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
    from dist_dpo.speed import attention

    assert attention.kernel_reason(0, torch.bfloat16, head_dim) is None


def test_grouped_kv_heads_run_as_they_are_and_match_the_expansion():
    """Qwen2.5's 12 query / 2 K/V heads at a real size: the grouped kernel (torch 2.11: the flash op directly) gives
    the expanded heads' output and gradients, and the probe picked it."""
    from dist_dpo.speed import attention

    assert attention.kernel_reason(0, torch.bfloat16, 128) is None
    modes = attention.gqa_modes()
    print(f"\ngrouped K/V heads: {modes} -> {attention.gqa_mode()}")
    assert attention.gqa_mode() == modes[0] and attention.native_gqa()
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [(300, 500, 420), (120, 900, 77)]  # (prompt, chosen, rejected) per pair, packed in one row
    cu_q, cu_k, index, start = [0], [0], [], 0
    for p, c, r in lengths:
        index += list(range(start, start + p + c)) + list(range(start, start + p)) + list(
            range(start + p + c, start + p + c + r))
        cu_q += [cu_q[-1] + p + c, cu_q[-1] + p + c + r]
        cu_k += [cu_k[-1] + p + c, cu_k[-1] + p + c + p + r]
        start += p + c + r
    varlen = attention.Varlen(torch.tensor(cu_q, dtype=torch.int32).cuda(), torch.tensor(cu_k, dtype=torch.int32).cuda(),
                              torch.tensor(index).cuda(), max(p + c for p, c, _ in lengths),
                              max(p + r for p, _, r in lengths))
    q = torch.randn(start, 12, 128, generator=gen).cuda().bfloat16().requires_grad_()
    kv = torch.randn(2, start, 2, 128, generator=gen).cuda().bfloat16().requires_grad_()
    got = {}
    for mode in (modes[0], "expand", "reference"):
        qm, kvm = (q, kv) if mode != "reference" else (q.detach().float().requires_grad_(),
                                                        kv.detach().float().requires_grad_())
        k, v = kvm[0][varlen.kv_index], kvm[1][varlen.kv_index]
        out = attention.reference(qm, k, v, varlen, 128 ** -0.5) if mode == "reference" else \
            attention.flash_varlen(qm, k, v, varlen, 128 ** -0.5, gqa=mode)
        got[mode] = (out, *torch.autograd.grad(out.float().square().sum(), (qm, kvm)))
    errors = {mode: [round(((a.float() - b).abs().max() / b.abs().max()).item(), 5)
                     for a, b in zip(got[mode], got["reference"])] for mode in (modes[0], "expand")}
    print(f"relative error vs fp32 sdpa (out, dq, dkv): {errors}")
    # bf16 flash vs fp32: dK is a small difference of large terms at ~1,000 keys (seen 2026-11-28: 22 % of the largest
    # K/V gradient, the same for both modes); grouped heads must be no worse than the expansion the matrix ran
    assert max(errors[modes[0]][:2]) < 0.03
    assert all(a <= b * 1.1 + 0.005 for a, b in zip(errors[modes[0]], errors["expand"]))


def test_packed_and_masked_rows_give_trls_loss_on_gpu(pairs):  # noqa: F811
    plain = build(pairs, cuda=True)
    rows = [plain.train_dataset[i] for i in range(6)]
    ref_loss, ref_grads, _ = step(plain, rows)
    for packed, logging in (("auto", True), ("auto", False), (False, True)):  # not logged: speed/logprob.py's head
        fast = build(pairs, fast=True, prefix_sharing=True, cuda=True, packed_rows=packed)
        assert fast.data_collator.packed is (packed == "auto"), fast.speed.report
        loss, grads, batch = step(fast, rows, logging=logging)
        assert (getattr(batch.get("speed_rows"), "varlen", None) is not None) is (packed == "auto")
        worst = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
        print(f"\npacked_rows={packed} logging step {logging}: loss {loss.item():.6f} vs trl {ref_loss.item():.6f} "
              f"(diff {abs(loss.item() - ref_loss.item()):.2e}); LoRA grads max relative diff {worst:.3g}")
        assert abs(loss.item() - ref_loss.item()) < 2e-3  # bf16 weights: log-prob sums differ in the last bits
        assert worst < 0.1


def test_compiled_layers_give_trls_loss_with_packed_rows_on_gpu(pairs, monkeypatch):  # noqa: F811
    """speed/compiled.py with inductor on the GPU path: packed rows (the variable-length kernel inside the compiled
    layer), bf16; steps of other lengths reuse the graphs instead of compiling again."""
    monkeypatch.setenv("DIST_DPO_AB_COMPILE", "layers")
    plain = build(pairs, cuda=True)
    rows = [plain.train_dataset[i] for i in range(6)]
    ref_loss, ref_grads, _ = step(plain, rows)
    fast = build(pairs, fast=True, prefix_sharing=True, cuda=True)
    assert "decoder layers" in fast.speed.report and "q/k/v" not in fast.speed.report, fast.speed.report
    loss, grads, batch = step(fast, rows)
    assert batch["speed_rows"].varlen is not None  # packed rows ran through the compiled layers
    worst = max(((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for n, g in ref_grads.items())
    print(f"\ncompiled layers: loss {loss.item():.6f} vs trl {ref_loss.item():.6f}; LoRA grads max relative diff "
          f"{worst:.3g}")
    assert abs(loss.item() - ref_loss.item()) < 2e-3 and worst < 0.1
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for other in (rows[:5], rows[1:], rows[2:]):  # other packed lengths
        step(fast, other)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_head_gradient_in_forward_matches_trls_kernel_at_a_real_size():
    """speed/logprob.py's triton fold vs trl's ChunkedLogProbFunction, Qwen2.5-1.5B's head (151,936 x 1,536, bf16)
    over 5,000 tokens (two token tiles, five vocabulary chunks), both against fp32 log_softmax. Prints each kernel's
    forward + backward time (informative: the benchmark's headrecompute row is the measurement)."""
    from trl.kernels import ChunkedLogProbFunction

    from dist_dpo.speed import logprob

    gen = torch.Generator(device="cpu").manual_seed(0)
    n, d, vocab = 5000, 1536, 151936
    hidden = (torch.randn(n, d, generator=gen) * 0.5).cuda().bfloat16().requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * 0.05).cuda().bfloat16()
    targets = torch.randint(0, vocab, (n,), generator=gen).cuda()
    upstream = torch.randn(n, generator=gen).cuda()

    def ours():
        return logprob.log_probs(hidden, weight, targets, 32768)

    def trls():
        return ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",))[0]

    results, times = {}, {}
    for name, fn in (("ours", ours), ("trl", trls)):
        for _ in range(2):  # the first: triton compiles
            out = fn()
            (grad,) = torch.autograd.grad(out, hidden, upstream)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            out = fn()
            (grad,) = torch.autograd.grad(out, hidden, upstream)
        end.record()
        torch.cuda.synchronize()
        results[name], times[name] = (out, grad), start.elapsed_time(end) / 5
    h = hidden.detach().float().requires_grad_()
    exact = torch.cat([torch.log_softmax(c @ weight.float().T, -1).gather(1, t[:, None]).squeeze(1)
                       for c, t in zip(h.split(1000), targets.split(1000))])
    (grad_exact,) = torch.autograd.grad(exact, h, upstream)
    err = {name: ((out - exact).abs().max().item(),
                  ((grad.float() - grad_exact).abs().max() / grad_exact.abs().max()).item())
           for name, (out, grad) in results.items()}
    print(f"\nhead fwd+bwd ms: {times}; max |logp - fp32|, grad error / max grad: {err}")
    # both fold the same bf16 logits tile (|logit| ~ 4 here: ~0.01 of rounding), so they must agree with each other
    assert err["ours"][0] < 0.05 and err["ours"][0] <= err["trl"][0] * 1.5 + 1e-4
    assert err["ours"][1] < 0.02 and err["ours"][1] <= err["trl"][1] * 1.5 + 1e-4
