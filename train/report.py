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
                continue   # the half-written last line of a killed run
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
    """Train (and eval) loss against step; quietly skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
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
