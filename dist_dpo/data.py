"""Preference data: load (built-in, a local file, a local directory or hub set through `datasets.load_dataset`, a
`save_to_disk` directory), validate with errors that name the file, row and field, and shape it for trl (only the
columns it reads; standard strings -> chat messages when a chat template applies).

trl validates nothing until it is deep inside tokenization, where a bad row surfaces as a KeyError on N ranks;
so we check every row up front.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from dist_dpo.config import BUILTIN_DATASET, DataArgs
from dist_dpo.errors import UserError
from dist_dpo.logs import get_logger

ASSETS = Path(__file__).resolve().parent / "assets" / "data"
_SUFFIX_LOADER = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant"}
MIN_ANSWER_TOKENS = 4  # a pair whose prompt leaves fewer answer tokens than this inside max_length teaches nothing


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not all(isinstance(r, dict) for r in data):
            raise UserError(f"{path}: expected a list of objects with prompt/chosen/rejected")
        return data
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: each line must be a JSON object with prompt/chosen/rejected")
        rows.append(row)
    return rows


def _load_file(path: Path):
    import datasets

    if path.suffix in (".json", ".jsonl"):
        rows = _read_jsonl(path)
        if not rows:
            raise UserError(f"{path}: the file has no rows")
        columns = sorted({k for r in rows for k in r})
        # Rows with missing keys become None so that validation can name the row instead of pyarrow failing.
        records = [{k: r.get(k) for k in columns} for r in rows]
        try:
            return datasets.Dataset.from_list(records)
        except (TypeError, ValueError) as e:  # pyarrow: one field with two types (a number among strings, ...)
            validate_rows(_Records(records, columns), str(path))  # names the row and field when it is one of ours
            raise UserError(f"{path}: a field mixes value types across rows ({str(e).splitlines()[0]}); "
                            "give every row the same type per field") from None
    try:
        return datasets.load_dataset(_SUFFIX_LOADER[path.suffix], data_files=str(path), split="train")
    except Exception as e:  # pyarrow/pandas parse errors have many types
        raise UserError(f"{path}: cannot read as {path.suffix[1:]}: {str(e).splitlines()[0]}") from None


class _Records(list):
    """Raw rows with the two things `validate_rows` reads from a datasets.Dataset."""

    def __init__(self, rows: list[dict], columns: list[str]):
        super().__init__(rows)
        self.column_names = columns


def _split_files(directory: Path) -> dict[str, Path]:
    """The built-in set's files: <split>.jsonl."""
    return {f.stem: f for f in sorted(directory.glob("*.jsonl"))}


FILE_BUILDERS = ("json", "csv", "parquet", "arrow")  # datasets' loaders for `data_files` alone


def load_raw(d: DataArgs) -> dict[str, Any]:
    """{split name: datasets.Dataset} from whatever `dataset_name` points at."""
    import datasets

    name = d.dataset_name
    if name == BUILTIN_DATASET:
        return {split: _load_file(f) for split, f in _split_files(ASSETS / "bad_boy").items()}
    if name.startswith("builtin:"):
        raise UserError(f"unknown built-in dataset '{name}': the built-in dataset is '{BUILTIN_DATASET}'")
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix not in _SUFFIX_LOADER:
            raise UserError(f"{p}: unsupported data file type; use .json, .jsonl, .csv or .parquet")
        return {d.train_split: _load_file(p)}
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():  # written by save_to_disk
            saved = datasets.load_from_disk(str(p))
            return dict(saved) if isinstance(saved, datasets.DatasetDict) else {d.train_split: saved}
        return _load_dir(p, d)
    if name in FILE_BUILDERS and d.data_files:
        return _load_dir(name, d)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"dataset '{name}' does not exist: pass a local file/dir, a hub id, or {BUILTIN_DATASET}")
    try:
        return dict(datasets.load_dataset(name, d.dataset_config, data_files=d.data_files))
    except Exception as e:
        raise UserError(f"cannot load dataset '{name}' from the hub or its cache: {str(e).splitlines()[0]}") from None


