"""Shared benchmark plumbing: one measurement per fresh process, markdown tables, result files.

Peak RSS is a per-process high-water mark (`ru_maxrss`), so every tool measured runs in its own
fresh interpreter: two tools in one process would share one number, and a second run in the same
process would see warm allocators and caches. A child runs `setup` (imports, not timed), then
`body` under a wall clock, and prints one JSON line with what it measured.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_MARK = "__BENCH_RESULT__"

_CHILD = """
import json, time
from common import peak_rss
{setup}
_t0 = time.perf_counter()
{body}
_wall = time.perf_counter() - _t0
_extra = globals().get("bench_extra", {{}})
print({mark!r} + json.dumps({{"wall_s": _wall, "peak_rss": peak_rss(), **_extra}}), flush=True)
"""


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux: VmHWM, the high-water mark of this process image. Not ru_maxrss: Linux carries
    ru_maxrss over fork and exec, so a child started by a parent that once held 2 GB reports
    at least 2 GB whatever it does itself. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def wait_peak_rss(proc: subprocess.Popen, interval: float = 0.02) -> int:
    """Wait for `proc` to exit, polling its VmHWM (the kernel's high-water mark: sampling RSS
    misses short peaks); returns the peak in bytes."""
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak] + [int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:")])
        except OSError:
            pass
        time.sleep(interval)
    return peak


def measure(setup: str, body: str, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run setup + timed body in a fresh Python; returns {"wall_s", "peak_rss", ...extras}.

    The body may set a dict `bench_extra` whose items are merged into the result.
    """
    code = _CHILD.format(setup=textwrap.dedent(setup), body=textwrap.dedent(body), mark=_MARK)
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    return json.loads(lines[-1][len(_MARK) :])


def summarize(runs: list[dict]) -> dict:
    """Median wall time (robust to a noisy neighbour), worst peak RSS (what a user must provision)."""
    out = dict(runs[-1])
    out["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    out["peak_rss"] = max(r["peak_rss"] for r in runs)
    out["runs"] = [round(r["wall_s"], 2) for r in runs]
    return out


def repeat(n: int, setup: str, body: str, env: dict | None = None) -> dict:
    """`n` fresh-process runs of one case, summarized."""
    return summarize([measure(setup, body, env) for _ in range(n)])


# Child code: an RSS high-water sampler (`_sample`, stopped by `_stop`) a timed body starts around its step.
RSS_SAMPLER = """
import threading, psutil
_proc, _peak, _stop = psutil.Process(), [0], threading.Event()
def _sample():
    while not _stop.is_set():
        _peak[0] = max(_peak[0], _proc.memory_info().rss)
        _stop.wait(0.002)
"""
INDEX = "model.safetensors.index.json"


def write_random_checkpoint(config, out: Path, shards: int = 1, zero_rows=()) -> int:
    """Random bf16 HF checkpoint of `config`'s shapes, split into `shards` files like HF's, with the
    table rows `zero_rows` zero (untrained, as Llama-3's reserved slots). Tensors are generated one at
    a time, so writing needs no more memory than the largest one. Returns the bytes written."""
    import zlib

    import ml_dtypes
    import numpy as np

    from jaxvocab.io import keys
    from jaxvocab.io.safetensors_io import write_file

    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = [(name, key) for key in keys.keys_for(config) for name in keys.names(key, config, "hf")]
    entries.sort(key=lambda e: _hf_order(e[0]))
    shape_of = {name: keys.checkpoint_shape(key, config) for name, key in entries}
    total = sum(int(np.prod(s)) * 2 for s in shape_of.values())
    groups, before = [[] for _ in range(shards)], 0
    for name, _ in entries:  # each tensor goes to the shard its first byte falls in
        groups[min(shards - 1, before * shards // total)].append(name)
        before += int(np.prod(shape_of[name])) * 2
    groups = [g for g in groups if g]
    zero_rows = list(zero_rows)

    def produce(name):
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            return (1.0 + 0.05 * rng.standard_normal(shape_of[name], np.float32)).astype(bf16)
        x = (0.02 * rng.standard_normal(shape_of[name], np.float32)).astype(bf16)
        if zero_rows and name in ("model.embed_tokens.weight", "lm_head.weight"):
            x[zero_rows] = 0
        return x

    out.mkdir(parents=True, exist_ok=True)
    weight_map, written = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        written += write_file(out / fname, [(n, bf16, shape_of[n]) for n in group], produce)
        weight_map.update(dict.fromkeys(group, fname))
        print(f"  wrote {fname}", file=sys.stderr)
    hf_config = config.replace(dtype="bfloat16").to_hf_dict()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    # The index last: its presence is what --keep-dir takes as "complete, reuse it".
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}, indent=2))
    return written


def _hf_order(name: str):
    parts = name.split(".")
    layer = int(parts[2]) if parts[1:2] == ["layers"] else (-1 if "embed" in name else 10**9)
    return layer, name


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub markdown table (cells str()'d, columns padded for reading in a terminal too)."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def machine() -> str:
    import platform

    cpus = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return f"{platform.machine()} {cpus} CPU, {fmt_bytes(mem)} RAM, Python {platform.python_version()}"


def save(name: str, text: str) -> Path:
    """Write bench/results/<name> (gitignored) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path
