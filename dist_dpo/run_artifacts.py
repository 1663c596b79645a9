"""What a training run left behind, and loading it back for inference: the recipe (resolved_config.yaml), the LoRA
adapter and the base model it belongs to, or a full (merged) model. Shared by `chat`, `merge` and `eval`.

A directory is one of:
  run dir      adapter_config.json + resolved_config.yaml (what `dist-dpo train` writes)
  adapter dir  adapter_config.json alone (the base is the one the adapter records)
  model dir    config.json + weights: a merged model (`dist-dpo merge` copies the recipe next to it) or any model
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from dist_dpo.config import BUILTIN_MODEL, ModelArgs, Recipe
from dist_dpo.errors import UserError

RECIPE_FILE = "resolved_config.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CommandParser(argparse.ArgumentParser):
    """argparse, but a bad option is a one-line UserError (exit 2) like every other mistake."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


@dataclass
class RunArtifacts:
    path: Path | None  # None: a base model alone, named on the command line
    recipe: Recipe | None  # the run's resolved recipe, when the dir carries one
    adapter_dir: Path | None  # holds adapter_config.json
    model_dir: Path | None  # a full model: merged, or trained without LoRA
    adapter_base: str | None  # base_model_name_or_path recorded by peft in adapter_config.json

    @property
    def system_prompt(self) -> str | None:
        return self.recipe.data.system_prompt if self.recipe else None

    @property
    def trained_base(self) -> str | None:
        """The base model name as the run knows it: the recipe's, else the adapter's record."""
        if self.recipe:
            return self.recipe.model.model_name_or_path
        return self.adapter_base


def load_recipe(path: Path) -> Recipe:
    from dist_dpo.config import parse_recipe

    # A finished run's resume target (a checkpoint path) may be gone by now; it is irrelevant after training.
    return parse_recipe(["--config", str(path), "--resume", "never"])


def locate(path: str) -> RunArtifacts:
    """Classify `path` (run dir, adapter dir or model dir); a UserError says what is missing and what to pass."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"'{path}' does not exist: pass a run dir (train output_dir), an adapter dir or a model dir")
    if not p.is_dir():
        raise UserError(f"'{path}' is a file: pass the directory that holds it")
    recipe = load_recipe(p / RECIPE_FILE) if (p / RECIPE_FILE).is_file() else None
    if (p / ADAPTER_CONFIG).is_file():
        if not (p / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{p} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the adapter save is incomplete")
        try:
            base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as e:
            raise UserError(f"{p / ADAPTER_CONFIG} is not valid JSON (line {e.lineno}): re-save the adapter") from None
        return RunArtifacts(p, recipe, p, None, base)
    if (p / "config.json").is_file():
        return RunArtifacts(p, recipe, None, p, None)
    hint = ""
    if recipe is not None:
        hint = " (training did not finish: resume it, or point at a checkpoint-N dir inside it)"
    raise UserError(f"{p} holds no adapter ({ADAPTER_CONFIG}) and no model (config.json){hint}")


def base_alone(name: str) -> RunArtifacts:
    return RunArtifacts(None, None, None, None, name)


def same_model(a: str, b: str) -> bool:
    # The same model often lives under another path (another cache dir, a local copy of a hub id): the last path
    # component names it. Shapes are checked separately, so a false match cannot load a wrong adapter.
    return a == b or Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


def resolve_base(art: RunArtifacts, base_override: str | None) -> str:
    """The base model path to load under the adapter, after checking it is the one the adapter was trained on."""
    from dist_dpo.modeling import resolve_model_path

    recorded = art.adapter_base
    if art.recipe and recorded:
        wanted = art.recipe.model.model_name_or_path
        resolved = resolve_model_path(wanted) if wanted == BUILTIN_MODEL else wanted
        if not (same_model(recorded, wanted) or same_model(recorded, resolved)):
            raise UserError(
                f"{art.path}: {ADAPTER_CONFIG} records base '{recorded}' but {RECIPE_FILE} trained on '{wanted}': "
                "the adapter does not belong to this run; point at the run's own output_dir"
            )
    name = base_override or art.trained_base
    if not name:
        raise UserError(f"{art.path}: {ADAPTER_CONFIG} records no base_model_name_or_path: pass --base MODEL")
    path = resolve_model_path(name)
    if base_override and recorded:
        if not any(same_model(x, y) for x in (base_override, path) for y in (recorded, art.trained_base or recorded)):
            raise UserError(
                f"the adapter in {art.path} was trained on '{art.trained_base or recorded}', not '{base_override}': "
                "drop --base, or pass the model it was trained on"
            )
    return path


def check_adapter_fits(adapter_dir: Path, model) -> None:
    """Every LoRA matrix must sit on a module of the base with matching in/out features. peft would otherwise fail
    with a size-mismatch traceback, or silently skip modules whose names do not exist."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as f:
        for key in f.keys():
            for part, dim, attr in ((".lora_A.", 1, "in_features"), (".lora_B.", 0, "out_features")):
                if part not in key:
                    continue
                name = key.split(part)[0].removeprefix("base_model.model.")
                module = modules.get(name)
                want = getattr(module, attr, None)
                have = f.get_slice(key).get_shape()[dim]
                if module is None or want != have:
                    found = "no such module" if module is None else f"{attr}={want}"
                    raise UserError(
                        f"adapter {adapter_dir} does not fit base '{model.config.name_or_path}': {name} expects "
                        f"{attr}={have}, base has {found}; pass the base model the adapter was trained on (--base)"
                    )


