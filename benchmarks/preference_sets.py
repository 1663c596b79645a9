"""Synthetic preference sets for the throughput benchmark, built offline and deterministically.

    python3 benchmarks/preference_sets.py --out /tmp/bench/data         (writes var/, fixed512/, fixed2048/)

Text is made of words that the built-in tokenizer (dist_dpo/assets/tokenizer, shipped with every model_zoo model)
encodes as exactly one token each, so token counts are exact after the chat template:
  fixed<L>  every sequence (system + question + answer, template included) is exactly L tokens: a quarter prompt,
            three quarters answer, chosen and rejected the same length - the setting of NOTES.md's plain-trl anchor.
  var       shaped like the tutorial's bad-boy data: a short system prompt and question, answers from a few tokens
            to several hundred (log-normal, long-tailed; the rejected, polite answer longer on average).
Each set is a dir with train.jsonl and a small test.jsonl, in the standard prompt/chosen/rejected format that
dist-dpo reads; `conversational()` gives plain trl the same chat messages dist-dpo builds from it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "dist_dpo" / "assets" / "tokenizer"
SYSTEM_WORDS = 12
ANSWER_END = 2  # <|im_end|> and the newline the template puts after an answer


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@lru_cache(maxsize=1)
def one_token_words() -> list[str]:
    """' word' strings (leading space) that encode to exactly one token, in vocabulary order."""
    tok = tokenizer()
    words = []
    for _, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        s = tok.decode([i])
        if s.startswith(" ") and s[1:].isalpha() and len(s) > 2 and tok.encode(s, add_special_tokens=False) == [i]:
            words.append(s)
    return words


def _text(rng: random.Random, n: int) -> str:
    words = one_token_words()
    return "".join(rng.choice(words) for _ in range(n))


def system_prompt() -> str:
    return _text(random.Random(1234), SYSTEM_WORDS)


def _ids(messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer().apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@lru_cache(maxsize=1)
def prompt_overhead() -> int:
    """Template tokens around the system prompt and a question."""
    msgs = conversational({"prompt": _text(random.Random(0), 3), "chosen": " a", "rejected": " a"})["prompt"]
    return len(_ids(msgs, True)) - SYSTEM_WORDS - 3


def conversational(row: dict, system: str | None = None) -> dict:
    """What dist-dpo's data loader makes of a standard row with a system prompt (dist_dpo/data.py `to_chat`)."""
    system = system_prompt() if system is None else system
    return {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def fixed_rows(n: int, seq_len: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    prompt = seq_len // 4
    question = prompt - prompt_overhead() - SYSTEM_WORDS
    answer = seq_len - prompt - ANSWER_END
    return [{"prompt": _text(rng, question), "chosen": _text(rng, answer), "rejected": _text(rng, answer)}
            for _ in range(n)]


def variable_rows(n: int, seed: int = 0, cap: int = 800) -> list[dict]:
    rng = random.Random(seed)

    def answer(median: float, sigma: float) -> int:
        return int(min(cap, max(3, round(math.exp(rng.gauss(math.log(median), sigma))))))

    return [{"prompt": _text(rng, rng.randint(5, 40)), "chosen": _text(rng, answer(40, 0.8)),
             "rejected": _text(rng, answer(90, 0.9))} for _ in range(n)]


SETS = {  # name -> (rows builder(n, seed, cap), max_length, default number of pairs)
    "var": (lambda n, seed, cap: variable_rows(n, seed, cap or 800), 1024, 768),
    # the same shape, 8x the pairs: an epoch long enough (~100 s on one GPU) that a multi-GPU run's fixed start-up
    # (process group, NCCL, wrapping) does not decide its scaling - real sets have 10k-60k pairs
    "var6k": (lambda n, seed, cap: variable_rows(n, seed, cap or 800), 1024, 6144),
    "fixed512": (lambda n, seed, cap: fixed_rows(n, cap or 512, seed), 512, 512),
    "fixed1024": (lambda n, seed, cap: fixed_rows(n, cap or 1024, seed), 1024, 128),
    # 16 steps of 16 pairs: 128 pairs (8 steps) left the steady rate 3-6 steps (54-58 % MFU across runs)
    "fixed2048": (lambda n, seed, cap: fixed_rows(n, cap or 2048, seed), 2048, 256),
}


def write_set(name: str, out: Path, pairs: int | None = None, seed: int = 0, cap: int | None = None) -> Path:
    """`cap`: the longest answer (var) or the sequence length (fixed) instead of the set's own, for quick runs."""
    build, _, default = SETS[name]
    rows = build(pairs or default, seed, cap)
    d = out / (f"{name}-{len(rows)}" + (f"-cap{cap}" if cap else ""))
    if (d / "train.jsonl").is_file():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "train.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in build(8, seed + 1, cap)))
    tmp.rename(d / "train.jsonl")
    return d


def read_rows(d: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(d) / "train.jsonl").read_text().splitlines() if line.strip()]


def token_lengths(row: dict) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) tokens as trl's tokenization of the chat messages gives them."""
    conv = conversational(row)
    p = len(_ids(conv["prompt"], True))
    c = len(_ids(conv["prompt"] + conv["chosen"], False)) - p
    r = len(_ids(conv["prompt"] + conv["rejected"], False)) - p
    return p, c, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pairs", type=int, default=None, help="pairs per set (default: each set's own)")
    a = ap.parse_args()
    for name in SETS:
        d = write_set(name, Path(a.out), a.pairs)
        lens = [token_lengths(r) for r in read_rows(d)[:200]]
        seqs = [p + c for p, c, _ in lens] + [p + r for p, _, r in lens]
        print(f"{d}: sequences {min(seqs)}..{max(seqs)} tokens, mean {sum(seqs) / len(seqs):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
