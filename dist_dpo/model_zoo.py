"""Random-weight models of real shapes, built offline: the built-in tiny model and stand-ins for benchmarks.

Random weights are enough to test and time LoRA/QLoRA DPO (the memory and FLOPs depend on the shape, not on the
values), and they need no hub access. Every model ships with the built-in ChatML tokenizer (assets/tokenizer, 4096
ids); for the big vocabularies those ids are simply the first 4096 rows of the embedding.

    dist-dpo build-model --list
    dist-dpo build-model --shape qwen2.5-1.5b --out /tmp/q15 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import uuid
from pathlib import Path

from dist_dpo.errors import UserError

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
MARKER = "dist_dpo_model.json"  # written last inside the temp dir: its presence means the dir is complete
BUILTIN_SHAPE = "tiny-qwen2"
# Bump the suffix whenever the tiny shape, its seed or the bundled tokenizer changes, so stale caches are not reused.
BUILTIN_DIRNAME = "tiny-qwen2-v1"
_DTYPES = ("bfloat16", "float16", "float32")


def _qwen2(**kw) -> dict:
    # Shared by every Qwen2.5 size (values from the Qwen2.5-*-Instruct config.json files). Sliding window is off
    # in all of them, so it is left out.
    base = dict(model_type="qwen2", hidden_act="silu", rope_theta=1000000.0, rms_norm_eps=1e-6,
                max_position_embeddings=32768, initializer_range=0.02, attention_dropout=0.0)
    return {"architecture": "Qwen2ForCausalLM", "config": {**base, **kw}}


SHAPES: dict[str, dict] = {
    # ~1.3M params: runs a DPO step on CPU in a second. vocab_size matches the built-in tokenizer.
    "tiny-qwen2": _qwen2(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=2048),
    "qwen2.5-0.5b": _qwen2(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": _qwen2(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                           num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": _qwen2(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": _qwen2(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-14b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                          num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-32b": _qwen2(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                          num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen2.5-72b": _qwen2(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    # Meta-Llama-3-8B config.json.
    "llama-3-8b": {"architecture": "LlamaForCausalLM", "config": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        initializer_range=0.02)},
}


def _shape(model_type: str, architecture: str, **kw) -> dict:
    return {"architecture": architecture, "config": dict(model_type=model_type, initializer_range=0.02, **kw)}


# Real sizes of the other families people DPO (values from each model's config.json; Qwen3.5's are transformers'
# Qwen3_5TextConfig defaults, its "Qwen3.5-9B style"): stand-ins for benchmarks and the memory plan.
SHAPES.update({
    "llama-3.1-8b": _shape("llama", "LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}),
    "mistral-7b": _shape("mistral", "MistralForCausalLM", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, sliding_window=None,
                         rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=False),  # v0.3
    "qwen3-8b": _shape("qwen3", "Qwen3ForCausalLM", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=40960,
                       tie_word_embeddings=False),
    "qwen3-30b-a3b": _shape("qwen3_moe", "Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048,
                            intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                            num_experts_per_tok=8, norm_topk_prob=True, rope_theta=1000000.0,
                            max_position_embeddings=40960, tie_word_embeddings=False),
    "qwen3.5-9b": _shape("qwen3_5_text", "Qwen3_5ForCausalLM"),
    "gemma-2-9b": _shape("gemma2", "Gemma2ForCausalLM", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                         num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                         sliding_window=4096, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                         final_logit_softcapping=30.0, tie_word_embeddings=True),
    "gemma-3-12b": _shape("gemma3_text", "Gemma3ForCausalLM", vocab_size=262208, hidden_size=3840,
                          intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8,
                          head_dim=256, sliding_window=1024, query_pre_attn_scalar=256, tie_word_embeddings=True),
})


def _tiny(model_type: str, architecture: str, **kw) -> dict:
    """A ~0.5M-parameter random model of a family (4 layers, hidden 64): the suite's stand-in for each row of the
    architecture table (dist_dpo/architectures.py). Real-shape keys that make the family what it is stay on
    (sliding windows short enough to matter on the bundled pairs, q/k norms, experts, linear-attention layers)."""
    base = dict(model_type=model_type, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                tie_word_embeddings=False, pad_token_id=None)  # some configs default to a pad id past 4096
    return {"architecture": architecture, "config": {**base, **kw}}


_HYBRID = dict(layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
_ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# One tiny model per family of the architecture table, keyed tiny-<model_type>; Qwen2's is the built-in tiny-qwen2.
FAMILY_SHAPES: dict[str, dict] = {"tiny-qwen2": SHAPES["tiny-qwen2"]} | {f"tiny-{e['config']['model_type']}": e for e in (
    _tiny("llama", "LlamaForCausalLM"),
    _tiny("mistral", "MistralForCausalLM", sliding_window=24),  # v0.1's window, shrunk to bite on short pairs
    _tiny("qwen3", "Qwen3ForCausalLM"),
    _tiny("qwen3_moe", "Qwen3MoeForCausalLM", **_MOE),
    _tiny("qwen3_5_text", "Qwen3_5ForCausalLM", **_HYBRID),
    _tiny("qwen3_next", "Qwen3NextForCausalLM", **_HYBRID, **_MOE, shared_expert_intermediate_size=64),
    _tiny("gemma2", "Gemma2ForCausalLM", sliding_window=24, query_pre_attn_scalar=16, tie_word_embeddings=True,
          layer_types=_ALTERNATING),
    _tiny("gemma3_text", "Gemma3ForCausalLM", sliding_window=24, query_pre_attn_scalar=16, tie_word_embeddings=True,
          layer_types=_ALTERNATING),
    # per-layer input embeddings, global layers with their own head size, the last layers sharing earlier K/V
    _tiny("gemma4_text", "Gemma4ForCausalLM", sliding_window=24, tie_word_embeddings=True, layer_types=_ALTERNATING,
          vocab_size_per_layer_input=4096, hidden_size_per_layer_input=16, global_head_dim=32,
          num_kv_shared_layers=2),
    _tiny("phi3", "Phi3ForCausalLM"),
    _tiny("olmo2", "Olmo2ForCausalLM"),
    _tiny("olmo3", "Olmo3ForCausalLM", sliding_window=24, layer_types=_ALTERNATING),
    _tiny("smollm3", "SmolLM3ForCausalLM", no_rope_layers=[1, 1, 1, 0]),
    # Granite 3's multipliers (attention's is 1 / head_dim here), all away from 1 so that each one counts
    _tiny("granite", "GraniteForCausalLM", embedding_multiplier=12.0, residual_multiplier=0.22,
          attention_multiplier=0.0625, logits_scaling=8.0),
    _tiny("glm", "GlmForCausalLM"),  # partial rotary, q/k/v biases: the configs' defaults
    _tiny("glm4", "Glm4ForCausalLM"),
    _tiny("mixtral", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    _tiny("olmoe", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2),
    _tiny("ernie4_5", "Ernie4_5ForCausalLM", tie_word_embeddings=True),
)}
SHAPES.update(FAMILY_SHAPES)


def get_shape(shape: str | dict) -> dict:
    """A SHAPES entry by name (or the entry itself); a bad name is a UserError listing the valid ones."""
    if isinstance(shape, dict):
        return shape
    if shape not in SHAPES:
        raise UserError(f"unknown model shape '{shape}': choose one of {', '.join(SHAPES)}")
    return SHAPES[shape]


def param_count(shape: str | dict) -> int:
    """Parameters of a shape, computed from its config (no model built): used for MFU and memory planning."""
    entry = get_shape(shape)
    c = entry["config"]
    mixers = set(c.get("layer_types") or []) - {"full_attention", "sliding_attention"}
    if entry["architecture"] not in _DENSE or c.get("num_experts") or mixers or c.get("hidden_size_per_layer_input"):
        return _meta_count(json.dumps(c, sort_keys=True))
    h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads)
    hd = c.get("head_dim") or h // heads
    q, k = heads * hd, kv * hd
    attn = h * q + 2 * h * k + q * h  # q, k, v, o projections
    if entry["architecture"] == "Qwen2ForCausalLM":
        attn += q + 2 * k  # Qwen2 always has q/k/v biases, o_proj has none
    elif c.get("attention_bias"):
        attn += q + 2 * k + h  # Llama's attention_bias covers o_proj too
    mlp = 3 * h * inter + ((2 * inter + h) if c.get("mlp_bias") else 0)  # gate, up, down
    per_layer = attn + mlp + 2 * h  # + input / post-attention RMSNorm
    embed = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    return embed + layers * per_layer + h  # + final norm


_DENSE = ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM")  # what the formula above covers


@functools.lru_cache(maxsize=None)
def _meta_count(config_json: str) -> int:
    """Other families (experts, linear attention, per-layer embeddings ...): the model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = json.loads(config_json)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _special_ids() -> dict[str, int]:
    """Ids of the built-in tokenizer's special tokens, read from its tokenizer.json (the source of truth)."""
    added = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    return {t["content"]: t["id"] for t in added}


