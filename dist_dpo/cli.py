"""`dist-dpo <command>`: the table of contents of the program, and the one place errors become exit codes.

A `UserError` is printed as one line by global rank 0 only, every rank exits 2. Any other exception is a bug:
rank 0 prints its traceback, the other ranks a one-line pointer to their log file.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from dist_dpo.errors import EXIT_USER_ERROR, UserError

# command -> (module, function, one-line help). Each function takes argv (the words after the command).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "doctor": ("dist_dpo.doctor", "main", "Is this machine ready? Driver, CUDA, versions, GPUs, NCCL, disk, recipe."),
    "launch": ("dist_dpo.launch", "main", "Start training on N GPUs / nodes with a packaged strategy; prints the command."),
    "configs": ("dist_dpo.packaged", "main", "Copy the packaged accelerate/DeepSpeed configs and recipes out for editing."),
    "train": ("dist_dpo.train", "run", "Train a LoRA/QLoRA DPO adapter (any launcher, any strategy)."),
    "build-model": ("dist_dpo.model_zoo", "main", "Write a random-weight model of a real shape (offline)."),
    "plan": ("dist_dpo.plan", "main", "Peak GPU memory per rank for a shape/strategy/batch, and what fits fastest."),
    "chat": ("dist_dpo.chat", "main", "Chat with a trained adapter, a merged model or the base (streamed)."),
    "merge": ("dist_dpo.merge", "main", "Merge the adapter into its base, save shards + model card, verify logits."),
    "eval": ("dist_dpo.evaluate", "main", "Base vs tuned on the test split: preference accuracy, margins, samples."),
    "report": ("dist_dpo.report", "main", "Training curves (PNG) and a one-page reading of them (report.md)."),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dist-dpo <command> [options]   (dist-dpo <command> --help for its options)", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _global_rank() -> int:
    # Before the runtime is resolved (e.g. a config error), the rank still decides who speaks.
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def _shutdown_distributed() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # shutting down after an error: never mask the error itself
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The `deepspeed` launcher puts --local_rank=N before our command; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else EXIT_USER_ERROR
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"dist-dpo: error: unknown command '{command}'\n{_usage()}", file=sys.stderr)
        return EXIT_USER_ERROR
    module, func, _ = COMMANDS[command]
    rank = _global_rank()
    stacks_after = os.environ.get("DIST_DPO_STACKS_AFTER_S")
    if stacks_after:  # debugging a hang: every rank prints where it waits
        import faulthandler

        try:
            seconds = float(stacks_after)
            if seconds <= 0:
                raise ValueError
        except ValueError:
            if rank == 0:
                print(f"dist-dpo: error: DIST_DPO_STACKS_AFTER_S={stacks_after!r} must be a number of seconds > 0",
                      file=sys.stderr)
            return EXIT_USER_ERROR
        faulthandler.dump_traceback_later(seconds, repeat=True)
    # bitsandbytes warns on every CPU process that an optional hub kernel is missing; nothing for users to do.
    logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
    if command in ("train", "launch"):  # library chatter goes to the rank file, from the first import on
        from dist_dpo.logs import hold_library_records

        hold_library_records()
    try:
        code = getattr(importlib.import_module(module), func)(rest)
    except UserError as e:
        if rank == 0:
            print(f"dist-dpo: error: {e}", file=sys.stderr, flush=True)
        else:
            from dist_dpo.logs import log_to_rank_file

            log_to_rank_file(logging.ERROR, str(e))
        _shutdown_distributed()
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _shutdown_distributed()
        return 130
    except SystemExit:
        raise
    except BaseException:
        if rank == 0:
            raise
        logging.getLogger("dist_dpo").exception("rank %d failed", rank)
        print(f"dist-dpo: rank {rank} failed: {sys.exc_info()[1]!r} (details in logs/rank{rank}.log)",
              file=sys.stderr, flush=True)
        _shutdown_distributed()
        return 1
    _shutdown_distributed()
    return code or 0


if __name__ == "__main__":
    raise SystemExit(main())
