"""Issue 9: interrupts, full and read-only filesystems, racing writers, stale temp dirs, umask.

Signals are sent by the process to itself at named points (JAXVOCAB_FAULT=<point>:<SIGNAL>), never
after a sleep, so each case hits the same code every run. SIGINT / SIGTERM must end in one line
and leave nothing; after SIGKILL the next run on that OUT must clean up and succeed. Filesystems
are small tmpfs mounts (the tests run as root); RLIMIT_FSIZE stands in where mounting is refused.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import jaxvocab
from convert.__main__ import main as convert
from jaxvocab.errors import CheckpointError
from jaxvocab.io.atomic import atomic_dir
from tests.builders import make_hf_checkpoint
from tests.hardening_util import COUNTS, attempt, count, leftovers, tree_hash
from train.__main__ import main as train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    hf, _ = make_hf_checkpoint(root / "hf", vocab=128, hidden=32, intermediate=64, heads=4, kv_heads=2)
    assert convert(["import", str(hf), str(root / "ckpt")]) == 0
    return {"hf": hf, "ckpt": root / "ckpt"}


def _cli(module: str, *argv, fault: str | None = None, preexec=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("JAXVOCAB_FAULT", None)
    if fault:
        env["JAXVOCAB_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,
    )


def _one_line(stderr: str) -> str:
    lines = [
        x
        for x in re.sub(r"^.*\r", "", stderr, flags=re.MULTILINE).splitlines()
        if x.strip() and not re.match(r"\w+: +\d+%\|", x)
    ]  # progress bars (not a terminal: one per line)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


FAULTS = [
    ("import", "import:loaded", "SIGINT"),
    ("import", "save:state", "SIGINT"),
    ("import", "save:state", "SIGTERM"),
    ("import", "save:state", "SIGKILL"),
    ("import", "save:files", "SIGTERM"),
    ("import", "atomic:rename", "SIGKILL"),
    ("export", "export:loaded", "SIGTERM"),
    ("export", "atomic:rename", "SIGINT"),
    ("export", "atomic:rename", "SIGKILL"),
]


@pytest.mark.parametrize("cmd, point, sig", FAULTS, ids=[f"{c}-{p}-{s}" for c, p, s in FAULTS])
def test_signal_during_convert_then_rerun(src, tmp_path, capsys, cmd, point, sig):
    count(f"interrupt: {sig}")
    source = src["hf"] if cmd == "import" else src["ckpt"]
    before, out = tree_hash(source), tmp_path / "out"
    r = _cli("convert", cmd, source, out, fault=f"{point}:{sig}")
    assert tree_hash(source) == before and not out.exists()
    if sig == "SIGKILL":
        assert r.returncode == -9
    else:
        assert r.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], r.stderr
        assert "no output was written" in _one_line(r.stderr)
        assert leftovers(out) == []
    assert convert([cmd, str(source), str(out)]) == 0, capsys.readouterr().err  # the rerun cleans up and succeeds
    assert leftovers(out) == [] and jaxvocab.load(out).config.vocab_size == 128


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_signal_during_training_checkpoint_then_resume(src, tmp_path, capsys, sig):
    count(f"interrupt: {sig}")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"input_ids": {list(range(i, i + 30))}}}\n' for i in range(8)))
    argv = [
        "--model",
        src["hf"],
        "--data",
        data,
        "--out",
        tmp_path / "run",
        "--trainable",
        "ids:5,9",
        "--steps",
        "3",
        "--save-every",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--quiet",
    ]
    r = _cli("train", *argv, fault=f"train:checkpoint:{sig}")
    if sig == "SIGKILL":
        assert r.returncode == -9
    else:
        assert r.returncode == 143 and "--resume" in _one_line(r.stderr)
    assert (tmp_path / "run" / "checkpoints").is_dir() and not (tmp_path / "run" / "final").exists()
    assert train([str(a) for a in argv] + ["--resume"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "final").is_dir() and leftovers(tmp_path / "run" / "final") == []


# ------------------------------------------------------------------------------ filesystems
@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs dir, or None where mounting is not permitted."""
    mounted = []

    def make(options: str):
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True).returncode:
            return None
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("cmd", ["import", "export"])
def test_full_disk(src, tmp_path, capsys, mount, cmd):
    source = src["hf"] if cmd == "import" else src["ckpt"]
    fs = mount("size=48k")
    if fs is not None:
        _, err = attempt(
            capsys, convert, [cmd, source, fs / "out"], inputs=[source], outs=[fs / "out"], category="filesystem"
        )
        assert "No space left" in err or "too large" in err, err
        assert list(fs.iterdir()) == []
        return
    count("filesystem")  # no mounting here: a file size limit stands in for the full disk

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (48 << 10, 48 << 10))

    r = _cli("convert", cmd, source, tmp_path / "out", preexec=limit)
    assert r.returncode == 1 and "cannot write" in _one_line(r.stderr) and not (tmp_path / "out").exists()
    assert leftovers(tmp_path / "out") == []


