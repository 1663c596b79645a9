"""trl prepares datasets on the main process first so the others can reuse its cache files; dist-dpo lets every rank
prepare an in-memory dataset (which has no cache files) at once, and keeps trl's order for file-backed ones."""

import contextlib

import datasets
import pytest
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


def test_file_backed_dataset_is_tokenized_by_the_main_process_with_every_cpu(tmp_path, monkeypatch):
    """trl's order stays (the main process alone, the others read its cache files), with workers sized for the whole
    machine; the trainer's own args keep the user's value."""
    import dist_dpo.data as data

    path = tmp_path / "d.jsonl"
    path.write_text("".join('{"prompt": "%s", "chosen": "b", "rejected": "c"}\n' % ("a" * 50) for _ in range(40)))
    ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    seen = {}

    class Recording(FakeTrl):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            seen["procs"] = args.dataset_num_proc
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    class Trainer2(TokenizeAcrossRanks, Recording):
        pass

    monkeypatch.setattr(data, "TOKENIZE_CHARS_PER_PROC", 500)  # 40 rows x ~53 characters -> 4 workers at most
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the main process tokenizes alone: all 3 CPUs, not half
    args = _Args(None)
    t = Trainer2()
    t._prepare_dataset(ds, None, args, "train")
    assert seen["procs"] == 3 and args.dataset_num_proc is None
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


def test_tokenize_procs_gives_each_rank_its_share_of_the_cpus_and_keeps_small_sets_in_process():
    from dist_dpo.data import tokenize_procs

    var6k, fixed2048, builtin = 7_182_170, 5_087_639, 120_000  # characters of text
    assert tokenize_procs(var6k, cpus=32, local_ranks=1) == 8  # capped
    assert tokenize_procs(var6k // 2, cpus=32, local_ranks=2) == 8  # a rank's half: 16 cpus, 8 x 400 k chars
    assert tokenize_procs(var6k // 2, cpus=8, local_ranks=2) == 4  # 8 CPUs shared by 2 ranks
    assert tokenize_procs(fixed2048, cpus=16, local_ranks=1) == 8  # 256 long pairs are as much work
    assert tokenize_procs(1_000_000, cpus=16, local_ranks=1) == 2
    assert tokenize_procs(var6k, cpus=2, local_ranks=2) is None  # one core per rank: no workers
    assert tokenize_procs(builtin, cpus=16, local_ranks=1) is None  # a worker's start costs more than it saves


def test_tokenize_args_keep_the_users_value_and_count_a_pinned_ranks_cpus_once(monkeypatch):
    import dist_dpo.data as data
    from dist_dpo import cpu_pinning

    ds = datasets.Dataset.from_list([{"prompt": "p" * 1000}] * 40)  # 40 k characters
    monkeypatch.setattr(data, "TOKENIZE_CHARS_PER_PROC", 5_000)  # -> 8 workers at most
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data._tokenize_args(_Args(3), ds).dataset_num_proc == 3  # the user's dataset_num_proc (dpo_extra) wins
    args = _Args(None)
    assert data._tokenize_args(args, ds).dataset_num_proc == 4 and args.dataset_num_proc is None  # 8 CPUs, 2 ranks
    monkeypatch.setattr(cpu_pinning, "PINNED", list(range(8)))
    assert data._tokenize_args(args, ds).dataset_num_proc == 8  # these 8 are this rank's own


def test_text_chars_counts_strings_and_chat_messages():
    from dist_dpo.data import text_chars

    rows = [{"prompt": [{"role": "user", "content": "abc"}], "chosen": "de", "rejected": [{"role": "a", "content": "f"}]}
            for _ in range(1000)]
    ds = datasets.Dataset.from_list(rows)
    assert text_chars(ds) == 1000 * (3 + 4 + 2 + 1 + 1)  # role names are text too (the template renders them)
    assert text_chars(ds.select([])) == 0


class _Args:
    def __init__(self, num_proc):
        self.dataset_num_proc, self.max_length, self.truncation_mode = num_proc, 64, "keep_start"


def test_tokenizing_in_worker_processes_gives_trls_rows_and_leaves_the_users_args_alone(monkeypatch):
    """trl's own tokenization, in-process vs in 2 workers (what tokenize_procs picks on a 2-core machine given
    enough rows): the same rows in the same order."""
    import dist_dpo.data as data
    from dist_dpo.model_zoo import TOKENIZER_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))

    class Real(TokenizeAcrossRanks, dpo_module.DPOTrainer):
        def __init__(self):  # only what _prepare_dataset reads
            self._tokenizer = tok

    # plain-text pairs: trl's own tokenization (tokenize_pairs covers chat messages only)
    rows = [{"prompt": f"question {i} " + "word " * (i % 7), "chosen": "yes " * (1 + i % 5),
             "rejected": "no " * (1 + i % 3)} for i in range(40)]
    ds = datasets.Dataset.from_list(rows)
    assert data.tokenize_pairs(ds, tok, _Args(None)) is None
    in_process = Real()._prepare_dataset(ds, tok, _Args(None), "train").to_list()
    monkeypatch.setattr(data, "TOKENIZE_CHARS_PER_PROC", data.text_chars(ds) // 2)  # -> 2 workers
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0, 1})
    args = _Args(None)
    assert data._tokenize_args(_Args(None), ds).dataset_num_proc == 2
    in_workers = Real()._prepare_dataset(ds, tok, args, "train").to_list()
    assert args.dataset_num_proc is None
    assert in_workers == in_process and len(in_process) == 40 and in_process[0]["chosen_ids"]