def inference_device_dtype(dtype_name: str = "auto"):
    """(device, dtype) for one process: the project's dtype policy (modeling.resolve_dtype) on this machine."""
    from dist_dpo.modeling import resolve_dtype
    from dist_dpo.runtime import resolve_runtime

    rt = resolve_runtime()
    return rt.device_type, resolve_dtype(ModelArgs(dtype=dtype_name), rt)


def load_base(path: str, *, dtype, device: str, load_in_4bit: bool = False, trust_remote_code: bool = False):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # a per-tensor bar on stderr, around our one-line errors
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        if device == "cpu":
            raise UserError("--load_in_4bit needs a CUDA GPU (bitsandbytes); drop it on CPU")
        from dist_dpo.modeling import quantization_config
        from dist_dpo.strategies import strategy_for

        kwargs["quantization_config"] = quantization_config(ModelArgs(load_in_4bit=True), strategy_for("single"), dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load model '{path}': {str(e).splitlines()[0]}") from None
    if not load_in_4bit:
        model.to(device)
    return model.eval()


def load_tokenizer_for(art: RunArtifacts, model_path: str):
    """The run saved its tokenizer (pad token and chat template as trained); else the base's."""
    from dist_dpo.modeling import load_tokenizer

    own = art.path if art.path and (art.path / "tokenizer_config.json").is_file() else None
    m = art.recipe.model if art.recipe else ModelArgs()
    tok_path = str(own) if own else (m.tokenizer_name_or_path or model_path)
    return load_tokenizer(ModelArgs(tokenizer_name_or_path=tok_path, trust_remote_code=m.trust_remote_code), tok_path)


def load_for_inference(art: RunArtifacts, *, base: str | None = None, base_only: bool = False, dtype_name="auto",
                       load_in_4bit: bool = False):
    """(model, tokenizer, description). An adapter is put on its base with peft; `base_only` leaves it off."""
    trust = bool(art.recipe and art.recipe.model.trust_remote_code)
    device, dtype = inference_device_dtype(dtype_name)
    if art.model_dir is not None and not base_only:
        model = load_base(str(art.model_dir), dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                          trust_remote_code=trust)
        return model, load_tokenizer_for(art, str(art.model_dir)), f"model {art.model_dir} on {device}"
    if art.adapter_dir is not None:
        path = resolve_base(art, base)
    elif base or art.trained_base:
        from dist_dpo.modeling import resolve_model_path

        path = resolve_model_path(base or art.trained_base)
    else:
        raise UserError(f"{art.path} records no base model: pass --base MODEL with --base-only")
    model = load_base(path, dtype=dtype, device=device, load_in_4bit=load_in_4bit, trust_remote_code=trust)
    tok = load_tokenizer_for(art, path)
    if base_only or art.adapter_dir is None:
        return model, tok, f"base {path} (no adapter) on {device}"
    check_adapter_fits(art.adapter_dir, model)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(art.adapter_dir))
    return model.eval(), tok, f"base {path} + adapter {art.adapter_dir} on {device}"
