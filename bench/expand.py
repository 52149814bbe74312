"""Vocabulary expansion, side by side: jaxvocab plan + expand vs transformers resize_token_embeddings.

    python bench/expand.py                       # 1-layer Llama-3-8B shapes, +1000 tokens, mean init
    python bench/expand.py --keep-dir /tmp/e8b   # keep (and on later runs reuse) the checkpoint
    python bench/expand.py --cli-only            # only the CLI comparison (import vs import --add-tokens)

A checkpoint with Llama-3-8B's real shapes but one layer (vocab 128256 x 4096 bf16, untied head) is
written on the fly as an HF dir with the Llama-3 tokenizer files, its 248 reserved rows zero as in
the base release. Each tool then runs in its own fresh process: load (reported, not compared), then
+1000 tokens with a mean init, timed alone: jaxvocab's default path (`plan_vocab(tok, new,
model=model)`: the 248 free reserved slots are reused, 752 rows appended; `expand_vocab`,
compilation included) against `model.resize_token_embeddings(n + 1000, mean_resizing=True)`
(transformers has no reserved-slot reuse: it grows by 1000 rows). transformers' mean resizing
centres an f32 copy of each table and forms its 4096 x 4096 covariance to sample from; jaxvocab's
mean is one f32 reduction over the trained rows. Peak RSS is sampled during the step. jaxvocab
runs 3 times (median; seconds each), transformers once by default (minutes each).

Then the CLI, as users run it: `jaxvocab-convert import SRC OUT` against the same command with
`--add-tokens @FILE` (the same 1000 tokens), one untimed warm-up run of each, then interleaved ABBA,
each a fresh process started after `sync`, median wall time. With the flag the ids are planned
before any weight is read and the loader reads the checkpoint straight into the final-size tables
(the tables first, so their statistics run while the layers load), and the expansion only writes
the planned rows in place.

Targets: >= 100x faster; jaxvocab's peak RSS <= its import baseline + 1.1 x (the weights + one new
table): the model, one table being built, and the same 10% slack bench/import.py allows (XLA's
compiler and executables take ~0.1-0.2 GB here); `import --add-tokens` <= 1.1 x plain `import`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import (  # noqa: E402
    INDEX,
    RSS_SAMPLER,
    fmt_bytes,
    machine,
    markdown_table,
    measure,
    save,
    summarize,
    write_random_checkpoint,
)

from examples.llama3_tokenizer import write_text_tokenizer  # noqa: E402
from jaxvocab.config import LLAMA_3_8B  # noqa: E402

NEW_TOKENS = 1000
CONFIG = LLAMA_3_8B.replace(num_hidden_layers=1, dtype="bfloat16")

# Started at the end of each child's (untimed) setup: RSS high-water mark of the timed step alone.
_SAMPLER = (
    RSS_SAMPLER
    + """