def test_orbax_failing_on_a_full_disk_prints_one_line(tmp_path, mount):
    """A disk that fills while orbax writes the state: its threads log the failure through absl and
    tensorstore's callbacks hit orbax's closed event loop (~200 lines of tracebacks, in a real
    process). Import prints one line; training, whose final/ no longer fits, says how to resume."""
    fs = mount("size=1m")
    if fs is None:
        pytest.skip("tmpfs cannot be mounted here")
    hf, _ = make_hf_checkpoint(tmp_path / "hf", vocab=4096, hidden=128, intermediate=256, heads=4, kv_heads=2)
    r = _cli("convert", "import", hf, fs / "out")  # 4.5 MB of state into 1 MB
    assert r.returncode == 1 and "No space left" in _one_line(r.stderr) and list(fs.iterdir()) == []
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"input_ids": {list(range(i, i + 30))}}}\n' for i in range(8)))
    argv = ["--model", hf, "--data", data, "--out", fs / "run", "--trainable", "ids:5,9", "--steps", "2"]
    r = _cli("train", *argv, "--seq-len", "16", "--batch-size", "2", "--quiet")  # the rows' checkpoints fit
    line = _one_line(r.stderr)
    assert r.returncode == 1 and "No space left" in line and "--resume" in line, r.stderr
    assert (fs / "run" / "checkpoints").is_dir() and not (fs / "run" / "final").exists()


def test_background_failures_stay_quiet(capsys):
    """The mechanism, where no tmpfs can be mounted: absl's error records, the unraisable 'Event loop
    is closed' and the never-awaited write coroutines are muted; the command's own error line remains."""
    import asyncio
    import logging
    import warnings

    from jaxvocab.errors import run_command

    loop = asyncio.new_event_loop()
    loop.close()

    class Callback:  # what a finished tensorstore write does once orbax has closed its loop
        def __del__(self):
            loop.call_soon_threadsafe(print)

    async def write_fragment():  # orbax's, dropped unawaited when the write failed
        pass

    def command():
        logging.getLogger("absl").error("background write failed")
        Callback()
        write_fragment()
        raise CheckpointError("out: cannot write it")

    handler = logging.StreamHandler(sys.stderr)  # made now, so it writes where capsys reads
    logging.getLogger("absl").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("default")
            assert run_command(command, "nothing was written") == 1
    finally:
        logging.getLogger("absl").removeHandler(handler)
    assert capsys.readouterr().err == "error: out: cannot write it\n" and warned == []


