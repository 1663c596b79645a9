"""dist-dpo's speed path (dist_dpo/speed) computes trl's DPO loss: same batch through plain trl and through the speed
path, same loss, same gradients, same logged metrics. Plus the pieces around it (length grouping under DDP sharding,
per-layer checkpointing, the auto decision) and the CPU smoke run of benchmarks/throughput.py."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, apply_speed_path, lora_b_nonzero

sys.path.insert(0, str(ROOT / "benchmarks"))

KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


@pytest.fixture(scope="module")
def pairs():
    import datasets
    import preference_sets

    rows = preference_sets.variable_rows(12, seed=3, cap=60)
    return datasets.Dataset.from_list([preference_sets.conversational(r) for r in rows])


def build(pairs, fast=False, prefix_sharing="auto", loss_type="sigmoid", max_length=256, lora_b_seed=1, cuda=False,
          packed_rows="auto"):
    """A trl DPOTrainer on the tiny model with LoRA B set non-zero (policy != reference), optionally sped up.
    cuda: bf16 weights on GPU 0 (tests/gpu)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dist_dpo.model_zoo import ensure_builtin_model
    from dist_dpo.trainer import DistDPOTrainer

    path = ensure_builtin_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    args = DPOConfig(output_dir="/tmp/dist_dpo_test_speed", per_device_train_batch_size=6, max_length=max_length,
                     report_to=[], use_cpu=not cuda, bf16=cuda, logging_steps=1, gradient_checkpointing=False, loss_type=[loss_type],
                     seed=0)
    cls = DistDPOTrainer if fast else DPOTrainer  # the comparison's other side is trl's own class
    trainer = cls(model=model, args=args, train_dataset=pairs, processing_class=AutoTokenizer.from_pretrained(path),
                         peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "v_proj"]))
    lora_b_nonzero(trainer, lora_b_seed)
    if fast:
        apply_speed_path(trainer, "cuda" if cuda else "cpu", prefix_sharing=prefix_sharing, packed_rows=packed_rows)
    return trainer


def step(trainer, rows, logging=True):
    """One training micro-step's loss and LoRA gradients on `rows` (a logging step, or a step that is not logged:
    the speed path then skips the vocabulary extras and takes speed/logprob.py's head)."""
    batch = trainer.data_collator([{k: r[k] for k in KEYS} for r in rows])
    if trainer.args.device.type == "cuda":
        from accelerate.utils import send_to_device

        batch = send_to_device(batch, trainer.args.device)
    trainer.model.train()
    trainer.model.zero_grad()
    # train() sets logging_steps from the args; step 4 of every 10 is not logged
    trainer.state.global_step, trainer.state.logging_steps = (0, 1) if logging else (3, 10)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, batch


def assert_same(reference, candidate, rtol=1e-4):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = reference, candidate
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = grads_a[name].abs().max().item() + 1e-12
        assert (grads_a[name] - grads_b[name]).abs().max().item() / scale < rtol, name


@pytest.mark.parametrize("prefix_sharing,max_length", [(True, 256), (False, 256), (True, 72)])
def test_fast_path_gives_trls_loss_and_gradients(pairs, prefix_sharing, max_length):
    plain = build(pairs, max_length=max_length)
    rows = [plain.train_dataset[i] for i in range(min(6, len(plain.train_dataset)))]
    assert len(rows) >= 4
    if max_length < 256:  # truncation really happens: some answer is cut
        assert any(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) > max_length for r in rows)
    reference = step(plain, rows)
    fast = build(pairs, fast=True, prefix_sharing=prefix_sharing, max_length=max_length)
    candidate = step(fast, rows)
    assert ("speed_rows" in candidate[2]) == prefix_sharing  # the layout under test really ran
    if prefix_sharing:  # fewer decoder tokens than trl's two rows per pair
        assert candidate[2]["speed_rows"].input_ids.numel() < candidate[2]["input_ids"].numel()
    assert_same(reference, candidate)


def force_packed(trainer):
    """Packed rows on the CPU: the segments run through attention.reference (sdpa per segment, explicit bottom-right
    causal mask), the path the GPU probe holds flash attention's variable-length kernel to."""
    from dist_dpo.speed import attention

    attention.install(trainer.model.get_base_model())
    trainer.data_collator.packed = True
    return trainer


@pytest.mark.parametrize("max_length", [256, 72])
def test_packed_rows_give_trls_loss_and_gradients(pairs, max_length):
    plain = build(pairs, max_length=max_length)
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = force_packed(build(pairs, fast=True, prefix_sharing="auto", max_length=max_length))
    candidate = step(fast, rows)
    batch = candidate[2]
    assert batch["speed_rows"].input_ids.shape[0] == 1 and batch["speed_rows"].varlen is not None  # one packed row really ran
    # no padding at all: exactly each pair's prompt + chosen + rejected (after trl's truncation)
    assert batch["speed_rows"].input_ids.numel() == sum(sum(map(len, fast.data_collator._truncated(r))) for r in rows)
    assert fast.data_collator.batches["packed"] == 1
    assert_same(reference, candidate)