def _load_dir(path, d: DataArgs) -> dict[str, Any]:
    """A local directory the way datasets reads it: a hub snapshot (data/<split>-00000-of-00001.parquet, README.md
    configs), <split>.jsonl files, any split names, or `data_files`. When datasets fails, our own reader names the
    file and line it cannot read."""
    import datasets

    try:
        return dict(datasets.load_dataset(str(path), d.dataset_config, data_files=d.data_files))
    except Exception as e:  # noqa: BLE001 - pyarrow, json and datasets errors have many types
        failure = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    try:
        files = datasets.load_dataset_builder(str(path), d.dataset_config, data_files=d.data_files).config.data_files
    except Exception:  # noqa: BLE001
        files = None
    if not files:
        raise UserError(f"{path}: no data files datasets can read ({failure}); a local set is train/test "
                        ".jsonl/.json/.csv/.parquet files (also under data/, as hub downloads have them), a "
                        "save_to_disk directory, or name its files with data_files") from None
    for split_files in files.values():
        for f in split_files:
            if Path(f).suffix in _SUFFIX_LOADER:
                _load_file(Path(f))  # raises the UserError that names the file, line or field
    raise UserError(f"{path}: datasets cannot load it: {failure}") from None


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def validate_rows(ds, where: str) -> None:
    """Every row: chosen/rejected (and prompt) present, one format, non-empty, valid roles."""
    columns = set(ds.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise UserError(
            f"{where}: missing column(s) {missing}; found {sorted(columns)}. Preference data needs "
            "prompt/chosen/rejected (rename your columns or convert the file)"
        )
    if len(ds) == 0:
        raise UserError(f"{where}: the dataset is empty")
    has_prompt = "prompt" in columns
    identical = 0
    for i, row in enumerate(ds):
        fields = ["prompt", "chosen", "rejected"] if has_prompt else ["chosen", "rejected"]
        conversational = _is_messages(row["chosen"])
        for f in fields:
            v = row[f]
            if v is None:
                raise UserError(f"{where} row {i}: field '{f}' is missing")
            if conversational:
                if not _is_messages(v) or not v:
                    raise UserError(f"{where} row {i}: field '{f}' must be a non-empty list of chat messages")
                for m in v:
                    if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                        raise UserError(
                            f"{where} row {i}: field '{f}' has a message {json.dumps(m, ensure_ascii=False)[:80]}; "
                            "each message needs role system/user/assistant and string content"
                        )
                if f in ("chosen", "rejected") and has_prompt and v[-1]["role"] != "assistant":
                    raise UserError(f"{where} row {i}: field '{f}' must end with an assistant message")
                if f == "prompt" and v[-1]["role"] != "user":
                    raise UserError(f"{where} row {i}: the prompt must end with a user message")
            else:
                if not isinstance(v, str):
                    raise UserError(f"{where} row {i}: field '{f}' must be a string, got {type(v).__name__}")
                if not v.strip():
                    raise UserError(f"{where} row {i}: field '{f}' is empty")
        if row["chosen"] == row["rejected"]:
            identical += 1
    if identical == len(ds):
        raise UserError(f"{where}: chosen equals rejected on every row, so there is no preference to learn")
    if identical:
        get_logger().warning("%s: %d row(s) have chosen == rejected; they add no signal", where, identical)


TRL_COLUMNS = ("prompt", "chosen", "rejected", "images", "tools", "chat_template_kwargs")  # what trl's DPO reads


def _trl_columns(ds, where: str):
    """Validated rows with only the columns trl reads: scores, ids and message copies (UltraFeedback's
    score_chosen, prompt_id, messages) never reach tokenization."""
    if {"prompt", "chosen", "rejected"} <= set(ds.column_names) and _implicit_prompt_layout(ds):
        ds = ds.map(_split_implicit_prompt, remove_columns=[c for c in ds.column_names if c not in TRL_COLUMNS])
    validate_rows(ds, where)
    extra = [c for c in ds.column_names if c not in TRL_COLUMNS]
    return ds.remove_columns(extra) if extra else ds


def _implicit_prompt_layout(ds) -> bool:
    """A plain-text prompt beside chosen/rejected conversations (HuggingFaceH4/ultrafeedback_binarized)."""
    import datasets

    prompt, chosen = ds.features["prompt"], ds.features["chosen"]
    return (isinstance(prompt, datasets.Value) and prompt.dtype in ("string", "large_string")
            and isinstance(chosen, (list, datasets.List, datasets.LargeList)))


def _split_implicit_prompt(row: dict) -> dict:
    """The conversations repeat the prompt: their shared turns become the prompt (trl's extract_prompt), the rest
    the answers. Conversations of assistant turns only take the plain-text prompt as the user turn."""
    from trl.data_utils import extract_prompt

    chosen, rejected = row["chosen"], row["rejected"]
    whole = _is_messages(chosen) and _is_messages(rejected) and chosen and rejected
    if whole and chosen[0].get("role") != "assistant":
        return {**row, **extract_prompt({"chosen": chosen, "rejected": rejected})}
    # assistant turns only; a broken row too, so the column keeps one type and validate_rows names the row
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}