_rss_before = _proc.memory_info().rss
_thread = threading.Thread(target=_sample, daemon=True)
_thread.start()
"""
)
_STOP = """
_stop.set(); _thread.join()
bench_extra.update(step_peak_rss=max(_peak[0], _proc.memory_info().rss), rss_before=_rss_before, load_s=_load_s)
"""


def write_checkpoint(out: Path) -> int:
    """Random bf16 HF dir of CONFIG with the real tokenizer files (the 3.1 text set, 128256 ids);
    reserved rows zero, as in the Llama-3 release."""
    from jaxvocab.io.tokenizer_read import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    write_text_tokenizer(out)
    return write_random_checkpoint(CONFIG, out, zero_rows=load_tokenizer(out).free_reserved())


def children(path: Path) -> dict[str, tuple[str, str]]:
    """Per tool, the (untimed setup, timed body) scripts its fresh process runs: load, then the expansion."""
    p = repr(str(path))
    jax_setup = (
        textwrap.dedent(f"""
        import time
        import jax, jaxvocab
        _t = time.perf_counter()
        model = jaxvocab.load({p}, show_progress=False)
        jax.block_until_ready([model.embed[...], model.lm_head[...]])
        _load_s = time.perf_counter() - _t
        tok = jaxvocab.load_tokenizer({p})
        new = [f"<|new_{{i}}|>" for i in range({NEW_TOKENS})]
        """)
        + _SAMPLER
    )
    jax_body = (
        textwrap.dedent("""
        plan = jaxvocab.plan_vocab(tok, new, model=model)
        model, tok, plan = jaxvocab.expand_vocab(model, tok, plan, init="mean")
        jax.block_until_ready([model.embed[...], model.lm_head[...]])
        bench_extra = {"rows": model.config.vocab_size}
        """)
        + _STOP
    )
    torch_setup = (
        textwrap.dedent(f"""
        import time
        import torch
        from transformers import LlamaForCausalLM
        _t = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained({p}, dtype=torch.bfloat16)
        _load_s = time.perf_counter() - _t
        n = model.config.vocab_size
        """)
        + _SAMPLER
    )
    torch_body = (
        textwrap.dedent(f"""
        model.resize_token_embeddings(n + {NEW_TOKENS}, mean_resizing=True)
        bench_extra = {{"rows": model.get_input_embeddings().weight.shape[0]}}
        """)
        + _STOP
    )
    return {"jaxvocab": (jax_setup, jax_body), "transformers": (torch_setup, torch_body)}


def run(path: Path, repeats: int, transformers_repeats: int) -> dict:
    env = {
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    scripts = children(path)
    baseline = "import jax, jax.numpy as jnp, jaxvocab"
    out = {"jax_baseline": measure(baseline, "jnp.ones(8).block_until_ready()", env=env)}
    runs = {"jaxvocab": [], "transformers": []}
    for i in range(repeats):  # interleaved, so a noisy neighbour hits both tools alike
        for name, (setup, body) in scripts.items():
            if name == "transformers" and i >= transformers_repeats:
                continue
            runs[name].append(measure(setup, body, env=env))
            r = runs[name][-1]
            print(f"  {name}: {r['wall_s']:.2f} s, step peak RSS {fmt_bytes(r['step_peak_rss'])}", file=sys.stderr)
    for name, rs in runs.items():
        out[name] = summarize(rs)
        out[name]["step_peak_rss"] = max(r["step_peak_rss"] for r in rs)
    return out


def report(path: Path, r: dict, ckpt_bytes: int) -> str:
    jv, tf, base = r["jaxvocab"], r["transformers"], r["jax_baseline"]["peak_rss"]
    table_bytes = (128256 + NEW_TOKENS) * CONFIG.hidden_size * 2
    rows = [
        [
            name,
            f"{x['load_s']:.2f}",
            f"**{x['wall_s']:.2f}**",
            fmt_bytes(x["rss_before"]),
            fmt_bytes(x["step_peak_rss"]),
            fmt_bytes(x["step_peak_rss"] - x["rss_before"]),
            str(x["rows"]),
        ]
        for name, x in (
            ("jaxvocab plan_vocab + expand_vocab (mean, reserved slots reused)", jv),
            ("transformers resize_token_embeddings(mean_resizing=True)", tf),
        )
    ]
    speedup = tf["wall_s"] / jv["wall_s"]
    budget = base + 1.1 * (ckpt_bytes + table_bytes)
    return "\n".join(
        [
            f"## Vocabulary expansion: +{NEW_TOKENS} tokens, 1-layer Llama-3-8B shapes (128256 x 4096 bf16, untied), "
            f"{fmt_bytes(ckpt_bytes)} of weights",
            "",
            f"{machine()}; single device; each run a fresh process; median wall time of the runs (jaxvocab "
            f"{jv['runs']} s, transformers {tf['runs']} s), worst peak RSS; the step is timed alone (jaxvocab: "
            "compilation included); RSS sampled every 2 ms during the step.",
            "",
            markdown_table(
                ["", "load (s)", "step (s)", "RSS before step", "peak RSS in step", "step growth", "rows after"], rows
            ),
            "",
            f"- speed: {speedup:.0f}x ({'PASS' if speedup >= 100 else 'MISS'}; target >= 100x)",
            f"- memory: jaxvocab peak {fmt_bytes(jv['step_peak_rss'])} vs JAX+jaxvocab baseline {fmt_bytes(base)} + 1.1 x "
            f"(weights {fmt_bytes(ckpt_bytes)} + one new table {fmt_bytes(table_bytes)}) = {fmt_bytes(budget)} -> "
            f"{'PASS' if jv['step_peak_rss'] <= budget else 'MISS'}; the step grew RSS by "
            f"{fmt_bytes(jv['step_peak_rss'] - jv['rss_before'])} for a {fmt_bytes(table_bytes)} table",
        ]
    )


def run_cli(path: Path, repeats: int) -> dict:
    """`jaxvocab-convert import` with and without --add-tokens, interleaved (ABBA: which goes first
    alternates per round), each started after `sync`, so no run pays for writing back the previous
    run's 2.5 GB of dirty pages; wall seconds each."""
    work = Path(tempfile.mkdtemp(prefix="jaxvocab-bench-cli-"))
    tokens = work / "tokens.txt"
    tokens.write_text("".join(f"<|new_{i}|>\n" for i in range(NEW_TOKENS)))
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    cases = {"import": [], "import --add-tokens": [str(f"--add-tokens=@{tokens}")]}

    def once(extra: list[str]) -> float:
        dst = work / "out"
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "convert", "import", str(path), str(dst), *extra],
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - t

    out = {name: [] for name in cases}
    try:
        # One untimed run of each first: the first run after other work reads the checkpoint back
        # from disk (8-10 s here, whichever command it is) and fills the compile cache.
        out["warm-up"] = {name: once(extra) for name, extra in cases.items()}
        for i in range(repeats):
            for name, extra in list(cases.items())[:: 1 if i % 2 == 0 else -1]:
                out[name].append(once(extra))
                print(f"  {name}: {out[name][-1]:.1f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report_cli(r: dict) -> str:
    plain, add = statistics.median(r["import"]), statistics.median(r["import --add-tokens"])
    rows = [
        [
            f"`jaxvocab-convert {name}`",
            f"**{statistics.median(r[name]):.1f}**",
            " / ".join(f"{t:.1f}" for t in r[name]),
            f"{r['warm-up'][name]:.1f}",
        ]
        for name in ("import", "import --add-tokens")
    ]
    return "\n".join(
        [
            f"## CLI: import vs import --add-tokens (+{NEW_TOKENS} tokens), same checkpoint",
            "",
            f"{machine()}; default flags; each run a fresh process after `sync`, the two commands interleaved "
            "(ABBA) after one untimed warm-up run of each; median wall time.",
            "",
            markdown_table(["", "median (s)", "runs (s)", "warm-up run (s)"], rows),
            "",
            f"- adding tokens costs {100 * (add / plain - 1):+.0f}% over a plain import "
            f"({'PASS' if add <= 1.1 * plain else 'MISS'}; target <= +10%)",
        ]
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-dir", type=Path, help="write the checkpoint here and keep it (reused if already there)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process runs of jaxvocab (median reported)")
    ap.add_argument(
        "--transformers-repeats",
        type=int,
        default=1,
        help="fresh-process runs of transformers (default 1: each takes minutes on a CPU)",
    )
    ap.add_argument(
        "--cli-repeats", type=int, default=3, help="interleaved runs of each import command (0: skip the CLI part)"
    )
    ap.add_argument("--cli-only", action="store_true", help="only the CLI comparison")
    args = ap.parse_args(argv)
    path = args.keep_dir or Path(tempfile.mkdtemp(prefix="jaxvocab-bench-expand-"))
    try:
        if (path / INDEX).is_file() and (path / "tokenizer.json").is_file():
            print(f"reusing {path}", file=sys.stderr)
        else:
            print(f"writing a random 1-layer Llama-3-8B-shaped checkpoint to {path}", file=sys.stderr)
            write_checkpoint(path)
        ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        parts = [] if args.cli_only else [report(path, run(path, args.repeats, args.transformers_repeats), ckpt_bytes)]
        if args.cli_repeats > 0:
            parts.append(report_cli(run_cli(path, args.cli_repeats)))
        text = "\n\n".join(parts)
    finally:
        if args.keep_dir is None:
            shutil.rmtree(path, ignore_errors=True)
    print(text)
    print(f"\n(written to {save('expand.md', text)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