def test_packed_segments_are_the_masked_rows_attention():
    """The two segments per pair attend exactly like the shared row's 4-D mask: same output for every token."""
    from dist_dpo.speed import attention, batching, head

    class Base:
        max_length, truncation_mode, pad_to_multiple_of, pad_token_id = None, "keep_start", None, 0

    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13]},
                {"prompt_ids": [1], "chosen_ids": [2, 3, 4, 5, 6], "rejected_ids": [7]}]
    collator = batching.SharedPromptCollator(Base(), mode="true")
    shared = collator._shared_rows(examples, width_out=7)
    packed = collator._packed_rows(examples, width_out=7)
    g = torch.Generator().manual_seed(0)
    rows, width = shared.input_ids.shape
    q, k, v = (torch.randn(rows, heads, width, 16, generator=g) for heads in (4, 2, 2))
    mask = head.shared_prompt_mask(shared.segments, torch.float32)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    real = shared.segments >= 0  # the packed row holds the shared rows' non-pad tokens, in order
    flat = lambda t: t.transpose(1, 2)[real]  # noqa: E731 - [tokens, heads, dim]
    got, _ = attention.attention_forward(None, flat(q).transpose(0, 1)[None], flat(k).transpose(0, 1)[None],
                                         flat(v).transpose(0, 1)[None], None, scaling=16 ** -0.5,
                                         packed_segments=packed.varlen)
    assert torch.allclose(got[0], flat(want), atol=1e-5)
    assert packed.position_ids[0].tolist() == shared.position_ids[real].tolist()


def test_packed_rows_stay_off_without_cuda(pairs):
    fast = build(pairs, fast=True)
    assert fast.data_collator.packed is False
    assert "packed_rows: no CUDA device" in fast.speed.report["off"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_rows_under_partial_checkpointing_give_trls_gradients(pairs, reentrant):
    from dist_dpo.speed import checkpointing

    plain = build(pairs)
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = force_packed(build(pairs, fast=True, prefix_sharing=True))
    checkpointing.apply(fast, every=2, reentrant=reentrant)
    fast.model.enable_input_require_grads()
    assert_same(reference, step(fast, rows))


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_rows_under_partial_checkpointing_give_trls_gradients(pairs, reentrant):
    from dist_dpo.speed import checkpointing

    plain = build(pairs)
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = build(pairs, fast=True, prefix_sharing=True)
    checkpointing.apply(fast, every=2, reentrant=reentrant)  # reentrant: what ZeRO-3 + PEFT forces
    fast.model.enable_input_require_grads()
    assert_same(reference, step(fast, rows))


def test_fast_path_logs_trls_metrics(pairs):
    plain = build(pairs)
    rows = [plain.train_dataset[i] for i in range(6)]
    step(plain, rows)
    expected = {k: v[-1] for k, v in plain._metrics["train"].items()}
    fast = build(pairs, fast=True, prefix_sharing=True)
    step(fast, rows)
    from dist_dpo.speed.loss import flush_metrics

    assert not fast._metrics["train"]  # nothing synced during the step
    flush_metrics(fast)
    got = {k: v[-1] for k, v in fast._metrics["train"].items()}
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-4, abs=1e-5), k


def test_non_logging_steps_skip_the_vocabulary_extras(pairs):
    fast = build(pairs, fast=True)
    rows = [fast.train_dataset[i] for i in range(6)]
    fast.args.logging_steps = 10
    fast.state.logging_steps = 10
    batch = fast.data_collator([{k: r[k] for k in KEYS} for r in rows])
    fast.model.train()
    fast.state.global_step = 3  # step 4 is not logged
    fast.compute_loss(fast.model, batch).backward()
    from dist_dpo.speed.loss import flush_metrics

    flush_metrics(fast)
    assert "entropy" not in fast._metrics["train"] and "rewards/margins" in fast._metrics["train"]


def test_other_loss_types_keep_trls_loss_code(pairs):
    plain = build(pairs, loss_type="ipo")
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = build(pairs, fast=True, prefix_sharing=True, loss_type="ipo")
    assert "metrics" in fast.speed.report and "trl's" in fast.speed.report["metrics"]
    assert_same(reference, step(fast, rows))


def test_length_grouping_keeps_ranks_disjoint():
    """Every rank builds the sampler (same seed); accelerate hands each rank every other micro-batch."""
    import random

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from dist_dpo.speed.batching import length_grouped_sampler

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 0.8)) + 20 for _ in range(400)]
    per_rank = []
    for rank in (0, 1):
        batches = BatchSampler(length_grouped_sampler(lengths, batch_size=8 * 2, seed=42), batch_size=8,
                               drop_last=False)
        per_rank.append(list(BatchSamplerShard(batches, num_processes=2, process_index=rank)))
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == list(range(400))  # disjoint and complete
    padded = sum(len(b) * max(lengths[i] for i in b) for batches in per_rank for b in batches)
    shuffled = list(range(400))
    random.Random(1).shuffle(shuffled)
    padded_random = sum(8 * max(lengths[i] for i in shuffled[k:k + 8]) for k in range(0, 400, 8))
    assert padded < 0.7 * padded_random, (padded, padded_random)