def to_chat(row: dict, system_prompt: str | None, fold: bool = False) -> dict:
    """Standard strings -> chat messages, so trl renders them with the tokenizer's chat template."""
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.append({"role": "user", "content": row["prompt"]})
    return {
        "prompt": fold_system(prompt) if fold else prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }


def refuses_system_role(tokenizer) -> bool:
    """Whether the chat template raises on a system message that it renders without one (Gemma's templates)."""
    user = [{"role": "user", "content": "hi"}]
    try:
        tokenizer.apply_chat_template(user, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that fails without a system turn is not this case
        return False
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}] + user, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's TemplateError or the template's raise_exception
        return True
    return False


def fold_system(messages: list) -> list:
    """A leading system message put in front of the first user turn (as Gemma's own templates do with one)."""
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0].get("role") == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}] + rest[1:]
    return [{"role": "user", "content": system}] + rest


def _fold_row(row: dict) -> dict:
    return {"prompt": fold_system(row["prompt"])}


def _drop_overlong(ds, tokenizer, max_length: int, where: str):
    """Drop pairs whose prompt fills max_length: trl keeps the start, so their answers would be cut to nothing."""

    lengths = []
    for begin in range(0, len(ds), TOKENIZE_CHUNK_ROWS):  # batched calls (one per row: ~0.2 ms each in Python)
        prompts = ds[begin:begin + TOKENIZE_CHUNK_ROWS]["prompt"]
        lengths += [len(p) for p in _token_ids(tokenizer, prompts, add_generation_prompt=True)]
    keep = [i for i, n in enumerate(lengths) if n <= max_length - MIN_ANSWER_TOKENS]
    if not keep:
        raise UserError(
            f"{where}: every prompt is longer than max_length={max_length} tokens; raise max_length or shorten prompts"
        )
    if len(keep) < len(ds):
        get_logger().warning(
            "%s: dropped %d of %d pairs whose prompt leaves < %d tokens for the answer at max_length=%d",
            where, len(ds) - len(keep), len(ds), MIN_ANSWER_TOKENS, max_length,
        )
        ds = ds.select(keep)
    return ds


