"""What a run leaves for humans and scripts: metrics.jsonl, loss.png and a progress bar.

metrics.jsonl is append-only and flushed per line, so a killed run keeps everything it logged;
on resume the lines past the restored checkpoint (steps that will be replayed) are dropped, so the
file reads exactly like the log of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxvocab.progress import progress


class MetricsLog:
    def __init__(self, path: Path, keep_through: int | None = None):
        self.path = Path(path)
        if keep_through is not None and self.path.exists():
            self._truncate(keep_through)
        self._f = self.path.open("a", encoding="utf-8")

    def _truncate(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed run
            if rec.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log(self, record: dict) -> None:
        clean = {k: _finite(v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _finite(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_loss(metrics: Path, png: Path) -> bool:
    """Left: train (and eval) loss against step. Right, when the run has new-token targets: loss and
    argmax accuracy on them (train batch and eval), which is what rows training moves; on a big or
    random model the total loss barely shows it. Quietly skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = read_metrics(metrics)
    series = lambda key: [(r["step"], r[key]) for r in recs if r.get(key) is not None]  # noqa: E731
    has_new = bool(series("new_token_acc") or series("train_new_token_acc"))
    fig, axes = plt.subplots(1, 2 if has_new else 1, figsize=(12 if has_new else 7, 4), squeeze=False)
    ax = axes[0][0]
    for key, style, label in (("loss", "-", "train loss"), ("eval_loss", "o-", "eval loss")):
        if series(key):
            ax.plot(*zip(*series(key), strict=True), style, label=label, lw=1)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="all targets")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_new:
        ax = axes[0][1]
        acc = ax.twinx()
        for prefix, label in (("train_", "train batch"), ("eval_", "eval")):
            if series(prefix + "new_token_loss"):
                ax.plot(*zip(*series(prefix + "new_token_loss"), strict=True), "o-", label=f"{label} loss", lw=1)
            acc_key = "new_token_acc" if prefix == "eval_" else "train_new_token_acc"
            if series(acc_key):
                acc.plot(*zip(*series(acc_key), strict=True), "s--", label=f"{label} accuracy", lw=1)
        ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="targets that are trained ids")
        acc.set(ylabel="argmax accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3)
        lines = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
        ax.legend(lines, [h.get_label() for h in lines], fontsize=8)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
    return True


def progress_bar(total: int, initial: int, disable: bool = False):
    bar = progress(total=total, desc="train", unit="step", disable=disable)
    bar.update(initial)
    return bar