def test_each_micro_step_is_dealt_out_across_ranks():
    """Several ranks: each micro-step's pairs go to the ranks one by one, so no rank always holds the longest pairs of
    the sorted megabatch; every micro-step (hence every optimizer step) trains the same pairs as before."""
    import random

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from dist_dpo.speed.batching import length_grouped_sampler

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 0.8)) + 20 for _ in range(400)]

    def shards(per_device, world):
        out = []
        for rank in range(world):
            sampler = length_grouped_sampler(lengths, per_device * world, 42, per_device=per_device, world=world)
            out.append(list(BatchSamplerShard(BatchSampler(sampler, per_device, False), world, rank)))
        return out

    contiguous = list(length_grouped_sampler(lengths, 16, 42))  # 1 rank: the order itself, unchanged
    assert list(length_grouped_sampler(lengths, 16, 42, per_device=8, world=1)) == contiguous
    dealt = shards(8, 2)
    assert sorted(i for b in dealt[0] + dealt[1] for i in b) == list(range(400))  # disjoint and complete
    slowest = {"dealt": 0, "contiguous": 0}  # sum over micro-steps of the busier rank's tokens (what a step waits for)
    for k, (b0, b1) in enumerate(zip(*dealt)):
        assert set(b0) | set(b1) == set(contiguous[16 * k:16 * (k + 1)])  # the step's pairs, as before
        c0, c1 = sum(lengths[i] for i in b0), sum(lengths[i] for i in b1)
        old0 = sum(lengths[i] for i in contiguous[16 * k:16 * k + 8])
        old1 = sum(lengths[i] for i in contiguous[16 * k + 8:16 * (k + 1)])
        assert abs(c0 - c1) <= abs(old0 - old1)  # never less even than the contiguous halves
        slowest["dealt"] += max(c0, c1)
        slowest["contiguous"] += max(old0, old1)
    mean = sum(lengths) / 2
    assert slowest["dealt"] / mean < 1.03 and slowest["contiguous"] / mean > 1.1, slowest  # 1.023 vs 1.163


def test_several_ranks_split_each_step_by_cost_not_count():
    """Round robin of sorted batches gave rank 0 the longer batch of every step; cost-balanced splits keep each
    step's pairs and even out the ranks' padded work."""
    import random

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from dist_dpo.speed.batching import length_grouped_sampler, rebalanced_grouped_sampler

    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(5, 0.8)) + 20 for _ in range(768)]
    world, per_device = 2, 16
    plain = [list(BatchSamplerShard(BatchSampler(length_grouped_sampler(lengths, per_device, seed=42), per_device,
                                                 drop_last=False), num_processes=world, process_index=r))
             for r in range(world)]
    split = [list(rebalanced_grouped_sampler(lengths, per_device, 1, world, r, seed=42, drop_last=False))
             for r in range(world)]
    assert sorted(i for batches in split for b in batches for i in b) == list(range(768))  # disjoint, complete
    assert all(sorted(a + b) == sorted(c + d) for a, b, c, d in zip(*split, *plain))  # the same pairs per step
    assert any(len(a) != len(b) for a, b in zip(*split))  # long pairs: fewer of them

    def cost(batch):  # padded work of a micro-batch: pairs x widest row
        return len(batch) * max(lengths[i] for i in batch)

    def scaling(by_rank):  # one GPU's grouped batches vs two GPUs, where a step waits for its costliest batch
        one = sum(cost(b) for b in BatchSampler(length_grouped_sampler(lengths, per_device, seed=42), per_device,
                                                drop_last=False))
        return one / (world * sum(max(map(cost, step)) for step in zip(*by_rank)))

    assert scaling(plain) < 0.85 and scaling(split) > 0.93  # 0.80 -> 0.97 on this long-tailed set

    # each epoch draws its own order, through the way accelerate passes the epoch on
    from accelerate.data_loader import DataLoaderShard

    sampler = rebalanced_grouped_sampler(lengths, per_device, 1, world, 0, seed=42, drop_last=False)
    loader = DataLoaderShard(list(range(768)), batch_sampler=BatchSamplerShard(sampler, 1, 0))
    first = list(sampler)
    loader.set_epoch(1)
    assert sampler.epoch == 1 and list(sampler) != first


