"""LoRA r=16 on all seven projections + the 16 new rows, side by side through the CLIs.

    python bench/train.py --lora --steps 6 --repeats 1

jaxvocab runs as a user would run it (`python -m train`, default flags but `--dtype float32`);
PEFT (`LoraConfig(trainable_token_indices=...)`, torch AdamW, clipping 1.0) runs as a plain
training script. Both read the same checkpoint (bench/train_shape.py) and the same documents, each
in its own process; tokens/s comes from each one's metrics after two warm-up steps, peak RSS is the
process VmHWM over the whole run. Target: >= 1.0x PEFT's tokens/s at <= 0.6x its peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_bytes, machine, markdown_table, wait_peak_rss  # noqa: E402
from train_shape import BATCH, LR, NEW, SEQ, write_docs  # noqa: E402

LORA_R = 16
_PEFT_CLI = """
import json, sys, time
import numpy as np, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM
ckpt, data, metrics, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
new = {new}
model = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
cfg = LoraConfig(r={r}, lora_alpha={alpha}, lora_dropout=0.0, trainable_token_indices=new,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr={lr}, weight_decay=0.0)
docs = [json.loads(line)["input_ids"] for line in open(data)]
with open(metrics, "w") as f:
    for step in range(steps):
        x = torch.tensor(docs[step * {b}:(step + 1) * {b}], dtype=torch.long)
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)
        dt = time.perf_counter() - t0
        f.write(json.dumps({{"step": step + 1, "loss": loss, "tokens": int(x.numel()), "tokens_per_s": x.numel() / dt}}) + "\\n")
        f.flush()
"""


def run_cli(cmd: list[str], metrics: Path, env: dict) -> dict:
    """One CLI process: wall time, its peak RSS (VmHWM, polled until it exits) and the per-step
    tokens/s of metrics.jsonl after the first two steps (the first one compiles)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    peak = wait_peak_rss(proc, interval=0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    recs = [json.loads(x) for x in metrics.read_text().splitlines()][2:]
    secs = sum(r["tokens"] / r["tokens_per_s"] for r in recs)
    return {
        "tokens_per_s": sum(r["tokens"] for r in recs) / secs,
        "peak_rss": peak,
        "wall_s": time.perf_counter() - t,
        "steps": len(recs),
        "last_loss": recs[-1]["loss"],
    }


def lora_bench(path: Path, steps: int, repeats: int, env: dict) -> str:
    work = Path(tempfile.mkdtemp(prefix="jaxvocab-bench-lora-"))  # the CLI refuses an --out inside --model
    try:
        return _lora_rounds(path, work, steps, repeats, env)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _lora_rounds(path: Path, work: Path, steps: int, repeats: int, env: dict) -> str:
    """Rounds alternate the two tools, so a load swing on a shared VM hits both alike."""
    data = work / "lora_data.jsonl"
    write_docs(data, BATCH * (steps + 2))
    runs = {"jaxvocab": [], "peft": []}
    for i in range(repeats):
        out = work / f"run{i}"
        runs["jaxvocab"].append(run_cli(_jaxvocab_cmd(path, data, out, steps + 2), out / "metrics.jsonl", env))
        peft_metrics = work / f"peft{i}.jsonl"
        runs["peft"].append(run_cli(_peft_cmd(path, data, peft_metrics, steps + 2), peft_metrics, env))
        for name, rs in runs.items():
            print(
                f"  {name}: {rs[-1]['tokens_per_s']:.0f} tokens/s, peak {fmt_bytes(rs[-1]['peak_rss'])}",
                file=sys.stderr,
            )
    return _lora_report(runs, steps, repeats)


def _jaxvocab_cmd(path: Path, data: Path, out: Path, steps: int) -> list[str]:
    """`jaxvocab-train` as a user runs it: default flags except f32 (PEFT's dtype) and no mid-run saves."""
    return [
        sys.executable,
        "-m",
        "train",
        "--model",
        str(path),
        "--data",
        str(data),
        "--out",
        str(out),
        "--overwrite",
        "--trainable",
        "ids:" + ",".join(map(str, NEW)),
        "--lora-rank",
        str(LORA_R),
        "--steps",
        str(steps),
        "--batch-size",
        str(BATCH),
        "--seq-len",
        str(SEQ),
        "--lr",
        str(LR),
        "--dtype",
        "float32",
        "--save-every",
        "0",
        "--quiet",
    ]


def _peft_cmd(path: Path, data: Path, metrics: Path, steps: int) -> list[str]:
    """PEFT has no training CLI, so _PEFT_CLI stands in for one, writing the same metrics.jsonl lines."""
    code = _PEFT_CLI.format(new=NEW, r=LORA_R, alpha=2 * LORA_R, lr=LR, b=BATCH)
    return [sys.executable, "-c", code, str(path), str(data), str(metrics), str(steps)]


def _lora_report(runs: dict[str, list[dict]], steps: int, repeats: int) -> str:
    """Medians per tool, each round's tokens/s beside them so the spread is visible, and the verdict."""
    med = {
        k: {m: statistics.median(r[m] for r in rs) for m in ("tokens_per_s", "peak_rss", "wall_s")}
        for k, rs in runs.items()
    }
    labels = {
        "jaxvocab": "jaxvocab-train --lora-rank 16 (CLI, default remat)",
        "peft": "PEFT LoRA + trainable_token_indices, torch AdamW",
    }
    rows = [
        [
            labels[k],
            f"{med[k]['tokens_per_s']:.0f}",
            " / ".join(f"{r['tokens_per_s']:.0f}" for r in runs[k]),
            fmt_bytes(med[k]["peak_rss"]),
            f"{med[k]['wall_s']:.0f}",
        ]
        for k in ("jaxvocab", "peft")
    ]
    j, p = med["jaxvocab"], med["peft"]
    speed, mem = j["tokens_per_s"] / p["tokens_per_s"], j["peak_rss"] / p["peak_rss"]
    head = f"## LoRA r={LORA_R} on q,k,v,o,gate,up,down + 16 new rows: ~135M Llama, f32, batch {BATCH} x {SEQ}"
    how = (
        f"{machine()}; each tool a fresh process on the same weights and data, {steps} timed steps after 2 "
        f"warm-up steps, {repeats} interleaved round(s), medians; peak RSS is the process VmHWM (whole run)."
    )
    verdict = (
        f"- jaxvocab {speed:.2f}x PEFT's tokens/s ({'PASS' if speed >= 1 else 'MISS'}; target >= 1.0x); "
        f"peak RSS {mem:.2f}x PEFT's ({'PASS' if mem <= 0.6 else 'MISS'}; target <= 0.6x)"
    )
    table = markdown_table(["", "tokens/s (median)", "per run", "peak RSS", "wall (s)"], rows)
    return "\n".join([head, "", how, "", table, "", verdict])
