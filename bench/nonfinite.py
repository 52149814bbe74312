"""Cost of the load-time NaN/Inf check: `jaxvocab.load` with and without it, side by side.

    python bench/nonfinite.py --keep-dir /tmp/l1b   # Llama-3.2-1B shapes (the bench/import.py checkpoint)

Each load runs in its own fresh process (imports not timed), interleaved so that background noise
hits both alike. Target: < 5% of the load time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measure, save, summarize

from jaxvocab.config import PRESETS

SETUP = "import jax\nimport jaxvocab\nfrom jaxvocab.io.checkpoint import params_of"
BODY = """
model = jaxvocab.load({path!r}, show_progress=False, allow_nonfinite={allow})
jax.block_until_ready(params_of(model))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    ap.add_argument("--keep-dir", type=Path, help="checkpoint dir to (write and) reuse")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    bench_import = importlib.import_module("import")
    path = args.keep_dir or Path(tempfile.mkdtemp(prefix="nonfinite-bench-"))
    if not (path / bench_import.INDEX).is_file():
        bench_import.write_random_checkpoint(PRESETS[args.preset], path, shards=2)
    runs = {"checked": [], "unchecked": []}
    for _ in range(args.repeats):
        for name, allow in (("checked", False), ("unchecked", True)):
            runs[name].append(measure(SETUP, BODY.format(path=str(path), allow=allow), env={"JAX_PLATFORMS": "cpu"}))
            print(f"  {name}: {runs[name][-1]['wall_s']:.2f} s", file=sys.stderr)
    checked, unchecked = summarize(runs["checked"]), summarize(runs["unchecked"])
    extra = checked["wall_s"] - unchecked["wall_s"]
    text = (
        f"# load-time NaN/Inf check, {args.preset} shapes ({machine()})\n\n"
        f"| load | median wall s | runs |\n|---|---|---|\n"
        f"| jaxvocab.load (checked, default) | {checked['wall_s']:.2f} | {checked['runs']} |\n"
        f"| jaxvocab.load(allow_nonfinite=True) | {unchecked['wall_s']:.2f} | {unchecked['runs']} |\n\n"
        f"check cost (difference of medians): {extra:.2f} s = {100 * extra / unchecked['wall_s']:.1f}% "
        "of the unchecked load\n"
    )
    print(text)
    save("nonfinite.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