@pytest.mark.parametrize("balance", ["true", "false"])
def test_two_ranks_train_the_same_step_as_one_process(tmp_path, balance):
    """2 processes (4 pairs per rank nominal; `balance_ranks: true`: unequal shares of each step, by cost; false,
    the default: 4 and 4) vs 1 process with all 8: the same pairs (same grouped order), the same gradient at step 1
    and the same loss at step 2, on CPU in fp32."""
    from test_train_cpu import accelerate_cmd, run_env

    common = ["--config", "recipes/demo.yaml", "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "0",
              "--save_steps", "100", "--lora_dropout", "0", "--report_to", "none", "--gradient_accumulation_steps", "1"]
    runs = {}
    for name, cmd, per_device in (("two", accelerate_cmd() + ["--balance_ranks", balance], 4),
                                  ("one", [sys.executable, "-m", "dist_dpo", "train"], 8)):
        out = tmp_path / name
        proc = subprocess.run(cmd + common + ["--output_dir", str(out), "--per_device_train_batch_size",
                                              str(per_device)], cwd=ROOT, env=run_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        runs[name] = {h["step"]: h for h in history if "loss" in h}
        if name == "two":
            assert ("split across ranks by cost" in proc.stderr + proc.stdout) is (balance == "true")
    assert runs["two"][1]["grad_norm"] == pytest.approx(runs["one"][1]["grad_norm"], rel=1e-4)
    assert runs["two"][2]["loss"] == pytest.approx(runs["one"][2]["loss"], abs=1e-5)


def test_every_nth_layer_checkpointing_survives_trls_toggle(pairs):
    from trl.models.utils import disable_gradient_checkpointing

    from dist_dpo.speed import checkpointing

    trainer = build(pairs, fast=True)  # dist-dpo's trainer (checkpoint_layers)
    checkpointing.apply(trainer, every=2, reentrant=False)
    layers = lambda: [m.gradient_checkpointing for m in trainer.model.modules()  # noqa: E731
                      if type(m).__name__.endswith("DecoderLayer")]
    assert layers() == [True, False, True, False]
    with disable_gradient_checkpointing(trainer.model, {"use_reentrant": False}):  # what trl's eval forward does
        assert not any(layers())
    assert layers() == [True, False, True, False]
    checkpointing.apply(trainer, every=0, reentrant=False)
    assert not any(layers()) and trainer.args.gradient_checkpointing is False


def test_auto_checkpointing_follows_the_memory_plan(pairs, monkeypatch):
    from dist_dpo import plan
    from dist_dpo.config import Recipe
    from dist_dpo.speed import batching, checkpointing
    from dist_dpo.runtime import Runtime

    trainer = build(pairs)
    rt = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1, strategy="single",
                 launcher="python", deepspeed_config=None, offload=False, device_type="cuda", hostname="h")
    lengths = batching.pair_lengths(trainer.train_dataset, 256)
    recipe = Recipe()
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda device=0: 80.0)
    assert checkpointing.decide(trainer, recipe, rt, lengths)[0] == 0  # the tiny model fits: no recompute
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda device=0: 0.5)
    every, why = checkpointing.decide(trainer, recipe, rt, lengths)
    assert every == 1 and "even full checkpointing" in why
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda device=0: 80.0)
    recipe.train.gpu_memory_gib = 0.5  # an 80 GiB card told to act as a small one plans for the small one
    every, why = checkpointing.decide(trainer, recipe, rt, lengths)
    assert every == 1 and "of 0 GiB" in why
    recipe.train.gpu_memory_gib = None
    recipe.train.gradient_checkpointing = True
    assert checkpointing.decide(trainer, recipe, rt, lengths)[0] == 1


def test_accumulated_micro_batches_merge_when_the_plan_says_they_fit(pairs, monkeypatch):
    from dataclasses import replace

    from dist_dpo import plan
    from dist_dpo.config import Recipe
    from dist_dpo.speed import batching, microbatch
    from dist_dpo.runtime import Runtime

    trainer = build(pairs, fast=True)  # dist-dpo's trainer: run_micro_batches_of below
    trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps = 2, 3
    rt = Runtime(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1, strategy="single",
                 launcher="python", deepspeed_config=None, offload=False, device_type="cuda", hostname="h")
    lengths = batching.pair_lengths(trainer.train_dataset, 256)
    recipe = Recipe()
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda device=0: 80.0)
    assert microbatch.decide(trainer, recipe, rt, lengths)[0] == 6  # fits: one micro-batch of all 6 pairs
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda device=0: 0.5)
    pairs_run, why = microbatch.decide(trainer, recipe, rt, lengths)
    assert pairs_run == 2 and "need more memory" in why  # a small card keeps the recipe's accumulation
    monkeypatch.setattr(plan, "gpu_memory_gib", lambda device=0: 80.0)
    assert microbatch.decide(trainer, recipe, replace(rt, strategy="zero3"), lengths)[0] == 2  # DeepSpeed: as is
    long_pairs = tuple([x * 40 for x in col] for col in lengths)  # ~40x the tokens: 2 pairs already fill a GPU
    pairs_run, why = microbatch.decide(trainer, recipe, rt, long_pairs)
    assert pairs_run == 2 and "already fill the GPU" in why, why
    trainer.args.gradient_accumulation_steps = 4  # a part merge: 2 x 2 of 2 x 4 when 4 x 2's tokens are too many
    n = len(lengths[0])
    mid = ([100] * n, [1400] * n, [1400] * n)  # 2 pairs x 2 rows x 1500 = 6 k tokens: x2 fits 16 k, x4 does not
    assert microbatch.decide(trainer, recipe, rt, mid)[0] == 4
    trainer.args.gradient_accumulation_steps = 3
    recipe.train.merge_micro_batches = False
    assert microbatch.decide(trainer, recipe, rt, lengths)[0] == 2
    trainer.run_micro_batches_of(6)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (6, 1)
    assert trainer._train_batch_size == 6 and trainer.accelerator.gradient_accumulation_steps == 1


def test_merged_micro_batches_train_what_the_recipe_trains(tmp_path):
    """4 x 2 run as 8 x 1 (auto, CPU): bitwise the run written as 8 x 1, and the unmerged 4 x 2 within rounding."""
    from test_train_cpu import run_env

    def run(name, per_device, accum, merge):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "dist_dpo", "train", "--config", "recipes/demo.yaml", "--output_dir", str(out),
               "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "100",
               "--lora_dropout", "0", "--report_to", "none", "--per_device_train_batch_size", str(per_device),
               "--gradient_accumulation_steps", str(accum), "--merge_micro_batches", merge]
        proc = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [(h["loss"], h["grad_norm"]) for h in history if "loss" in h], proc.stderr + proc.stdout

    merged, said = run("merged", 4, 2, "auto")
    assert "8 pairs x 1" in said and "8 per device x 1 accumulation" in said
    assert merged == run("written", 8, 1, "false")[0]
    for (a, ga), (b, gb) in zip(merged, run("accumulated", 4, 2, "false")[0]):
        assert abs(a - b) < 1e-5 and abs(ga - gb) < 1e-4 * max(ga, 1.0)


