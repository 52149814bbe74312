"""The data pipeline, side by side: tokenizing a corpus, and what a training host holds while it reads.

    python bench/data.py                                   # ~200 MB corpus, ~50 MB and ~1 GB stores, 200 steps
    python bench/data.py --corpus-mb 50 --big-store-mb 300 --steps 100      # a quicker, smaller run

1. Tokenize a generated JSONL corpus of {"text": ...} records with the real Llama-3 tokenizer:
   `jaxvocab-train tokenize --workers 2` (the CLI, timed whole: interpreter start, reading, writing
   the store) vs Hugging Face `datasets`: `load_dataset("json")` + `.map(batched=True, num_proc=2)`
   with the fast tokenizer of the same tokenizer.json (imports untimed, its Arrow cache included).
   Target: jaxvocab no slower.
2. Peak RSS of a 200-step `jaxvocab-train` run (tiny model, default flags, one CPU device) reading a
   ~50 MB store and a ~1 GB store (written directly in the store format: random ids, 50-1000 token
   documents). Target: equal within 10% (host memory must not grow with the corpus).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import fmt_bytes, machine, markdown_table, measure, save  # noqa: E402

from examples.llama3_tokenizer import tokenizing_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def corpus(path: Path, mb: float, seed: int = 0) -> Path:
    """English-like text: words of a 30k-word random lexicon with a Zipf-ish frequency, ~2 KB records."""
    rs = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1 / np.arange(1, 27)
    lexicon = ["".join(rs.choice(letters, rs.integers(1, 11), p=p / p.sum())) for _ in range(30000)]
    freq = 1 / np.arange(1, len(lexicon) + 1)
    freq /= freq.sum()
    target, written = mb * 1e6, 0
    with path.open("w") as f:
        while written < target:
            words = [lexicon[i] for i in rs.choice(len(lexicon), 1000, p=freq)]
            for s in range(0, 1000, 333):
                line = json.dumps({"text": (" ".join(words[s : s + 333]) + ".").capitalize()}) + "\n"
                f.write(line)
                written += len(line)
    return path


def write_store(path: Path, mb: float, seed: int = 0) -> Path:
    """A store of random ids (vocab 256) in the documented layout, written in chunks."""
    rs = np.random.default_rng(seed)
    n_tokens = int(mb * 1e6 / 5)
    lengths = []
    path.mkdir(parents=True)
    with open(path / "tokens.bin", "wb") as ft, open(path / "mask.bin", "wb") as fm:
        left = n_tokens
        while left > 0:
            ls = rs.integers(50, 1001, 20000)
            ls = ls[np.cumsum(ls) <= left] if ls.sum() > left else ls
            if not len(ls):
                ls = np.array([left])
            ids = rs.integers(0, 256, int(ls.sum()), dtype=np.int32)
            ft.write(ids.astype("<i4").tobytes())
            fm.write(np.ones(len(ids), np.uint8).tobytes())
            lengths.append(ls)
            left -= int(ls.sum())
    lengths = np.concatenate(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(path / "offsets.npy", offsets)
    (path / "manifest.json").write_text(
        json.dumps(
            {
                "format": 1,
                "docs": len(lengths),
                "tokens": int(offsets[-1]),
                "targets": int(offsets[-1] - len(lengths)),
                "dropped": 0,
                "vocab_size": 256,
                "tokenizer": None,
                "sources": ["generated"],
            }
        )
    )
    return path


def bench_tokenize(work: Path, model: Path, data: Path, workers: int) -> list[list]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "tokenize",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(work / "store"),
            "--workers",
            str(workers),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    ours = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    manifest = json.loads((work / "store" / "manifest.json").read_text())
    hf = measure(
        f"""
        from datasets import load_dataset
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast(tokenizer_file={str(model / "tokenizer.json")!r})
    """,
        f"""
        ds = load_dataset("json", data_files={str(data)!r}, split="train", cache_dir={str(work / "hf-cache")!r})
        ds = ds.map(lambda b: {{"input_ids": tok(b["text"])["input_ids"]}}, batched=True, num_proc={workers},
                    remove_columns=["text"])
        bench_extra = {{"tokens": sum(len(x) for x in ds.with_format("numpy")["input_ids"])}}
    """,
    )
    mb = data.stat().st_size / 1e6
    return [
        [
            f"jaxvocab-train tokenize --workers {workers} (CLI, whole run)",
            f"{ours:.1f}",
            f"{mb / ours:.1f}",
            f"{manifest['tokens']:,}",
        ],
        [
            f"datasets load_dataset + .map(batched, num_proc={workers}), fast tokenizer",
            f"{hf['wall_s']:.1f}",
            f"{mb / hf['wall_s']:.1f}",
            f"{hf['tokens']:,}",
        ],
    ]


def bench_rss(work: Path, small_mb: float, big_mb: float, steps: int) -> list[list]:
    sys.path.insert(0, str(ROOT))
    from tests.builders import make_hf_checkpoint

    model, _ = make_hf_checkpoint(work / "model", tied=True, max_pos=256)
    rows = []
    for name, mb in (("small", small_mb), ("big", big_mb)):
        store = write_store(work / f"store-{name}", mb)
        size = sum(f.stat().st_size for f in store.iterdir())
        args = [
            "--model",
            str(model),
            "--data",
            str(store),
            "--out",
            str(work / f"run-{name}"),
            "--trainable",
            "ids:5,9,77,200",
            "--steps",
            str(steps),
            "--batch-size",
            "8",
            "--seq-len",
            "256",
            "--save-every",
            "0",
            "--quiet",
        ]
        r = measure(
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); from train.__main__ import main",
            f"assert main({args!r}) == 0",
            env={"PYTHONPATH": str(ROOT)},
        )
        reads = json.loads((work / f"run-{name}" / "data_read" / "process-0.json").read_text())
        rows.append(
            [
                fmt_bytes(size),
                f"{json.loads((store / 'manifest.json').read_text())['docs']:,}",
                fmt_bytes(r["peak_rss"]),
                fmt_bytes(reads["bytes"]),
                f"{r['wall_s']:.1f}",
            ]
        )
        shutil.rmtree(store)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus-mb", type=float, default=200)
    p.add_argument("--small-store-mb", type=float, default=50)
    p.add_argument("--big-store-mb", type=float, default=1000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="jaxvocab-bench-data-") as tmp:
        work = Path(tmp)
        model = tokenizing_checkpoint(work / "tok")
        data = corpus(work / "corpus.jsonl", args.corpus_mb)
        tok_rows = bench_tokenize(work, model, data, args.workers)
        rss_rows = bench_rss(work, args.small_store_mb, args.big_store_mb, args.steps)
    small, big = (float(r[2].split()[0]) * (1000 if r[2].endswith("GB") else 1) for r in rss_rows)
    text = "\n\n".join(
        [
            f"{machine()}; corpus {args.corpus_mb:.0f} MB of JSONL text records, real Llama-3 tokenizer",
            markdown_table(["tokenize", "wall (s)", "MB/s", "tokens"], tok_rows),
            f"{args.steps}-step jaxvocab-train run (tiny model, batch 8 x 256, one CPU device) per store:",
            markdown_table(["store size", "documents", "peak RSS", "store bytes read", "wall (s)"], rss_rows),
            f"peak RSS, big store / small store: {big / small:.3f}",
        ]
    )
    print(text)
    print(f"\n(written to {save('data.md', text)})", file=sys.stderr)


if __name__ == "__main__":
    main()