def test_an_interrupt_python_swallowed_still_stops_the_command(tmp_path, capsys):
    """Ctrl-C raised inside a finaliser (jaxlib's garbage-collection callback, in the report) is only
    'unraisable' to Python, which goes on: the command must still stop before publishing its output."""
    from jaxvocab.errors import run_command

    class Finaliser:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)
            sum(range(1000))  # the handler runs in here: its KeyboardInterrupt cannot leave __del__

    def command():
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights").write_text("x")
            Finaliser()

    assert run_command(command, "no output was written") == 130
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []
    assert capsys.readouterr().err.splitlines()[-1] == "error: interrupted; no output was written"


EXIT_WHILE_COMPILING = """
import sys, threading, time
import jax, jax.numpy as jnp
from jaxvocab.errors import exit_process

def f(x):
    for i in range(200):
        x = jnp.sin(x @ x) + i
    return x

threading.Thread(target=lambda: jax.jit(f).lower(jnp.ones((64, 64))).compile(), daemon=True).start()
time.sleep(0.3)  # XLA is compiling (seconds) in that thread
exit_process(int(sys.argv[1]))
"""


def test_interrupted_exit_while_xla_compiles_does_not_crash():
    """Interpreter teardown while XLA compiles in another thread crashes (139 / 134): what Ctrl-C during
    a first training step did after its error line. 130 / 143 end the process without teardown."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="")
    run = [sys.executable, "-c", EXIT_WHILE_COMPILING]
    for code in (130, 143):
        r = subprocess.run([*run, str(code)], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == code, r.stderr[-500:]


SIGNAL_WHILE_IMPORTING = """
import signal, sys
from train.console import run

def load_main():
    signal.raise_signal(getattr(signal, sys.argv[1]))  # as if Ctrl-C came while jax imports
    import jax  # noqa: F401
    return lambda: 0

run(load_main)
"""


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signal_while_the_console_script_imports_is_one_line(sig, code, word):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="", JAXVOCAB_HUGE_PAGES="0")
    r = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_IMPORTING, sig], env=env, capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (code, f"error: {word}; nothing was done\n")


def test_read_only_filesystem(src, capsys, mount):
    fs = mount("size=1m,ro")
    if fs is None:
        pytest.skip("tmpfs cannot be mounted here")
    for cmd, source in (("import", src["hf"]), ("export", src["ckpt"])):
        _, err = attempt(
            capsys, convert, [cmd, source, fs / "out"], inputs=[source], outs=[fs / "out"], category="filesystem"
        )
        assert "Read-only" in err, err


# ------------------------------------------------------------------ writers, temp dirs, modes
def test_live_writer_is_never_disturbed(src, tmp_path, capsys):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "mine").write_text("1")
        _, err = attempt(capsys, convert, ["import", src["hf"], out], inputs=[src["hf"]], category="concurrency")
        assert "another jaxvocab run" in err and (tmp / "mine").exists()
    assert (out / "mine").read_text() == "1"


def test_exists_check_holds_at_the_final_rename(tmp_path):
    count("concurrency")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while"):
        with atomic_dir(out) as tmp:
            (tmp / "second").write_text("2")
            out.mkdir()  # the first writer finished meanwhile
            (out / "first").write_text("1")
    assert [p.name for p in out.iterdir()] == ["first"] and leftovers(out) == []


def test_stale_temp_dirs_of_killed_runs_are_removed(src, tmp_path, capsys):
    count("concurrency")
    out = tmp_path / "out"
    for name in (f".{out.name}.tmp-dead1", f".{out.name}.tmp-dead2"):
        (tmp_path / name / "state").mkdir(parents=True)
    assert convert(["import", str(src["hf"]), str(out)]) == 0, capsys.readouterr().err
    assert leftovers(out) == [] and out.is_dir()


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_dirs_honour_the_umask(tmp_path, umask, mode):
    count("umask")
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


def test_zz_case_counts(capsys):
    """Not a check: prints the cases per category this session ran (for the closing note)."""
    with capsys.disabled():
        print("\nhardening cases:", dict(sorted(COUNTS.items())), "total", sum(COUNTS.values()))