def test_recipe_accepts_auto_true_false():
    from dist_dpo.config import parse_recipe
    from dist_dpo.errors import UserError

    assert parse_recipe([]).train.gradient_checkpointing == "auto"
    assert parse_recipe(["--gradient_checkpointing", "false"]).train.gradient_checkpointing is False
    assert parse_recipe(["--gradient_checkpointing"]).train.gradient_checkpointing is True
    assert parse_recipe(["--prefix_sharing", "true"]).train.prefix_sharing is True
    with pytest.raises(UserError, match="must be true or false \\(or auto\\)"):
        parse_recipe(["--prefix_sharing", "sometimes"])


def test_throughput_smoke_on_cpu(tmp_path):
    """The benchmark's whole path (data, plain-trl and dist-dpo children, JSON, table) at toy scale."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke", "--profile", "--only", "dist-dpo,tutorial",
                           "--sync-probe", "1", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "throughput.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"dist-dpo/var/lora/1gpu", "tutorial/var/lora/1gpu"}
    for r in rows.values():
        for key in ("model", "seq_len", "quant", "gpus", "tokens_per_s", "pairs_per_s", "epoch_wall_s", "mfu",
                    "peak_mem_gib"):
            assert r[key] is not None, key
    assert rows["dist-dpo/var/lora/1gpu"]["tokens"] == rows["tutorial/var/lora/1gpu"]["tokens"]  # same work
    assert doc["ratios"]["vs_tutorial"] > 0 and doc["versions"]["trl"] and doc["cards"] == ["cpu"]
    if "speed.apply" in (ROOT / "dist_dpo" / "train.py").read_text():
        assert rows["dist-dpo/var/lora/1gpu"]["speed_path"]
    assert "trainer (tokenization)" in rows["dist-dpo/var/lora/1gpu"]["startup_s"]  # from its dist_dpo_run.json
    profile = rows["dist-dpo/var/lora/1gpu"]["profile_per_rank"]["0"]  # the last step, under torch.profiler
    assert profile["steps"] == 1 and profile["wall_s"] > 0 and profile["top_host_ops_ms"]
    # a 3-step epoch: the probe's one step is the profiled last one (steps 1-2 stay warm-up)
    assert rows["dist-dpo/var/lora/1gpu"]["sync_probe_per_rank"]["0"]["steps"] == 1
    host = rows["tutorial/var/lora/1gpu"]["host_per_rank"]["0"]  # where each rank's host time goes, and runs
    assert host["in_step_median_s"] > 0 and host["between_steps_median_s"] >= 0 and host["cpus_allowed"] >= 1
    # the epoch ends with its last step: dist-dpo's final checkpoint and the profile summary come after
    dd = rows["dist-dpo/var/lora/1gpu"]
    assert dd["epoch_wall_s"] == pytest.approx(dd["step_end_s_per_rank"]["0"][-1], abs=0.01)
    assert dd["train_end_wall_s"] > dd["epoch_wall_s"]
    for r in rows.values():  # the whole process (imports, load, save): slower than the epoch's own clock
        assert 0 < r["process_tokens_per_s"] < r["tokens_per_s"] and \
            r["process_tokens_per_s"] == pytest.approx(r["tokens"] / r["process_s"], rel=0.01)
    table, syncs = proc.stdout.split("\nsyncs ", 1)  # the sync probe's lines come after the table
    assert syncs.startswith("dist-dpo/var/lora/1gpu rank 0: ")
    tail = table.splitlines()[-(len(doc["targets"]) + 1):]  # the table is printed last, then the targets
    assert "ratios" in tail[0] and all(line.startswith("target ") for line in tail[1:])
    vs_tutorial = next(t for t in doc["targets"] if t["target"] == "vs_tutorial var")
    assert vs_tutorial["measured"] == round(doc["ratios"]["vs_tutorial"], 3) and vs_tutorial["goal"] == 4.0


def test_sync_probe_records_collectives_with_their_call_site():
    import socket

    import torch.distributed as dist
    from sync_probe import SyncProbe

    original = dist.barrier
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        probe = SyncProbe()
        probe.start()
        dist.all_reduce(torch.ones(2))
        dist.barrier()
        probe.steps = 2
        out = probe.stop()
    finally:
        dist.destroy_process_group()
    assert dist.barrier is original and dist.distributed_c10d.barrier is original
    sites = {name: site for _, name, site in out["collectives"]}
    assert sites.keys() == {"all_reduce", "barrier"}
    assert sites["barrier"].startswith("tests/test_speed.py:") and \
        sites["barrier"].split(" <- ")[0].endswith(" test_sync_probe_records_collectives_with_their_call_site")
    assert out["syncs"] == 0 and out["syncs_per_step"] == 0 and out["steps"] == 2


def test_sync_probe_passes_other_warnings_on(monkeypatch):
    import warnings

    from sync_probe import SyncProbe

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    probe = SyncProbe()
    probe.start()
    warnings.warn("x")
    warnings.warn("called a synchronizing CUDA operation")  # what torch.cuda.set_sync_debug_mode("warn") says
    out = probe.stop()
    assert shown == ["x"] and out["syncs"] == 1
    assert " test_sync_probe_passes_other_warnings_on" in out["sync_sites"][0][1].split(" <- ")[0]
    warnings.warn("y")  # after stop(): the original again
    assert shown[-1] == "y"


@pytest.mark.parametrize("api", ["torch 2.9: is_causal, no scale, no GQA", "later: window_size, scale, enable_gqa"])
def test_flash_varlen_speaks_every_varlen_api(monkeypatch, api):
    """torch's varlen_attn changed keywords between releases (the GPU image's torch is older than CI's): the call
    adapts, and gives the reference attention either way (the kernel stood in for by the reference)."""
    import torch.nn.attention.varlen as tv

    from dist_dpo.speed import attention

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
        assert is_causal and key.size(1) == query.size(1)
        return attention.reference(query, key, value, attention.Varlen(cu_seq_q, cu_seq_k, None, max_q, max_k), None)

    def new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
            window_size=(-1, -1), enable_gqa=False):
        assert window_size == (-1, 0) and enable_gqa == (key.size(1) != query.size(1))
        return attention.reference(query, key, value, attention.Varlen(cu_seq_q, cu_seq_k, None, max_q, max_k), scale)

    monkeypatch.setattr(tv, "varlen_attn", old if "2.9" in api else new)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(13, heads, 8, generator=g) for heads in (4, 2, 2))
    varlen = attention.Varlen(cu_q=torch.tensor([0, 7, 13]), cu_k=torch.tensor([0, 7, 13]), kv_index=None,
                              max_q=7, max_k=7)
    # 2.9/2.11 have no enable_gqa: grouped heads go to torch's flash op directly (a CUDA kernel: the GPU test
    # tests/gpu/test_fast_path_gpu.py holds it to the expansion), expanded if the probe finds that failing
    assert attention.gqa_modes() == (["aten", "expand"] if "2.9" in api else ["varlen"])
    got = attention.flash_varlen(q, k, v, varlen, scale=0.3, gqa="expand" if "2.9" in api else None)
    assert torch.allclose(got, attention.reference(q, k, v, varlen, 0.3), atol=1e-5)


def test_lora_inputs_skip_peft_copy_under_autocast_and_compute_the_same():
    """bf16 base, fp32 adapters (peft's default), autocast as accelerate runs it: without peft's fp32 copy of every
    LoRA input the loss and gradients are bitwise the same (dropout 0), with fewer copies; outside autocast the copy
    stays (fp32 adapter weights need an fp32 input)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dist_dpo import model_zoo
    from dist_dpo.speed import lora_inputs

    base = AutoModelForCausalLM.from_pretrained(str(model_zoo.ensure_builtin_model()), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(0))
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
        copies = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, copies

    loss0, grads0, copies0 = step()
    layers = lora_inputs.install(model)
    loss1, grads1, copies1 = step()
    assert layers == 2 * model.config.num_hidden_layers
    assert torch.equal(loss0, loss1) and all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    assert copies1 < copies0
    with torch.no_grad():  # no autocast: peft's cast is still there, so the fp32 adapters get an fp32 input
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("name,value", [("DIST_DPO_AB_LORA_INPUT_CAST", "yes"), ("DIST_DPO_AB_VARLEN_GQA", "fast"),
                                        ("DIST_DPO_AB_HEAD_RECOMPUTE", "true"), ("DIST_DPO_AB_RMSNORM", "apex"),
                                        ("DIST_DPO_AB_FUSED_QKV", "on"), ("DIST_DPO_AB_FUSED_QKVV", "0")])
def test_a_bad_ab_switch_is_refused_in_one_line(pairs, monkeypatch, name, value):
    """The benchmark's A/B environment switches: a mistyped value stops the run (a UserError: one line from rank 0,
    every rank exits 2), on CPU too, instead of silently running the default."""
    from dist_dpo.errors import UserError

    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=f"{name}={value}"):
        build(pairs, fast=True)


