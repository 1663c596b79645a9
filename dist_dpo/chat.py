"""`dist-dpo chat RUN_DIR`: the tutorial's chat loop on a trained adapter, a merged model or the base alone.

    dist-dpo chat outputs/demo                   interactive: `change_system` swaps the system prompt, quit/exit leave
    dist-dpo chat outputs/demo --prompt "你好"    one answer per --prompt (repeatable), then exit
    echo "你好" | dist-dpo chat outputs/demo      stdin that is not a terminal: one prompt per line
    dist-dpo chat outputs/demo --base-only       the same loop on the run's base model, to compare

The system prompt defaults to the run's `data.system_prompt` (resolved_config.yaml). The tokenizer's chat template
builds every prompt; answers stream as they are generated. Transcripts go to stdout, status lines to stderr.
"""

from __future__ import annotations

import argparse
import sys
from threading import Thread

from dist_dpo.errors import UserError
from dist_dpo.run_artifacts import CommandParser, base_alone, load_for_inference, locate

QUIT = ("quit", "exit")
CHANGE_SYSTEM = "change_system"


def build_parser() -> CommandParser:
    p = CommandParser(prog="dist-dpo chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", help="Run dir (train output_dir), adapter dir or merged model dir.")
    p.add_argument("--base", help="Base model to put the adapter on (default: the one the run trained on).")
    p.add_argument("--base-only", "--base_only", dest="base_only", action="store_true",
                   help="Chat with the base model alone, without the adapter.")
    p.add_argument("--system", help="System prompt (default: the run's data.system_prompt). '' for none.")
    p.add_argument("--prompt", action="append", default=[], help="Answer this prompt and exit (repeatable).")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature.")
    p.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling: keep the top-p probability mass.")
    p.add_argument("--max_new_tokens", type=int, default=512, help="Longest answer, in tokens.")
    p.add_argument("--greedy", action="store_true", help="Greedy decoding (deterministic) instead of sampling.")
    p.add_argument("--seed", type=int, help="Seed the sampler, for repeatable answers.")
    p.add_argument("--load_in_4bit", action="store_true", help="Load the base in 4-bit NF4 (CUDA GPUs only).")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="Weights dtype: auto is bf16 on GPUs that have it, else fp16; fp32 on CPU.")
    return p


def scripted_prompts(a) -> list[str] | None:
    """--prompt values, or stdin lines when stdin is not a terminal; None means interactive."""
    if a.prompt:
        for i, text in enumerate(a.prompt, 1):
            if not text.strip():
                raise UserError(f"--prompt #{i} is empty: give the text to answer, e.g. --prompt \"你好\"")
        return a.prompt
    if sys.stdin is None or sys.stdin.isatty():
        return None
    lines = [line.strip() for line in sys.stdin.read().splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise UserError("stdin held no prompt (every line was empty): pipe one prompt per line, or use --prompt")
    return prompts


def check_sampling(a) -> None:
    if a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if not a.greedy and (a.temperature <= 0 or not 0 < a.top_p <= 1):
        raise UserError(f"need --temperature > 0 and 0 < --top_p <= 1 (got {a.temperature}, {a.top_p}); or --greedy")


def generation_kwargs(a, tok) -> dict:
    kw = dict(max_new_tokens=a.max_new_tokens, pad_token_id=tok.pad_token_id)
    if a.greedy:
        return {**kw, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kw, "do_sample": True, "temperature": a.temperature, "top_p": a.top_p}


def stream_reply(model, tok, messages: list[dict], gen: dict) -> str:
    """Generate in a thread and print the text as TextIteratorStreamer yields it; return the whole answer."""
    from transformers import TextIteratorStreamer

    out = sys.stdout

    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def generate():
        try:
            model.generate(**inputs, streamer=streamer, **gen)
        except BaseException as e:  # surface it in the main thread; end() unblocks the reader
            failure.append(e)
            streamer.end()

    thread = Thread(target=generate, daemon=True)
    thread.start()
    parts = []
    for text in streamer:
        out.write(text)
        out.flush()
        parts.append(text)
    thread.join()
    out.write("\n")
    if failure:
        raise failure[0]
    return "".join(parts).strip()


def conversation(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def fit_context(messages: list[dict], tok, model, max_new_tokens: int) -> list[dict]:
    """Drop the oldest exchanges (never the system prompt) until prompt + answer fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return messages
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]
    while len(body) > 1:
        ids = tok.apply_chat_template(head + body, add_generation_prompt=True, return_dict=True)["input_ids"]
        if len(ids) + max_new_tokens <= limit:
            break
        body = body[2:] if len(body) > 2 else body[-1:]
    return head + body


def interactive(model, tok, system: str | None, gen: dict) -> None:
    print(f"type '{CHANGE_SYSTEM}' to set a new system prompt, 'quit' or 'exit' to leave", file=sys.stderr)
    messages = conversation(system)
    while True:
        try:
            text = input("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not text:
            continue
        if text.lower() in QUIT:
            return
        if text == CHANGE_SYSTEM:
            try:
                system = input("New system prompt: ").strip() or None
            except (EOFError, KeyboardInterrupt):
                return
            messages = conversation(system)  # a new persona starts a new conversation
            print(f"system prompt: {system or '(none)'}", file=sys.stderr)
            continue
        messages = fit_context(messages + [{"role": "user", "content": text}], tok, model, gen["max_new_tokens"])
        sys.stdout.write("Assistant: ")
        answer = stream_reply(model, tok, messages, gen)
        messages.append({"role": "assistant", "content": answer})


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.path is None and not a.base:
        raise UserError("dist-dpo chat needs a run dir, adapter dir or model dir (or --base MODEL for a base alone)")
    check_sampling(a)
    prompts = scripted_prompts(a)  # bad input fails before minutes of model loading
    art = locate(a.path) if a.path else base_alone(a.base)
    system = a.system if a.system is not None else art.system_prompt
    if a.seed is not None:
        from transformers import set_seed

        set_seed(a.seed)
    model, tok, what = load_for_inference(art, base=a.base, base_only=a.base_only or a.path is None,
                                          dtype_name=a.dtype, load_in_4bit=a.load_in_4bit)
    print(f"chat: {what}\nsystem prompt: {system or '(none)'}", file=sys.stderr)
    gen = generation_kwargs(a, tok)
    if prompts is None:
        interactive(model, tok, system, gen)
        return 0
    for text in prompts:
        sys.stdout.write(f"User: {text}\nAssistant: ")
        stream_reply(model, tok, conversation(system) + [{"role": "user", "content": text}], gen)
        sys.stdout.write("\n")
    return 0
