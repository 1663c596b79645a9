"""Decoder layers through torch.compile: fewer kernel launches and less Python per step on short rows.

A step on short pairs is host-bound: the GPU waits while Python walks each layer's modules (peft's LoRA wrappers,
the attention code) and launches ~1,900 small kernels. Compiled, each decoder layer is one graph per grad mode
(the policy's forward with gradients, the reference's without): the compiler fuses the elementwise work around
LoRA, the norms and RoPE, and one guard check replaces the Python of a layer's submodules.

Shapes are dynamic (`dynamic=True`): packed and shared rows change length every step, and one graph serves them
all. q/k/v stay three projections (speed/fused_qkv.py keeps Python state across calls, which a graph cannot hold;
the compiler sees the three matmuls). The layers' parameters are graph inputs (torch's default), so one compiled
graph serves every layer of a model.

Opt-in for measuring (`DIST_DPO_AB_COMPILE=layers`, dist_dpo/ab_switches.py): it is kept only where the
benchmark's A/B rows show it winning, compile time included.
"""

from __future__ import annotations

BACKEND = "inductor"  # torch.compile's backend; the CPU tests use "aot_eager" (the same graphs, no code generation)


def decoder_layers(model) -> list:
    """The decoder layers of a causal LM (transformers' `get_decoder().layers`), or [] where it has none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return list(layers) if layers is not None else []


def install(model) -> int:
    """Compile every decoder layer of `model` in place (nn.Module.compile); returns how many. Twice changes nothing."""
    layers = decoder_layers(model)
    for layer in layers:
        if "_dist_dpo_compiled" not in layer.__dict__:
            layer.compile(dynamic=True, backend=BACKEND)
            layer._dist_dpo_compiled = True
    return len(layers)