@pytest.mark.parametrize("tile", [8, 4096])
def test_log_probs_with_gradient_in_forward_match_trls_kernel(monkeypatch, tile):
    """speed/logprob.py against trl's ChunkedLogProbFunction and full-vocabulary log_softmax: same log-probs, same
    hidden-state gradient; several vocabulary chunks (the last one partial) and, with tile 8, several token tiles."""
    from trl.kernels import ChunkedLogProbFunction

    from dist_dpo.speed import logprob

    monkeypatch.setattr(logprob, "TOKENS_PER_TILE", tile)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(37, 24, generator=g) * 2).requires_grad_()
    weight = torch.randn(50, 24, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    assert logprob.covers(hidden, weight, None, ("log_probs",))
    ours = logprob.log_probs(hidden, weight, targets, 16)
    (grad_ours,) = torch.autograd.grad(ours, hidden, upstream)
    trl = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, None, 1.0, ("log_probs",))[0]
    (grad_trl,) = torch.autograd.grad(trl, hidden, upstream)
    exact = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    (grad_exact,) = torch.autograd.grad(exact, hidden, upstream.double())
    assert torch.allclose(ours.double(), exact, atol=1e-5) and torch.allclose(trl.double(), exact, atol=1e-5)
    assert torch.allclose(grad_ours, grad_exact, atol=1e-5)
    assert torch.allclose(grad_ours, grad_trl, atol=1e-5)


