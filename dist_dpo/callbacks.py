"""Trainer callbacks that make the console speak once, from global rank 0."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback

from dist_dpo.logs import get_logger

_SHOWN = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "grad_norm",
          "learning_rate")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RankZeroProgress(ProgressCallback):
    """The progress bar, but step metrics go through our rank-aware logger (console on rank 0, rank files)
    instead of tqdm.write of a raw dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step = f"step {state.global_step}/{state.max_steps}"
        if any(k.startswith("eval_") for k in logs):
            shown = {k: v for k, v in logs.items() if k.startswith("eval_") and k[5:] in _SHOWN}
            get_logger().info("%s eval | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
        elif "loss" in logs:
            shown = {k: logs[k] for k in _SHOWN if k in logs}
            get_logger().info("%s | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