def _is_complete(path: Path) -> bool:
    # The marker is written last; config.json is checked too, since a rank-gated save_pretrained can skip it.
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _check_existing(out: Path, meta: dict) -> Path:
    have = json.loads((out / MARKER).read_text(encoding="utf-8"))
    if any(have.get(k) != meta[k] for k in ("shape", "seed", "dtype")):
        raise UserError(f"{out} already holds a different model ({have.get('shape')}, seed {have.get('seed')}, "
                        f"{have.get('dtype')}): remove it or choose another output dir")
    return out


# Above this many bytes of weights a model is built one block at a time (_write_streamed): a 72B shape is 145 GB in
# bf16, more than one H200 holds and slow to initialise on a CPU; block by block it needs one layer of memory.
STREAM_ABOVE_BYTES = 16 * 2**30
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def build_random_model(shape: str, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16",
                       device: str = "cpu", stream: bool | None = None) -> Path:
    """Build `shape` with random init from `seed`, save it (safetensors + built-in tokenizer) to `out_dir`.

    The model is written into a temp dir next to `out_dir` and renamed into place, so `out_dir` is either absent or
    complete, and concurrent builders (e.g. every rank at start-up) cannot see half a model. An existing complete
    `out_dir` is returned as is. stream (None: above STREAM_ABOVE_BYTES of weights): initialise and write one block
    (embedding, decoder layer, norm, head) at a time; other random draws than a whole-model build of the same seed.
    """
    import torch
    import transformers
    from transformers import AutoConfig

    entry = get_shape(shape)
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype '{dtype}': choose one of {', '.join(_DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} but no CUDA device is visible: use --device cpu")
    out = Path(out_dir).expanduser().resolve()
    meta = {"shape": shape, "seed": seed, "dtype": dtype, "architecture": entry["architecture"],
            "param_count": param_count(entry), "built_with": f"transformers {transformers.__version__}"}
    if _is_complete(out):
        return _check_existing(out, meta)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a dist-dpo model dir (no {MARKER}): remove it or choose another")

    ids = _special_ids()
    kw = dict(entry["config"])
    # Token ids follow the bundled tokenizer (not the original model's), so generation stops at <|im_end|>. No
    # bos (the tokenizer has none; transformers would "align" it with a warning) and, like Qwen2.5's config, no
    # pad_token_id: it would become the embedding's padding_idx and zero that row at init.
    kw.update(bos_token_id=None, eos_token_id=ids["<|im_end|>"])
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    model_cls = getattr(transformers, entry["architecture"])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        dev = torch.device(device)
        if stream is None:
            stream = meta["param_count"] * torch.empty(0, dtype=getattr(torch, dtype)).element_size() > \
                STREAM_ABOVE_BYTES
        # fork_rng: seeding must not disturb the caller's RNG streams (e.g. a trainer seeded earlier).
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            if stream:
                _write_streamed(model_cls, config, getattr(torch, dtype), dev, tmp)
            else:
                # Allocate and initialise directly on the device in the target dtype: for a 7B shape on a GPU this
                # takes seconds, where a CPU fp32 init followed by a cast would take minutes and twice the memory.
                with dev:
                    model = model_cls._from_config(config, dtype=getattr(torch, dtype))  # post_init: _init_weights
                model.save_pretrained(tmp)
                del model
        for f in TOKENIZER_DIR.iterdir():
            shutil.copy2(f, tmp / f.name)
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, out)  # atomic; succeeds over an absent or empty dir only
        except OSError:
            if not _is_complete(out):
                raise
            # Another process won the race: its model is identical (same shape, seed, dtype), use it.
            shutil.rmtree(tmp, ignore_errors=True)
            return _check_existing(out, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _blocks(module, prefix: str = ""):
    """(name prefix, module) pieces that are initialised and written one at a time: an embedding, a decoder layer, a
    norm, the head. A ModuleList or a *Model module is opened up; modules without weights are skipped."""
    import torch

    if any(True for _ in module.parameters(recurse=False)):
        raise UserError(f"{type(module).__name__} holds weights of its own beside its blocks: no streamed build")
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, torch.nn.ModuleList) or type(child).__name__.endswith("Model"):
            yield from _blocks(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}.", child