def test_log_probs_with_gradient_in_forward_cover_only_what_they_can(monkeypatch):
    from dist_dpo.speed import logprob

    h, w = torch.zeros(2, 4, requires_grad=True), torch.zeros(6, 4)
    assert logprob.covers(h, w, None, ("log_probs",))
    assert not logprob.covers(h, w, None, ("log_probs", "entropy"))  # logging steps: trl's kernel
    assert not logprob.covers(h.detach(), w, None, ("log_probs",))  # the reference forward
    assert not logprob.covers(h, w.requires_grad_(), None, ("log_probs",))  # a trained head
    assert not logprob.covers(h, torch.zeros(6, 4), torch.zeros(6), ("log_probs",))  # a head with bias
    monkeypatch.setenv("DIST_DPO_AB_HEAD_RECOMPUTE", "1")
    assert not logprob.covers(h, torch.zeros(6, 4), None, ("log_probs",))


def test_non_logging_steps_give_trls_loss_and_gradients(pairs, monkeypatch):
    """Outside logging steps the policy's head is speed/logprob.py (no extras asked): the step is still trl's."""
    from dist_dpo.speed import logprob

    plain = build(pairs)
    rows = [plain.train_dataset[i] for i in range(6)]
    reference = step(plain, rows)
    fast = build(pairs, fast=True)
    calls = []
    real = logprob.log_probs
    monkeypatch.setattr(logprob, "log_probs", lambda *a: calls.append(1) or real(*a))
    candidate = step(fast, rows, logging=False)
    assert calls == [1]  # the policy forward only (the reference forward has no gradient)
    assert_same(reference, candidate)


def test_a_negative_sync_probe_is_refused():
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--sync-probe", "-1", "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--sync-probe -1: give a number of steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_torch_rms_norm_is_the_models_rms_norm():
    """speed/rms_norm.py: F.rms_norm in place of the model's RMSNorm - the same function in fp32, within one bf16
    rounding step in bf16 (HF rounds x * rstd before the weight), input gradient too."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from dist_dpo.speed import rms_norm

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2 ** -7)):
        own = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            own.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        fused = Qwen2RMSNorm(64, eps=1e-6).to(dtype)
        fused.load_state_dict(own.state_dict())
        assert rms_norm.install(fused, ("Qwen2RMSNorm",)) == 1
        x = (torch.randn(5, 7, 64, generator=g) * 3).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = own(xa), fused(xb)
        up = torch.randn(ya.shape, generator=g).to(dtype)
        (ga,), (gb,) = torch.autograd.grad(ya, xa, up), torch.autograd.grad(yb, xb, up)
        assert yb.dtype == ya.dtype == dtype
        assert ((ya.float() - yb.float()).abs() / ya.float().abs().clamp_min(1e-3)).max() <= tol
        assert (ga.float() - gb.float()).abs().max() / ga.float().abs().max() <= 4 * tol
    x32 = torch.randn(3, 64)  # a weight kept in another dtype than the input: the module's own forward
    own32 = Qwen2RMSNorm(64).to(torch.bfloat16)
    rms_norm.install(own32, ("Qwen2RMSNorm",))
    assert own32(x32).dtype == torch.float32


def trl_step(pairs):
    """6 pairs and plain trl's step on them: what a switch of the speed path must reproduce."""
    plain = build(pairs)
    rows = [plain.train_dataset[i] for i in range(6)]
    return rows, step(plain, rows)


def test_torch_rms_norm_switch_keeps_trls_loss(pairs, monkeypatch):
    rows, reference = trl_step(pairs)
    monkeypatch.setenv("DIST_DPO_AB_RMSNORM", "torch")
    calls = []
    real = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = build(pairs, fast=True)
    assert "RMSNorm" in fast.speed.report
    candidate = step(fast, rows)
    assert calls  # the switch really ran
    assert_same(reference, candidate)


@pytest.mark.parametrize("model_type,liger,switch,want", [
    ("qwen2", "auto", "torch", {"use_liger_kernel": True, "liger_kernel_config": {"rms_norm": False}}),
    ("qwen2", "auto", "liger", {"use_liger_kernel": True}),  # the benchmark's row with liger's RMSNorm
    ("gemma2", "auto", "torch", {"use_liger_kernel": True}),  # (1 + w) norms: liger's RMSNorm stays
    ("qwen3_moe", "auto", "torch", {"use_liger_kernel": False}),  # the table's reason against liger
    ("qwen3_moe", True, "torch", {"use_liger_kernel": True, "liger_kernel_config": {"rms_norm": False}}),  # forced
    (None, "auto", "torch", {"use_liger_kernel": True}),  # family not known yet (the first, pre-preflight build)
])
def test_liger_settings_are_decided_with_the_training_arguments(model_type, liger, switch, want, monkeypatch):
    """liger's kernels are settled in the DPOConfig, before the trainer exists (trl applies them at train()): off
    where the architecture table says so, without RMSNorm where the speed path runs torch's fused norm."""
    from dist_dpo import dpo_args
    from dist_dpo.config import parse_recipe

    monkeypatch.setenv("DIST_DPO_AB_RMSNORM", switch)
    monkeypatch.setattr(dpo_args, "use_liger_kernels", lambda t, on_gpu: True)  # a GPU with liger-kernel installed
    t = parse_recipe([]).train
    t.liger_kernels = liger
    assert dpo_args.liger_settings(t, True, model_type) == want