def load_preference_data(d: DataArgs, tokenizer, max_length: int, seed: int):
    """(train, test) datasets, validated and in the format trl expects."""
    splits = load_raw(d)
    if d.train_split not in splits:
        raise UserError(f"dataset '{d.dataset_name}' has no split '{d.train_split}'; it has {sorted(splits)} "
                        "(set train_split / test_split)")
    train = _trl_columns(splits[d.train_split], f"{d.dataset_name} [{d.train_split}]")
    if d.test_split in splits:
        test = _trl_columns(splits[d.test_split], f"{d.dataset_name} [{d.test_split}]")
    else:
        if len(train) < 2:
            raise UserError(f"{d.dataset_name}: need at least 2 rows to hold out a test split")
        parts = train.train_test_split(test_size=d.test_size, seed=seed)
        train, test = parts["train"], parts["test"]
    if d.max_train_samples:
        train = train.select(range(min(d.max_train_samples, len(train))))
    if d.max_eval_samples:
        test = test.select(range(min(d.max_eval_samples, len(test))))
    standard = "prompt" in train.column_names and isinstance(train[0]["prompt"], str)
    templated = d.apply_chat_template and getattr(tokenizer, "chat_template", None)
    fold = bool(templated) and refuses_system_role(tokenizer)
    conversational = "prompt" in train.column_names and _is_messages(train[0]["prompt"])
    has_system = bool(d.system_prompt) if standard else conversational and any(
        m and m[0].get("role") == "system" for m in train[:64]["prompt"])  # looked at before folding
    if standard and templated:
        keep = ["prompt", "chosen", "rejected"]
        train = train.map(to_chat, fn_kwargs={"system_prompt": d.system_prompt, "fold": fold}, remove_columns=[
            c for c in train.column_names if c not in keep])
        test = test.map(to_chat, fn_kwargs={"system_prompt": d.system_prompt, "fold": fold}, remove_columns=[
            c for c in test.column_names if c not in keep])
    elif fold and conversational:
        train, test = train.map(_fold_row), test.map(_fold_row)
    if fold and has_system:
        get_logger().info("the chat template takes no system role: the system prompt goes in front of the first "
                          "user turn")
    if "prompt" in train.column_names:
        train = _drop_overlong(train, tokenizer, max_length, f"{d.dataset_name} [{d.train_split}]")
        test = _drop_overlong(test, tokenizer, max_length, f"{d.dataset_name} [{d.test_split}]")
    return train, test


class TokenizeAcrossRanks:
    """Mixin for trl's DPOTrainer: an in-memory dataset is tokenized in parts, one per rank, at once.

    trl runs its dataset preparation on the main process first and only then on the others
    (`global_then_local_main_first`), so that they can read the main process's cache files. A dataset read from a
    json/jsonl file (and the built-in one) lives in memory and has no cache files: the other ranks redo the same work
    after waiting for it, so every multi-GPU start paid the whole tokenization twice (~700 pairs/s on one CPU core).
    Here each rank tokenizes a contiguous 1/world of the rows and the parts are gathered back in order: the same
    dataset, in 1/world of the time, each part with `tokenize_pairs` (batched calls) where it applies. A rank whose
    part fails tells the others, so all raise instead of one waiting forever. With a file-backed dataset trl's order
    stays."""

    tokenize_seconds: float | None = None  # train.py logs it as its own part of the trainer's construction

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # mirrors trl's DPOTrainer method
        start = time.perf_counter()
        try:
            return self._prepare_parts(dataset, processing_class, args, dataset_name)
        finally:
            self.tokenize_seconds = (self.tokenize_seconds or 0.0) + time.perf_counter() - start

    def _prepare_parts(self, dataset, processing_class, args, dataset_name):
        import datasets
        import torch.distributed as dist
        import trl.trainer.dpo_trainer as dpo_module

        from dist_dpo.upstream.swaps import trl_tokenize_order_off

        known = hasattr(dpo_module, "global_then_local_main_first")  # trl 1.16's name; gone: trl's way
        if not known or not isinstance(dataset, datasets.Dataset):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if dataset.cache_files:  # trl's order: the main process tokenizes alone, the others read its cache files
            return super()._prepare_dataset(dataset, processing_class, _tokenize_args(args, dataset, alone=True),
                                            dataset_name)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        sharded = 1 < world <= len(dataset)  # the same decision on every rank: they hold the same rows
        if sharded:
            dataset = dataset.shard(num_shards=world, index=dist.get_rank(), contiguous=True)
        try:
            with trl_tokenize_order_off():
                part = tokenize_pairs(dataset, processing_class, args)
                if part is None:  # a layout the batched calls do not cover: trl's own, in worker processes
                    part = super()._prepare_dataset(dataset, processing_class, _tokenize_args(args, dataset),
                                                    dataset_name)
            failed = None
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            part, failed = e, f"{type(e).__name__}: {e}"
        if not sharded:
            if failed:
                raise part
            return part
        parts = [None] * world
        dist.all_gather_object(parts, failed or _arrow_bytes(part))
        if failed:
            raise part
        errors = [p for p in parts if isinstance(p, str)]
        if errors:
            raise RuntimeError(f"tokenizing {dataset_name} failed on another rank: {errors[0]}")
        return datasets.concatenate_datasets([_from_arrow_bytes(b) for b in parts])


