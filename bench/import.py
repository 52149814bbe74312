"""Import speed and peak memory: `jaxvocab.load` vs transformers `from_pretrained`, side by side.

    python bench/import.py                     # Llama-3.2-1B shapes, random bf16 (~2.5 GB on disk)
    python bench/import.py --keep-dir /tmp/l1b # keep (and on later runs reuse) the checkpoint

A checkpoint with the preset's real shapes is generated on the fly (random bf16 weights, written as
an HF dir: 2 safetensors shards + index + config.json), then each tool loads it in its own fresh
process, so each peak RSS belongs to one tool. transformers is measured twice: as from_pretrained
returns (it maps the files; nothing is read yet) and with every weight page read once. Three more
processes measure what merely importing JAX, jaxvocab and torch+transformers costs. Wall times are
the load call alone (imports excluded).

Targets: jaxvocab no slower than transformers; jaxvocab's peak RSS <= 1.1 x checkpoint bytes + the
JAX baseline (the weights, 10% slack, and what JAX itself costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import INDEX, fmt_bytes, machine, markdown_table, measure, repeat, save, summarize, write_random_checkpoint  # noqa: E402

from jaxvocab.config import PRESETS, LlamaConfig  # noqa: E402


def checkpoint_bytes(path: Path) -> int:
    return json.loads((path / INDEX).read_text())["metadata"]["total_size"]


TOOLS = ("jaxvocab", "transformers", "transformers_paged_in")
LABELS = {
    "jaxvocab": "jaxvocab.load (params in device arrays)",
    "transformers": "transformers from_pretrained, as returned",
    "transformers_paged_in": "transformers from_pretrained + first read of every weight page",
}


def run(path: Path, repeats: int) -> dict:
    env = {
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
    p = repr(str(path))
    jax_setup = "import jax, jax.numpy as jnp"
    torch_setup = "import torch\nfrom transformers import LlamaForCausalLM"
    hf_load = f"""
        model = LlamaForCausalLM.from_pretrained({p}, dtype=torch.bfloat16)
        bench_extra = {{"params": sum(t.numel() for t in model.parameters()), "dtype": str(model.dtype)}}
        """
    cases = {
        "jax_baseline": (jax_setup, "jnp.ones(8).block_until_ready()"),
        "jaxvocab_baseline": (jax_setup + "\nimport jaxvocab", "jnp.ones(8).block_until_ready()"),
        "torch_baseline": (torch_setup, "torch.ones(8).sum()"),
        "jaxvocab": (
            jax_setup + "\nimport jaxvocab\nfrom jaxvocab.io.checkpoint import params_of",
            f"""
            model = jaxvocab.load({p}, show_progress=False)
            params = jax.block_until_ready(params_of(model))
            bench_extra = {{"params": sum(a.size for a in params.values()), "dtype": str(model.embed[...].dtype)}}
            """,
        ),
        # transformers 5 maps bf16 safetensors and hands out views of the map: nothing is read until
        # first use. Reading one element per 4 KB page is the cheapest way to make the weights resident.
        "transformers": (torch_setup, hf_load),
        "transformers_paged_in": (
            torch_setup,
            textwrap.dedent(hf_load)
            + textwrap.dedent("""
            for t in model.state_dict().values():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()
            """),
        ),
    }
    results = {
        name: repeat(1, *cases[name], env=env) for name in ("jax_baseline", "jaxvocab_baseline", "torch_baseline")
    }
    loads = {name: [] for name in TOOLS}
    for _ in range(repeats):  # interleaved, so background noise hits every tool alike
        for name, runs in loads.items():
            runs.append(measure(*cases[name], env=env))
            print(f"  {name}: {runs[-1]['wall_s']:.2f} s, peak RSS {fmt_bytes(runs[-1]['peak_rss'])}", file=sys.stderr)
    results.update({name: summarize(runs) for name, runs in loads.items()})
    return results


def report(preset: str, path: Path, r: dict, repeats: int) -> str:
    ckpt = checkpoint_bytes(path)
    files = sorted(path.glob("*.safetensors"))
    jv, tf, tfp = r["jaxvocab"], r["transformers"], r["transformers_paged_in"]
    jb, tb = r["jax_baseline"]["peak_rss"], r["torch_baseline"]["peak_rss"]
    rows = []
    for name in TOOLS:
        x, base = r[name], jb if name == "jaxvocab" else tb
        rows.append(
            [
                LABELS[name],
                f"{x['wall_s']:.2f}",
                fmt_bytes(x["peak_rss"]),
                fmt_bytes(x["peak_rss"] - base),
                f"{x['params']:,}",
                x["dtype"].replace("torch.", ""),
            ]
        )
    rows += [
        ["import jax + one array", "-", fmt_bytes(jb), "-", "-", "-"],
        ["import jaxvocab + one array", "-", fmt_bytes(r["jaxvocab_baseline"]["peak_rss"]), "-", "-", "-"],
        ["import torch + transformers", "-", fmt_bytes(tb), "-", "-", "-"],
    ]
    budget = 1.1 * ckpt + jb
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    runs = ", ".join(f"{n} {r[n]['runs']}" for n in TOOLS)
    lines = [
        f"## Import: {preset} shapes, random bf16, {len(files)} safetensors shards, {fmt_bytes(ckpt)} of tensors",
        "",
        f"{machine()}; single device (JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', 'cpu')}); median wall time "
        f"of {repeats} fresh-process loads per tool, interleaved (runs in s: {runs}); peak RSS = VmHWM of the "
        "loading process (worst run); checkpoint files warm in the page cache for every tool.",
        "",
        markdown_table(["", "load wall (s)", "peak RSS", "over its import baseline", "params", "dtype"], rows),
        "",
        f"- speed vs transformers with its weights read: jaxvocab {jv['wall_s']:.2f} s vs {tfp['wall_s']:.2f} s -> "
        f"{verdict(jv['wall_s'] <= tfp['wall_s'])} (target: no slower)",
        f"- speed vs transformers as returned: {jv['wall_s']:.2f} s vs {tf['wall_s']:.2f} s -> "
        f"{verdict(jv['wall_s'] <= tf['wall_s'])} (from_pretrained only maps the files; the reads happen "
        "during the first forward pass instead)",
        f"- memory: jaxvocab peak {fmt_bytes(jv['peak_rss'])} vs budget 1.1 x {fmt_bytes(ckpt)} + JAX baseline "
        f"{fmt_bytes(jb)} = {fmt_bytes(budget)} -> {verdict(jv['peak_rss'] <= budget)}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS), help="shapes to generate")
    ap.add_argument("--keep-dir", type=Path, help="write the checkpoint here and keep it (reused if already there)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh-process loads per tool (median reported)")
    args = ap.parse_args(argv)
    config = PRESETS[args.preset]
    path = args.keep_dir or Path(tempfile.mkdtemp(prefix="jaxvocab-bench-"))
    try:
        if (path / INDEX).is_file() and LlamaConfig.from_hf_file(path).replace(dtype=config.dtype) == config:
            print(f"reusing {path}", file=sys.stderr)
        else:
            print(f"writing a random {args.preset} checkpoint to {path}", file=sys.stderr)
            write_random_checkpoint(config, path, shards=2)
        results = run(path, args.repeats)
        text = report(args.preset, path, results, args.repeats)
    finally:
        if args.keep_dir is None:
            shutil.rmtree(path, ignore_errors=True)
    print(text)
    print(f"\n(written to {save('import.md', text)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
