"""Train the built-in byte-level BPE tokenizer (offline, deterministic) and save it for transformers.

Modeled on Qwen2's tokenizer so the built-in tiny model behaves like the real thing: the same pre-tokenizer regex,
byte-level BPE (any UTF-8 text encodes, no <unk>), the special tokens `<|endoftext|>` (pad) / `<|im_start|>` /
`<|im_end|>` (eos), and a ChatML chat template. Only the vocabulary is small (4096), trained on the bundled data.

    python dist_dpo/assets/make_tokenizer.py     # run make_data.py first; rewrites assets/tokenizer/
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

HERE = Path(__file__).resolve().parent
OUT = HERE / "tokenizer"
VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
# Qwen2's pre-tokenizer split (from its tokenizer.json): words, single digits, punctuation runs, newlines.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with Qwen2.5's semantics (system / user / assistant turns, tool calls, tool responses, generation prompt),
# minus one thing: Qwen2.5 inserts "You are Qwen, created by Alibaba Cloud..." when there is no system message; we
# render no system turn at all. `{% generation %}` marks assistant tokens for SFT's assistant-only loss (as trl's
# qwen2_5_training.jinja does); it does not change the rendered text.
# trl's DPOTrainer needs render(prompt, add_generation_prompt=True) to be a token prefix of render(prompt + answer):
# it finds the completion where the two diverge. ChatML gives that: the generation prompt "<|im_start|>assistant\n"
# is exactly how an assistant turn starts, and the "\n" never merges with the answer's first token (the regex keeps
# newlines apart from letters), so the prompt is never cut short.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>assistant' }}
        {%- generation %}
        {%- if message.content or not message.tool_calls %}
            {{- '\\n' + (message.content or '') }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
        {%- endgeneration %}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def corpus() -> list[str]:
    """Every string of the bundled data, plus the chat-template scaffolding so role names get their own merges."""
    texts = ["system\n", "user\n", "assistant\n", "<tool_call>\n", "</tool_call>", "<tool_response>\n"]
    for path in sorted((HERE / "data").rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for v in row.values():
                texts += [m["content"] for m in v] if isinstance(v, list) else [v]
    return texts


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=False))  # byte-level: every byte is in the base alphabet
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        # A tiny corpus would otherwise learn whole sentences as single tokens (a run of CJK characters is one
        # pre-token); capping token length keeps the vocab to reusable pieces of 1-4 characters. 500 rows then run
        # out of pairs seen twice before 4096 tokens, so min_frequency=1 fills the vocab.
        max_token_length=12,
        min_frequency=1,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus never uses
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    tok = build()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    shutil.rmtree(OUT, ignore_errors=True)
    hf.save_pretrained(str(OUT))
    print(f"wrote {OUT} (vocab {len(hf)}): {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
