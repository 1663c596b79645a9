"""trl prepares datasets on the main process first so the others can reuse its cache files; dist-dpo lets every rank
prepare an in-memory dataset (which has no cache files) at once, and keeps trl's order for file-backed ones."""

import contextlib

import datasets
import trl.trainer.dpo_trainer as dpo_module

from dist_dpo.data import TokenizeAcrossRanks


class FakeTrl:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        with dpo_module.global_then_local_main_first() as _:
            self.ordering = dpo_module.global_then_local_main_first
        return dataset


class Trainer(TokenizeAcrossRanks, FakeTrl):
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


class MappingTrl:
    """Stands in for trl's tokenization: a row-wise map (rank 1 fails on demand)."""

    fail_on_rank = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == self.fail_on_rank:
            raise ValueError("bad row")
        mapped = dataset.map(lambda r: {"prompt_ids": [len(r["prompt"])] * 3, "n": len(r["chosen"])})
        return mapped.filter(lambda r: r["n"] != 6)  # trl drops rows too (an indices mapping over the table)


class ShardingTrainer(TokenizeAcrossRanks, MappingTrl):
    pass


def _two_ranks(rank, port, fail_on_rank, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = ShardingTrainer()
    t.fail_on_rank = fail_on_rank
    ds = datasets.Dataset.from_list([{"prompt": "p" * i, "chosen": "c" * (2 * i), "rejected": "r"} for i in range(7)])
    try:
        got = t._prepare_dataset(ds, None, None, "train")
        result = {"rows": got.to_list(), "features": str(got.features)}
    except Exception as e:  # noqa: BLE001
        result = {"error": f"{type(e).__name__}: {e}"}
    (out / f"rank{rank}.json").write_text(__import__("json").dumps(result))
    dist.destroy_process_group()


def _run_two_ranks(tmp_path, fail_on_rank):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_two_ranks, args=(port, fail_on_rank, tmp_path), nprocs=2, start_method="fork")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_each_tokenize_half_and_get_the_whole_dataset_in_order(tmp_path):
    ds = datasets.Dataset.from_list([{"prompt": "p" * i, "chosen": "c" * (2 * i), "rejected": "r"} for i in range(7)])
    want = MappingTrl()._prepare_dataset(ds, None, None, "train")
    ranks = _run_two_ranks(tmp_path, None)
    for got in ranks:
        assert got["rows"] == want.to_list()
        assert got["features"] == str(want.features)


def test_a_part_failing_on_one_rank_fails_every_rank_instead_of_hanging(tmp_path):
    ranks = _run_two_ranks(tmp_path, 1)
    assert ranks[1]["error"] == "ValueError: bad row"
    assert ranks[0]["error"] == "RuntimeError: tokenizing train failed on another rank: ValueError: bad row"
