"""The upstream internals dist-dpo relies on (dist_dpo/upstream/) exist at the installed versions, with the
parameters it uses; a rename fails here, in CI, not in a user's training run; and no private upstream name is used
without being listed."""

from __future__ import annotations

import inspect
import re

import pytest

from conftest import ROOT
from dist_dpo import upstream


def test_every_registered_internal_holds_at_the_installed_versions():
    assert upstream.problems() == []


def test_a_renamed_constant_fails_the_contract(monkeypatch):
    import trl.trainer.utils

    monkeypatch.delattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")
    found = upstream.problems()
    assert len(found) == 1 and "trl.trainer.utils:_CHUNKED_LOGPROB_CHUNK_SIZE" in found[0] and "missing" in found[0]
    assert "speed/head.py" in found[0] and upstream.TRL in found[0]


def test_a_changed_signature_fails_the_contract(monkeypatch):
    import transformers

    def _save_checkpoint(self, model, trial, metrics=None):  # an argument inserted before `trial` would break us;
        pass                                                  # one added after it would not

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", _save_checkpoint)
    assert upstream.problems() == []

    def moved(self, trial, model):
        pass

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", moved)
    found = upstream.problems()
    assert len(found) == 1 and "Trainer._save_checkpoint" in found[0] and "('self', 'trial', 'model')" in found[0]


def test_a_method_gone_from_the_trainer_fails_the_contract(monkeypatch):
    import trl

    monkeypatch.delattr(trl.DPOTrainer, "_prepare_dataset")
    assert any("DPOTrainer._prepare_dataset" in p and "missing" in p for p in upstream.problems())


def test_an_instance_attribute_no_longer_set_fails_the_contract():
    entry = upstream.Internal("trl:DPOTrainer._renamed_metrics", "read", "speed/loss.py", "test", upstream.TRL,
                              set_by_source=True)
    assert "no longer set by its owner" in upstream.problem(entry)
    assert upstream.problem(upstream.Internal("trl:DPOTrainer._metrics", "read", "speed/loss.py", "test",
                                              upstream.TRL, set_by_source=True)) is None


def test_every_loss_type_offered_is_a_branch_of_trls_loss():
    from trl import DPOTrainer

    from dist_dpo.config import TrainArgs

    source = inspect.getsource(DPOTrainer._compute_loss)
    choices = TrainArgs.__dataclass_fields__["loss_type"].metadata["choices"]
    assert [c for c in choices if f'"{c}"' not in source] == []


# Private names of our own (defined in dist_dpo), which the scan below must not take for upstream ones.
def _own_private_names() -> set[str]:
    names = set()
    for path in (ROOT / "dist_dpo").rglob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r"(?:def|class)\s+(_[A-Za-z]\w*)", text))
        names |= set(re.findall(r"^\s*(_[A-Za-z]\w*)\s*[:=]", text, re.M))
        names |= set(re.findall(r"self\.(_[A-Za-z]\w*)\s*=", text))
        names |= set(re.findall(r"\b(_dist_dpo_\w+)", text))  # what dist-dpo keeps on modules it installs pieces on
    return names


UPSTREAM_OWNERS = r"(?:super\(\)|trainer|zero|config|model_cls|model|aten|hf_ds|hf|masking_utils|DPOTrainer|Trainer|" \
                  r"dpo_module|torch)"


def test_no_private_upstream_name_is_used_without_being_registered():
    registered = {e.name for e in upstream.INTERNALS}
    own = _own_private_names()
    used = {}
    for path in (ROOT / "dist_dpo").rglob("*.py"):
        if path.parent.name == "upstream" and path.name == "__init__.py":
            continue
        code = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())  # comments name them too
        for name in re.findall(UPSTREAM_OWNERS + r"\.(_[A-Za-z]\w*)", code):
            used.setdefault(name, path.relative_to(ROOT))
        for names in re.findall(r"from (?:trl|transformers|peft|accelerate|deepspeed|torch)[\w.]* import ([^\n]+)", code):
            for name in re.findall(r"\b(_[A-Za-z]\w*)", names):
                used.setdefault(name, path.relative_to(ROOT))
        # module globals swapped: `<upstream module>.<name> = ...`
        for name in re.findall(r"\b(?:dpo_module|hf|hf_ds|torch)\.([A-Za-z]\w*)\s*=[^=]", code):
            used.setdefault(name, path.relative_to(ROOT))
    unlisted = {n: str(p) for n, p in used.items() if n not in registered and n not in own and not n.startswith("__")}
    assert unlisted == {}, "add these to dist_dpo/upstream/__init__.py (or stop using them)"


@pytest.mark.parametrize("entry", upstream.INTERNALS, ids=lambda e: e.target)
def test_each_entry_says_who_uses_it_and_why(entry):
    assert entry.use in ("override", "import", "read", "write", "swap") and entry.why and entry.written_for
    for module in entry.used_by.split(", "):
        assert (ROOT / "dist_dpo" / module).is_file(), module
        assert entry.name in (ROOT / "dist_dpo" / module).read_text(), f"{entry.name} is not in {module}"


def test_the_resume_path_dist_dpo_swaps_around_still_calls_deepspeeds_loader():
    from transformers import Trainer

    assert "deepspeed_load_checkpoint(" in inspect.getsource(Trainer._prepare_for_training)


def _modeling_module(model_type: str):
    import importlib
    import sys

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    import transformers

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    importlib.import_module(cls.__module__)
    return sys.modules[cls.__module__]


@pytest.mark.parametrize("family", [f for f in __import__("dist_dpo.architectures", fromlist=["x"]).ARCHITECTURE_TABLE
                                    if f.norm_classes or f.moe_block], ids=lambda f: f.model_types[0])
def test_the_classes_the_architecture_table_names_exist_with_the_forward_it_replaces(family):
    """speed/rms_norm.py replaces the forward of each family's norm classes with a one-tensor forward; ZeRO-3 makes the
    family's MoE block a leaf module by class. A class renamed or given another forward fails here."""
    found = set()
    for model_type in family.model_types:  # each model type has one of the classes (GLM-4's two have one each)
        module = _modeling_module(model_type)
        here = [name for name in family.norm_classes if getattr(module, name, None) is not None]
        assert here or not family.norm_classes, f"{module.__name__} has none of {family.norm_classes}"
        for name in here:
            cls = getattr(module, name)
            assert list(inspect.signature(cls.forward).parameters)[1:] in (["hidden_states"], ["x"]), name
        found.update(here)
    assert found == set(family.norm_classes), f"no model type of {family.name} has {set(family.norm_classes) - found}"
    if family.moe_block:
        assert any(hasattr(_modeling_module(t), family.moe_block) for t in family.model_types), family.moe_block