def test_compiled_layers_keep_trls_loss_and_compile_once(pairs, monkeypatch):
    """speed/compiled.py (DIST_DPO_AB_COMPILE=layers): every decoder layer through torch.compile gives trl's loss
    and gradients, without a graph break, and steps of other lengths reuse the graphs (dynamic shapes). The CPU test
    traces with aot_eager (the same graphs, no code generation); tests/gpu runs inductor with packed rows."""
    from dist_dpo.speed import compiled

    rows, reference = trl_step(pairs)
    monkeypatch.setenv("DIST_DPO_AB_COMPILE", "layers")
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast = build(pairs, fast=True)
    assert fast.speed.report["decoder layers"] == "compiled (4 layers, torch.compile, dynamic shapes)"
    assert "q/k/v" not in fast.speed.report  # the compiler sees the three projections
    assert compiled.install(fast.model.get_base_model()) == 4  # twice changes nothing
    candidate = step(fast, rows)
    assert_same(reference, candidate)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 3  # one per grad mode (policy, reference), not one per layer
    for other in (rows[:5], rows[1:]):  # other lengths: the same graphs
        step(fast, other)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


def test_fused_qkv_is_the_three_projections(pairs, monkeypatch):
    """speed/fused_qkv.py: one matmul for q/k/v gives trl's loss and gradients (fp32, CPU), the modules' weights are
    views into the fused copy (no extra memory), and a base whose weights were re-allocated falls back to its own."""
    rows, reference = trl_step(pairs)
    monkeypatch.setenv("DIST_DPO_AB_FUSED_QKV", "1")
    calls = []
    real = torch.nn.functional.linear
    fast = build(pairs, fast=True)
    assert fast.speed.report["q/k/v"] == "one matmul (4 layers)"
    attn = fast.model.get_base_model().model.layers[0].self_attn
    fused_w = attn.q_proj.base_layer.weight
    assert attn.k_proj.weight.data_ptr() == fused_w.data_ptr() + fused_w.numel() * fused_w.element_size()
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: calls.append(w) or real(x, w, b))
    candidate = step(fast, rows)
    assert_same(reference, candidate)
    layers = fast.model.get_base_model().model.layers
    k_weights = [layer.self_attn.k_proj.weight for layer in layers]
    qkv_rows = attn.q_proj.base_layer.out_features + attn.k_proj.out_features + attn.v_proj.base_layer.out_features
    assert sum(w.shape[0] == qkv_rows for w in calls) == len(layers) * 2  # policy and reference forwards, every layer one matmul
    assert not any(w is kw for w in calls for kw in k_weights)
    with torch.no_grad():  # a re-allocated weight (what a dtype cast does): that layer's projections on their own
        attn.k_proj.weight.data = attn.k_proj.weight.data.clone()
    calls.clear()
    again = step(fast, rows)
    assert sum(w is attn.k_proj.weight for w in calls) == 2 and not any(w is kw for w in calls for kw in k_weights[1:])
    assert_same(reference, again)



def test_fused_qkv_and_torch_rms_norm_are_the_default_where_weights_are_whole(pairs, monkeypatch):
    """The speed path's defaults since the 2026-11-28 A/B rows (q/k/v one matmul, torch's fused RMSNorm); each A/B
    switch turns its piece off; strategies that shard weights after the speed path (FSDP2, ZeRO-3: the strategy
    table's fuses_qkv) keep q/k/v apart."""
    import dist_dpo.speed as speed
    from dist_dpo.strategies import STRATEGY_TABLE, strategy_for

    rows, reference = trl_step(pairs)
    fast = build(pairs, fast=True)
    report = fast.speed.report
    assert report["q/k/v"] == "one matmul (4 layers)" and report["RMSNorm"].startswith("torch's fused rms_norm")
    assert_same(reference, step(fast, rows))
    monkeypatch.setenv("DIST_DPO_AB_FUSED_QKV", "0")
    monkeypatch.setenv("DIST_DPO_AB_RMSNORM", "liger")
    plain = build(pairs, fast=True).speed.report
    assert "q/k/v" not in plain and "RMSNorm" not in plain
    monkeypatch.delenv("DIST_DPO_AB_FUSED_QKV")
    assert {n for n, s in STRATEGY_TABLE.items() if not s.fuses_qkv} == {"fsdp", "zero3"}
    monkeypatch.setattr("dist_dpo.strategies.strategy_for",
                        lambda name: strategy_for("zero3"))  # what apply() asks for a ZeRO-3 run
    sharded = build(pairs, fast=True)
    assert "q/k/v" not in sharded.speed.report
    attn = sharded.model.get_base_model().model.layers[0].self_attn
    assert not hasattr(attn.k_proj, "_dist_dpo_own_forward")  # no fused copy made
    from dist_dpo import ab_switches

    assert ab_switches.flag("FUSED_QKV")  # on when unset


@pytest.mark.parametrize("lane,message", [("fixed2048", "give SUBSTRING=LANE"), ("nosuch=0", "no selected 1-GPU row")])
def test_throughput_refuses_a_bad_lane_in_one_line(lane, message):
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--lane", lane, "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_the_speed_path_is_applied_once(pairs):
    """A second speed.apply on the same trainer changes nothing (the same report, trl's loss and gradients), and each
    piece installed twice on a model is still installed once."""
    from dist_dpo.speed import fused_qkv, rms_norm
    from dist_dpo.architectures import family_of

    rows, reference = trl_step(pairs)
    fast = build(pairs, fast=True)
    report = dict(fast.speed.report)
    apply_speed_path(fast)
    assert fast.speed.report == report
    base = fast.model.get_base_model()
    assert rms_norm.install(base, family_of(base).norm_classes) == 2 * 4 + 1  # the same norms as the first time
    assert fused_qkv.install(base) == 4
    assert_same(reference, step(fast, rows))