@pytest.mark.parametrize("chunk_rows", [4096, 7])
def test_batched_tokenization_gives_trls_rows(monkeypatch, chunk_rows):
    """data.tokenize_pairs (three batched tokenizer calls per chunk of rows) vs trl's own row-by-row map on chat
    pairs: the same columns, values, types and rows dropped (prompts at or over max_length), with and without a
    system prompt, in one chunk or several; the tokenizer's threads are on only during the calls."""
    import os

    import dist_dpo.data as data
    from dist_dpo.model_zoo import TOKENIZER_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))

    class Plain(dpo_module.DPOTrainer):
        def __init__(self):  # only what _prepare_dataset reads
            self._tokenizer = tok

    def row(i):
        system = [{"role": "system", "content": "be brief " * (i % 3)}] if i % 2 else []
        return {"prompt": system + [{"role": "user", "content": f"question {i} " + "word " * (i * 3 % 40)}],
                "chosen": [{"role": "assistant", "content": "yes, " * (1 + i % 5)}],
                "rejected": [{"role": "assistant", "content": "no. " * (1 + i % 3)}], "id": i}

    ds = datasets.Dataset.from_list([row(i) for i in range(30)])
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_ROWS", chunk_rows)
    threads = []
    real = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template",
                        lambda *a, **k: threads.append(os.environ.get("TOKENIZERS_PARALLELISM")) or real(*a, **k))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    ours = data.tokenize_pairs(ds, tok, _Args(None))
    assert threads == ["true"] * 3 * -(-30 // chunk_rows) and os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.setattr(tok, "apply_chat_template", real)
    theirs = Plain()._prepare_dataset(ds, tok, _Args(None), "train")
    assert 0 < len(theirs) < len(ds)  # max_length 64 drops the long prompts
    assert ours.to_list() == theirs.to_list()
    assert ours.features == theirs.features


@pytest.mark.parametrize("chunk_rows", [4096, 2])
def test_pairs_whose_prompt_fills_max_length_are_dropped_by_their_token_count(monkeypatch, chunk_rows):
    """data._drop_overlong measures every prompt in one batched call: the rows kept are those whose prompt (chat
    template with the generation prompt, or plain text) leaves MIN_ANSWER_TOKENS inside max_length, per row."""
    import dist_dpo.data as data
    from dist_dpo.data import MIN_ANSWER_TOKENS, _drop_overlong, to_chat
    from dist_dpo.model_zoo import TOKENIZER_DIR
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    monkeypatch.setattr(data, "TOKENIZE_CHUNK_ROWS", chunk_rows)
    plain = [{"prompt": "word " * n, "chosen": "a", "rejected": "b"} for n in (1, 30, 5, 60, 12)]
    for rows in (plain, [to_chat(r, "sys") for r in plain]):
        ds = datasets.Dataset.from_list(rows).select([4, 3, 2, 1, 0])  # an indices mapping, as after a split
        lengths = [len(tok.apply_chat_template(r["prompt"], tokenize=True, return_dict=True,
                                               add_generation_prompt=True)["input_ids"])
                   if isinstance(r["prompt"], list) else len(tok(r["prompt"])["input_ids"]) for r in ds]
        max_length = sorted(lengths)[2] + MIN_ANSWER_TOKENS  # the 3 shortest prompts fit
        kept = _drop_overlong(ds, tok, max_length, "set")
        assert kept.to_list() == [r for r, n in zip(ds, lengths) if n <= max_length - MIN_ANSWER_TOKENS]
        assert len(kept) == 3