def tokenize_pairs(dataset, tokenizer, args):
    """trl's tokenization of conversational pairs (DPOTrainer._prepare_dataset: prompt, prompt + chosen and prompt +
    rejected through the chat template, the completion from where they diverge, pairs whose prompt fills max_length
    dropped), with the same tokenizer call made once per column for TOKENIZE_CHUNK_ROWS rows at a time instead of
    three times per row: 0.38 instead of 0.75 s per 1,000 var6k pairs on this project's 2-core box, and no worker
    processes to start. None where trl's own is needed: plain-text pairs (trl appends EOS), tool or template
    arguments per row, processors."""
    import datasets
    import pyarrow as pa
    from transformers import PreTrainedTokenizerBase
    from trl.data_utils import is_conversational

    columns = set(dataset.column_names)
    if (not isinstance(tokenizer, PreTrainedTokenizerBase) or not {"prompt", "chosen", "rejected"} <= columns
            or columns & {"tools", "chat_template_kwargs", "images"} or len(dataset) == 0
            or not is_conversational(dataset[0])):
        return None
    # pyarrow directly: datasets' add_column hashes each new column for its fingerprint (2 s per 6k pairs)
    ints = pa.list_(pa.int64())  # what trl's map infers
    table = _table(dataset)
    parts, warned = [], False
    for begin in range(0, len(dataset), TOKENIZE_CHUNK_ROWS):  # token ids as Python ints: ~36 bytes each, so in chunks
        part = table.slice(begin, TOKENIZE_CHUNK_ROWS)
        prompt_ids, chosen_ids, rejected_ids, starts = _tokenize_chunk(tokenizer, part.select(
            ["prompt", "chosen", "rejected"]).to_pydict())
        diverged = next((i for i, (n, p) in enumerate(zip(starts, prompt_ids)) if n < len(p)), None)
        if diverged is not None and not warned:  # trl's warning, once
            warned = True
            get_logger().warning(
                "the tokenized prompt is not a prefix of the tokenized prompt+completion (row %d: the chat template "
                "renders the prompt alone differently, or tokens merge across the boundary); the completion starts "
                "where they diverge and %r is left out of the training sequence", begin + diverged,
                tokenizer.decode(prompt_ids[diverged][starts[diverged]:]))
        part = part.append_column("prompt_ids", pa.array([p[:n] for p, n in zip(prompt_ids, starts)], ints))
        part = part.append_column("chosen_ids", pa.array(chosen_ids, ints))
        part = part.append_column("rejected_ids", pa.array(rejected_ids, ints))
        if args.max_length is not None and args.truncation_mode == "keep_start":  # trl's filter: no answer token left
            keep = [i for i, n in enumerate(starts) if n < args.max_length]
            if len(keep) < len(starts):
                part = part.take(keep)
        parts.append(part)
    table = pa.concat_tables(parts)
    return datasets.Dataset(table)


TOKENIZE_CHUNK_ROWS = 4096  # pairs per batched call: bounded memory for 100k-pair sets, threads still kept busy


def _tokenize_chunk(tokenizer, chunk: dict):
    """prompt ids, chosen ids, rejected ids (the completions after the common prefix) and that prefix's length, per
    pair of `chunk` (columns of chat messages)."""
    from trl.data_utils import common_prefix_length

    prompts, chosen, rejected = chunk["prompt"], chunk["chosen"], chunk["rejected"]
    prompt_ids = _token_ids(tokenizer, prompts, add_generation_prompt=True)
    prompt_chosen = _token_ids(tokenizer, [p + c for p, c in zip(prompts, chosen)])
    prompt_rejected = _token_ids(tokenizer, [p + r for p, r in zip(prompts, rejected)])
    starts = [min(common_prefix_length(p, c), common_prefix_length(p, r))
              for p, c, r in zip(prompt_ids, prompt_chosen, prompt_rejected)]
    return (prompt_ids, [c[n:] for c, n in zip(prompt_chosen, starts)],
            [r[n:] for r, n in zip(prompt_rejected, starts)], starts)


