"""trl prepares datasets on the main process first so the others can reuse its cache files; dist-dpo lets every rank
prepare an in-memory dataset (which has no cache files) at once, and keeps trl's order for file-backed ones."""

import contextlib

import datasets
import trl.trainer.dpo_trainer as dpo_module

from dist_dpo.data import TokenizeOnEveryRankAtOnce


class FakeTrl:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        with dpo_module.global_then_local_main_first() as _:
            self.ordering = dpo_module.global_then_local_main_first
        return dataset


class Trainer(TokenizeOnEveryRankAtOnce, FakeTrl):
    pass


def test_in_memory_dataset_is_prepared_by_every_rank_at_once():
    trl_order = dpo_module.global_then_local_main_first
    t = Trainer()
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    assert not ds.cache_files
    assert t._prepare_dataset(ds, None, None, "train") is ds
    assert t.ordering is contextlib.nullcontext
    assert dpo_module.global_then_local_main_first is trl_order  # restored


def test_file_backed_dataset_keeps_trls_order(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.cache_files
    t = Trainer()
    t._prepare_dataset(ds, None, None, "train")
    assert t.ordering is dpo_module.global_then_local_main_first
