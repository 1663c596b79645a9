"""The speed path's log-prob head under FSDP2, on CPU: 2 gloo ranks, an untied head sharded across them.

The head must see its whole weight (vocab x hidden, not this rank's half), run as the head module's own forward so
FSDP2's hooks unshard it (no group left for the root to force-complete: torch 2.11 warns "did not run forward
before backward" there), and give the log-probs and gradients of the unsharded model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from test_bad_inputs import base_env

SCRIPT = textwrap.dedent(r"""
    import copy, json, sys
    import torch, torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from dist_dpo.speed import head as head_mod

    dist.init_process_group("gloo")
    rank, grouping = dist.get_rank(), sys.argv[1]
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    lm = Qwen2ForCausalLM(cfg).float()
    lm.lm_head.weight.requires_grad_(False)  # LoRA / QLoRA: a frozen head

    class Policy(torch.nn.Module):  # the root: the backbone, then the speed path's head on its hidden states
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids, targets, outputs):
            hidden = self.lm.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 16)
            return head_mod._log_probs(self.lm, hidden, targets.reshape(-1), outputs)[0]

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    targets = ids[:, 1:]
    ref_model = Policy(copy.deepcopy(lm))
    model = Policy(lm)
    for layer in lm.model.layers:
        fully_shard(layer)
    if grouping == "accelerate":  # accelerate 1.15 fsdp2_prepare_model: [final norm, untied head] in one unit
        fully_shard([lm.model.norm, lm.lm_head], reshard_after_forward=False)
    else:  # the head as a unit of its own
        fully_shard(lm.lm_head)
    fully_shard(model)

    seen, incomplete, spying = [], [], [True]
    covers = head_mod.logprob.covers

    def weight_seen(h, w, b, o):  # what the kernel is handed, on the sharded model only
        if spying[0]:
            seen.append([type(w).__name__, list(w.shape)])
        return covers(h, w, b, o)

    head_mod.logprob.covers = weight_seen
    force = FSDPState._force_complete_incomplete_states

    def spy(self, output):  # the root finishing units whose modules did not run forward (torch 2.11 warns here)
        incomplete.extend(s for s in self._state_ctx.all_states if s is not self and s._modules_to_run_forward)
        return force(self, output)

    FSDPState._force_complete_incomplete_states = spy
    result = {"shard_rows": lm.lm_head.weight.to_local().shape[0]}
    for outputs in (("log_probs",), ("log_probs", "entropy")):  # the speed path's kernel, then trl's
        logps = model(ids, targets, outputs)
        logps.sum().backward()
        spying[0] = False
        ref = ref_model(ids, targets, outputs)
        ref.sum().backward()
        spying[0] = True
        grad = lm.model.embed_tokens.weight.grad.full_tensor()
        result[outputs[-1]] = {
            "max_diff": (logps - ref).abs().max().item(),
            "grad_diff": (grad - ref_model.lm.model.embed_tokens.weight.grad).abs().max().item(),
        }
        for m in (model, ref_model):
            m.zero_grad(set_to_none=True)
    result.update(seen=seen, incomplete=len(incomplete))
    if rank == 0:
        print("@@" + json.dumps(result), flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("grouping", ["accelerate", "head-alone"])
def test_fsdp2_head_sees_its_whole_weight_through_its_own_hooks(grouping, tmp_path):
    script = tmp_path / "head.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           grouping]
    proc = subprocess.run(cmd, cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("@@"))[2:])
    assert result["shard_rows"] == 32  # really sharded: each rank holds half of the 64 vocabulary rows
    assert result["seen"] == [["Parameter", [64, 16]]] * 2  # whole, and FSDP2's unsharded parameter (no gather of ours)
    assert result["incomplete"] == 0, "the head's unit was left for the root to force-complete"
    for kernel in ("log_probs", "entropy"):
        assert result[kernel]["max_diff"] < 1e-5 and result[kernel]["grad_diff"] < 1e-5, result