def _token_ids(tokenizer, texts: list, **template_kwargs) -> list[list[int]]:
    """One batched tokenizer call, the Rust tokenizer's threads on: chat messages through the chat template (what
    trl's `_tokenize` calls per row), plain strings as they are."""
    with _tokenizer_threads():
        if _is_messages(texts[0]):
            return tokenizer.apply_chat_template(texts, tokenize=True, return_dict=True, **template_kwargs)["input_ids"]
        return tokenizer(texts)["input_ids"]


@contextlib.contextmanager
def _tokenizer_threads():
    """The Rust tokenizer's thread pool for one batched call. launch/env.sh sets TOKENIZERS_PARALLELISM=false because
    a process forked after the pool ran cannot use it; with the variable set again afterwards, a fork (dataloader
    workers, datasets' map) neither warns nor uses the pool."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = before if before is not None else "false"


# trl tokenizes row by row in Python: the chat template, then one encode call per text, ~1 us per character of text
# on one core (var6k's 6,144 pairs, 7.2 M characters: 8.9 s on an H200 host; 256 pairs of 2,048 tokens, 5.1 M
# characters: 7.5-8.6 s), and every epoch's end-to-end time pays it. trl's `dataset_num_proc` runs that map in worker
# processes; each costs ~0.3 s to start and feed, so a worker gets at least TOKENIZE_CHARS_PER_PROC characters.
TOKENIZE_CHARS_PER_PROC = 400_000
TOKENIZE_MAX_PROCS = 8
SAMPLE_ROWS = 256


def text_chars(dataset) -> int:
    """Characters of text in the dataset's rows (strings, chat messages), estimated from up to SAMPLE_ROWS rows
    spread over it: what tokenizing it costs."""
    n = len(dataset)
    if not n:
        return 0
    step = max(1, n // SAMPLE_ROWS)
    sample = dataset.select(range(0, n, step))

    def chars(value) -> int:
        if isinstance(value, str):
            return len(value)
        if isinstance(value, dict):
            return sum(chars(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(chars(v) for v in value)
        return 0

    return int(sum(chars(row) for row in sample) * n / len(sample))


def tokenize_procs(text: int, cpus: int, local_ranks: int) -> int | None:
    """Worker processes for tokenizing `text` characters: this rank's share of `cpus` (the `local_ranks` of one
    machine tokenize at once), at most one per TOKENIZE_CHARS_PER_PROC; None = in this process (trl's default)."""
    procs = min(cpus // max(local_ranks, 1), text // TOKENIZE_CHARS_PER_PROC, TOKENIZE_MAX_PROCS)
    return procs if procs >= 2 else None


def _tokenize_args(args, dataset, alone: bool = False):
    """args with trl's dataset_num_proc chosen for tokenizing `dataset` on this rank; the user's own value (dpo_extra)
    wins, and the trainer's args keep it. alone: the machine's other ranks wait meanwhile (trl's main-process-first
    order), so every CPU is this rank's - counted the same on every rank, since the cache files' names depend on it."""
    import copy

    from dist_dpo import cpu_pinning

    if getattr(args, "dataset_num_proc", None) is not None:
        return args
    pinned = bool(cpu_pinning.PINNED)  # a pinned rank's CPUs are its own share already
    cpus = os.cpu_count() if alone and pinned else len(os.sched_getaffinity(0))
    ranks = 1 if alone or pinned else int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    procs = tokenize_procs(text_chars(dataset), cpus, ranks)
    if procs is None:
        return args
    args = copy.copy(args)
    args.dataset_num_proc = procs
    return args


def _table(ds):
    """A dataset's rows as one pyarrow Table. trl filters rows and train_test_split picks them: an indices mapping
    over the full table, applied here by pyarrow (datasets' flatten_indices maps row by row: 1.6 s per 6k pairs)."""
    return ds.with_format("arrow")[:]


def _arrow_bytes(ds) -> bytes:
    """A dataset's rows as one Arrow IPC stream (its features ride in the schema): no Python objects per token."""
    import pyarrow as pa

    table = _table(ds)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_arrow_bytes(payload: bytes):
    import datasets
    import pyarrow as pa

    return datasets.Dataset(pa.ipc.open_stream(pa.py_buffer(payload)).read_all())
