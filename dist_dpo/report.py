"""`dist-dpo report RUN_DIR`: the training curves as PNGs and a one-page reading of them (report.md).

Reads the run's log history (trainer_state.json: the run's own, or the newest checkpoint's while it still trains)
and plots, for train and eval, raw and smoothed: loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, grad_norm and learning_rate. report.md applies the reading rules
of DPO training curves and flags what looks wrong. `train` writes it at the end of every run.

How to read DPO curves (what report.md checks):
  - loss falls (from log 2 = 0.693, where policy == reference);
  - rewards/chosen rises and rewards/rejected falls, so rewards/margins grows;
  - rewards are measured against the reference, so read them with the log-probs: a margin can grow while the chosen
    answer gets LESS likely (rewards/chosen < 0: both log-probs fall, the rejected one faster), and chosen and
    rejected log-probs rising together without a widening margin means overconfidence / degeneration;
  - grad_norm has no isolated spikes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from dist_dpo.errors import UserError
from dist_dpo.run_artifacts import CommandParser

STATE_FILE = "trainer_state.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
# trl 1.16 log_history keys (train; eval ones carry an "eval_" prefix). learning_rate and grad_norm are train-only.
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "grad_norm", "learning_rate")
SPIKE_FACTOR = 3.0  # a grad_norm above 3x the median of its neighbours is a spike
FLAT_MARGIN = 0.05  # rewards/margins that grow less than this (reward units) are flat


@dataclass
class Series:
    steps: list[int]
    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.values)

    def head(self) -> float:
        return statistics.fmean(self.values[: max(1, len(self.values) // 5)])

    def tail(self) -> float:
        return statistics.fmean(self.values[-max(1, len(self.values) // 5):])


def find_state(run: Path) -> Path:
    if not run.is_dir():
        raise UserError(f"'{run}' is not a directory: pass a train output_dir")
    if (run / STATE_FILE).is_file():
        return run / STATE_FILE
    # A running job: the newest checkpoint's log history. Reading curves needs no resumable (complete) checkpoint.
    found = [(int(p.parent.name.split("-")[1]), p) for p in run.glob(f"checkpoint-*/{STATE_FILE}")
             if p.parent.name.split("-")[1].isdigit()]
    if not found:
        raise UserError(f"{run} has no training logs ({STATE_FILE}, none in checkpoint-N dirs either): point at a "
                        "train output_dir after its first save")
    return max(found)[1]


def load_history(run: Path) -> tuple[list[dict], Path]:
    path = find_state(run)
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}): the run's logs are damaged") from None
    if not any("loss" in h for h in history):
        raise UserError(f"{path} has no logged training step yet: wait for the first log (logging_steps)")
    return history, path


def series(history: list[dict], key: str) -> Series:
    rows = [(h["step"], float(h[key])) for h in history if isinstance(h.get(key), (int, float)) and "step" in h]
    rows = [(s, v) for s, v in rows if math.isfinite(v)]
    return Series([s for s, _ in rows], [v for _, v in rows])


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight < 1 else v)
    return out


def plot(history: list[dict], out_dir: Path, weight: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    grid, axes = plt.subplots(3, 3, figsize=(15, 11))
    for ax_grid, key in zip(axes.flat, METRICS):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for target in (ax, ax_grid):
            train, ev = series(history, key), series(history, f"eval_{key}")
            if train:
                target.plot(train.steps, train.values, color="tab:blue", alpha=0.3, lw=1, marker=".", ms=3,
                            label="train (raw)")
                target.plot(train.steps, smooth(train.values, weight), color="tab:blue", lw=2,
                            label=f"train (smoothed {weight})")
            if ev:
                target.plot(ev.steps, ev.values, color="tab:orange", alpha=0.45, lw=1, marker="o", ms=5,
                            label="eval (raw)")
                if len(ev.values) >= 3:
                    target.plot(ev.steps, smooth(ev.values, weight), color="tab:orange", lw=2,
                                label=f"eval (smoothed {weight})")
            if key == "loss":
                target.axhline(math.log(2), color="gray", ls=":", lw=1, label="log 2 (policy = reference)")
            if key.startswith("rewards/") and key != "rewards/accuracies":
                target.axhline(0, color="gray", ls=":", lw=1)
            target.set_title(key)
            target.set_xlabel("optimizer step")
            target.grid(alpha=0.3)
            if not (train or ev):
                target.text(0.5, 0.5, "not logged", ha="center", va="center", transform=target.transAxes)
        ax.legend(fontsize=8)
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)  # fixed margins: tight_layout costs ~0.1 s
        path = out_dir / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    axes.flat[0].legend(fontsize=8)
    grid.suptitle("DPO training curves (blue: train, orange: eval; thin: raw, bold: smoothed)")
    grid.subplots_adjust(left=0.05, right=0.98, bottom=0.05, top=0.93, hspace=0.3, wspace=0.2)
    overview = out_dir / "overview.png"
    grid.savefig(overview, dpi=80)
    plt.close(grid)
    return [overview, *files]


def grad_spikes(grad: Series, window: int = 5) -> list[int]:
    """Steps whose grad_norm exceeds SPIKE_FACTOR x the median of the `window` points on each side: local, because
    gradients shrink as the loss saturates and early, normal values would look like spikes against a global median."""
    spikes = []
    for i, value in enumerate(grad.values):
        around = grad.values[max(0, i - window):i] + grad.values[i + 1:i + 1 + window]
        if around and value > SPIKE_FACTOR * statistics.median(around):
            spikes.append(grad.steps[i])
    return spikes


def read_curves(history: list[dict]) -> tuple[list[str], list[str]]:
    """(what looks right, what looks wrong), each a markdown bullet, by the reading rules in the module doc."""
    ok, bad = [], []
    loss = series(history, "loss")
    chosen, rejected = series(history, "rewards/chosen"), series(history, "rewards/rejected")
    margins = series(history, "rewards/margins")
    grad = series(history, "grad_norm")
    eval_loss = series(history, "eval_loss")

    if loss.tail() < loss.head() - 0.01:
        ok.append(f"loss falls: {loss.head():.3f} -> {loss.tail():.3f}")
    else:
        bad.append(f"**loss is not decreasing** ({loss.head():.3f} -> {loss.tail():.3f}): raise the learning rate, "
                   "check the data (chosen vs rejected swapped? identical pairs?) or train longer")
    if len(eval_loss.values) >= 2:
        best = min(eval_loss.values)
        if eval_loss.values[-1] > best + 0.05 and loss.tail() < loss.head():
            bad.append(f"**eval loss rises** ({best:.3f} at best -> {eval_loss.values[-1]:.3f}) while train loss "
                       "falls: overfitting; stop earlier or lower the learning rate")
        else:
            ok.append(f"eval loss {eval_loss.values[0]:.3f} -> {eval_loss.values[-1]:.3f}")
    if chosen and rejected and margins:
        c, r, m0, m1 = chosen.tail(), rejected.tail(), margins.head(), margins.tail()
        grows = m1 > m0 + FLAT_MARGIN
        (ok if c > chosen.head() else bad).append(
            f"rewards/chosen {'rises' if c > chosen.head() else '**falls**'}: {chosen.head():.3f} -> {c:.3f}")
        (ok if r < rejected.head() else bad).append(
            f"rewards/rejected {'falls' if r < rejected.head() else '**rises**'}: {rejected.head():.3f} -> {r:.3f}")
        if grows:
            ok.append(f"rewards/margins grow: {m0:.3f} -> {m1:.3f}")
        else:
            bad.append(f"**rewards/margins are flat** ({m0:.3f} -> {m1:.3f}): the model is not separating chosen "
                       "from rejected; more steps, a higher learning rate or a smaller beta")
        # Rewards are log-prob ratios to the reference: their signs say where the policy's log-probs went.
        if c < 0 and r < 0:
            bad.append(f"**both log-probs fall** (rewards/chosen {c:.3f} and rewards/rejected {r:.3f} are below the "
                       "reference): the margin comes from pushing rejected down faster than chosen, and chosen "
                       "answers get less likely too; watch generations for degeneration (`dist-dpo eval`)")
        elif c > 0 and r > 0 and not grows:
            bad.append("**chosen and rejected log-probs rise together without a widening margin**: overconfidence "
                       "/ degeneration, not preference learning")
        elif c > 0 > r:
            ok.append("log-probs move apart: chosen above the reference, rejected below it")
    train_logps = series(history, "logps/chosen"), series(history, "logps/rejected")
    if chosen and all(train_logps) and all(s.tail() < s.head() for s in train_logps) and chosen.tail() > 0:
        ok.append("train logps/chosen and logps/rejected both fall, but rewards/chosen > 0 says the policy rates the "
                  "chosen answers above the reference: the fall comes from which pairs each batch holds (summed "
                  "log-probs scale with answer length), not from the model")
    logps = series(history, "eval_logps/chosen"), series(history, "eval_logps/rejected")
    if all(len(s.values) >= 2 for s in logps):
        ok.append(f"eval log-probs (same pairs each time): chosen {logps[0].values[0]:.1f} -> "
                  f"{logps[0].values[-1]:.1f}, rejected {logps[1].values[0]:.1f} -> {logps[1].values[-1]:.1f}")
    if grad:
        spikes = grad_spikes(grad)
        if spikes:
            bad.append(f"**grad_norm spikes** above {SPIKE_FACTOR:g}x the median of their neighbours at step(s) "
                       f"{', '.join(map(str, spikes[:10]))}: lower the learning rate or max_grad_norm")
        else:
            ok.append(f"grad_norm without spikes (median {statistics.median(grad.values):.3g}, "
                      f"max {max(grad.values):.3g})")
    return ok, bad


def summary_table(history: list[dict]) -> list[str]:
    lines = ["| metric | first logged | last logged | eval (last) |", "|---|---|---|---|"]
    for key in METRICS:
        train, ev = series(history, key), series(history, f"eval_{key}")
        if not (train or ev):
            continue
        first = f"{train.values[0]:.4g}" if train else "-"
        last = f"{train.values[-1]:.4g}" if train else "-"
        lines.append(f"| {key} | {first} | {last} | {f'{ev.values[-1]:.4g}' if ev else '-'} |")
    return lines


def eval_section(run: Path) -> list[str]:
    path = run / "eval.json"
    if not path.is_file():
        return ["", f"No base-vs-tuned comparison yet: `dist-dpo eval {run}` writes eval.md."]
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        b, t = r["base"], r["tuned"]
        return ["", "## Base vs tuned (from eval.json)", "",
                f"preference accuracy {b['preference_accuracy']:.3f} -> {t['preference_accuracy']:.3f}, logp "
                f"margin {b['logp_margin']:.2f} -> {t['logp_margin']:.2f}, DPO reward accuracy "
                f"{t['reward_accuracy']:.3f} (details: eval.md)"]
    except (ValueError, KeyError):
        return ["", "eval.json is unreadable: rerun `dist-dpo eval`."]


def write_report(run: Path, out: Path | None = None, weight: float = 0.6) -> Path:
    history, state_path = load_history(run)
    out = out or run
    try:
        plots = plot(history, out / PLOTS_DIR, weight)
    except ImportError:
        plots = []  # matplotlib is an optional extra (pip install 'dist-dpo[plots]'); the summary still helps
    ok, bad = read_curves(history)
    steps = max((h.get("step", 0) for h in history), default=0)
    verdict = "nothing looks wrong" if not bad else f"{len(bad)} thing(s) look wrong"
    lines = [
        f"# Training report: {run.resolve().name}",
        "",
        f"{steps} optimizer steps, from `{state_path}`. Verdict: **{verdict}**.",
        "",
        "## Reading the curves",
        "",
        *(f"- ⚠ {b}" for b in bad),
        *(f"- ✓ {o}" for o in ok),
        "",
        "Rules: loss falls; rewards/chosen rises and rewards/rejected falls, so rewards/margins grows; rewards are "
        "relative to the reference, so check the log-probs: a margin can grow while chosen gets less likely "
        "(both fall), and both rising without a wider margin is overconfidence; grad_norm without spikes.",
        "",
        "## First and last values",
        "",
        *summary_table(history),
        *eval_section(run),
        "",
        "## Plots",
        "",
    ]
    if plots:
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots[:1]]
        lines += ["", "One file per metric: " + ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix()})"
                                                          for p in plots[1:])]
    else:
        lines.append("matplotlib is not installed: `pip install matplotlib` for the PNGs.")
    path = out / REPORT_MD
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def report_after_training(run: Path) -> None:
    """The report hook of `train`: a plotting problem is logged, never fails the finished run."""
    from dist_dpo.logs import get_logger

    try:
        get_logger().info("report: %s", write_report(run))
    except Exception as e:  # the adapter is saved and verified; the report is a convenience on top
        get_logger().warning("training report not written (%s); run `dist-dpo report %s`", e, run)


def main(argv: list[str]) -> int:
    p = CommandParser(prog="dist-dpo report", description="Training curves (PNG) and report.md for a run.")
    p.add_argument("path", help="Run dir (train output_dir); a running job's newest checkpoint is used.")
    p.add_argument("--out", help="Where report.md and plots/ go (default: the run dir).")
    p.add_argument("--smoothing", type=float, default=0.6, help="EMA weight in [0, 1) for the smoothed curves.")
    a = p.parse_args(argv)
    if not 0 <= a.smoothing < 1:
        raise UserError(f"--smoothing must be in [0, 1), got {a.smoothing}")
    path = write_report(Path(a.path).expanduser(), Path(a.out).expanduser() if a.out else None, a.smoothing)
    print(path)
    return 0