def _write_streamed(model_cls, config, dtype, dev, out: Path) -> None:
    """transformers' save_pretrained layout (safetensors shards + index, config, generation config) written block by
    block from a model that lives on the meta device: transformers has no way to initialise and save a model larger
    than one device's memory, short of holding all of it."""
    import torch
    from transformers import GenerationConfig

    with torch.device("meta"):
        model = model_cls._from_config(config, dtype=dtype)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()

    def tensors():  # (name, CPU tensor), one block on `dev` at a time; a tied head is the embedding's
        with torch.no_grad():
            for prefix, block in _blocks(model):
                block.to_empty(device=dev)
                for m in block.modules():
                    model._init_weights(m)
                for name, t in block.state_dict().items():
                    if prefix + name not in tied:
                        yield prefix + name, t.detach().to("cpu", copy=True).contiguous()
                block.to("meta")

    out.mkdir(parents=True)
    written, shard, shard_bytes, total = [], {}, 0, 0
    for key, t in tensors():
        if shard and shard_bytes + t.nbytes > SHARD_BYTES:
            written.append(_save_shard(out, len(written), shard))
            shard, shard_bytes = {}, 0
        shard[key] = t
        shard_bytes += t.nbytes
        total += t.nbytes
    written.append(_save_shard(out, len(written), shard))
    n = len(written)
    if n == 1:
        written[0][0].rename(out / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, keys) in enumerate(written, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(out / final)
            weight_map.update({k: final for k in keys})
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.dtype, config.architectures = dtype, [model_cls.__name__]  # what save_pretrained records
    config.save_pretrained(out)
    if model.can_generate():
        GenerationConfig.from_model_config(config).save_pretrained(out)


def _save_shard(out: Path, i: int, tensors: dict) -> tuple[Path, list[str]]:
    from safetensors.torch import save_file

    path = out / f"shard-{i:05d}.safetensors"  # renamed model-0000i-of-0000N once N is known
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, list(tensors)


BUILTIN_SHAPES = tuple(FAMILY_SHAPES)  # BUILTIN_SHAPE among them; what `builtin:<shape>` may name


def builtin_model_dir(cache_dir: str | Path | None = None, shape: str = BUILTIN_SHAPE) -> Path:
    root = cache_dir or os.environ.get("DIST_DPO_CACHE") or Path.home() / ".cache" / "dist_dpo"
    return Path(root).expanduser() / "models" / (BUILTIN_DIRNAME if shape == BUILTIN_SHAPE else f"{shape}-v1")


def ensure_builtin_model(cache_dir: str | Path | None = None, shape: str = BUILTIN_SHAPE) -> Path:
    """Path of a built-in tiny model (fp32, seed 0; `shape`: the default tiny Qwen2 or a tiny model of another
    family, FAMILY_SHAPES), built on first use under `cache_dir` / $DIST_DPO_CACHE / ~/.cache/dist_dpo. Safe when
    every rank calls it at once: each builds privately and renames atomically; the losers use the winner's copy
    (bit-identical anyway, since the build is seeded)."""
    if shape not in BUILTIN_SHAPES:
        raise UserError(f"unknown built-in model 'builtin:{shape}': choose one of "
                        + ", ".join(f"builtin:{s}" for s in BUILTIN_SHAPES))
    out = builtin_model_dir(cache_dir, shape)
    if _is_complete(out):
        return out
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Inside a process group transformers' save_pretrained writes on global rank 0 only, so a private build on
        # another rank would come out without weights: rank 0 builds, the rest wait for it.
        if dist.get_rank() == 0:
            build_random_model(shape, out, seed=0, dtype="float32", device="cpu")
        dist.barrier()
        if _is_complete(out):
            return out
    return build_random_model(shape, out, seed=0, dtype="float32", device="cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dist-dpo build-model",
                                description="Write a random-weight model of a real shape (offline).")
    p.add_argument("--shape", help="one of: " + ", ".join(SHAPES))
    p.add_argument("--out", help="output dir (must be absent, empty, or hold the same model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    p.add_argument("--device", default="cpu", help="where to initialise: cpu, cuda, cuda:1 ...")
    p.add_argument("--stream", default="auto", choices=("auto", "true", "false"),
                   help="initialise and write one block at a time (auto: above 16 GiB of weights, e.g. 14B+ in bf16)")
    p.add_argument("--list", action="store_true", help="print the shapes with their parameter counts")
    a = p.parse_args(argv)
    if a.list:
        for name, entry in SHAPES.items():
            n = param_count(entry)
            size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
            print(f"{name:14s} {entry['architecture']:18s} {size:>7s}  ({n:,} params)")
        return 0
    if not a.shape or not a.out:
        raise UserError("build-model needs --shape and --out (or --list to see the shapes)")
    get_shape(a.shape)  # fail on a bad name before importing torch
    path = build_random_model(a.shape, a.out, seed=a.seed, dtype=a.dtype, device=a.device,
                              stream={"auto": None, "true": True, "false": False}[a.stream])
    print(path)
    return 0
