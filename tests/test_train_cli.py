"""jaxvocab-train end to end: outputs, one-line errors and exit codes, kill -9 + --resume, the mission."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxvocab
from tests.builders import make_hf_checkpoint, random_llama, train_argv
from train.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
IDS = "5,9,77,200"


def _data(path: Path, n=40, seed=0):
    """Docs where the chosen ids are frequent targets, so training them measurably lowers the loss."""
    rs = np.random.RandomState(seed)
    with path.open("w") as f:
        for _ in range(n):
            ids = rs.randint(0, 256, rs.randint(10, 50))
            ids[1::3] = rs.choice([5, 9, 77, 200], len(ids[1::3]))
            f.write(json.dumps({"input_ids": ids.tolist()}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt, _ = make_hf_checkpoint(d / "model", tied=True, seed=6, max_pos=128)
    return ckpt, _data(d / "train.jsonl"), _data(d / "eval.jsonl", 10, seed=1)


def _run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def _host(a):
    return np.asarray(jax.device_get(a))


def test_end_to_end(setup, tmp_path, capsys):
    ckpt, data, evalf = setup
    out, hf = tmp_path / "run", tmp_path / "hf"
    flags = ["--eval", evalf, "--steps", 20, "--batch-size", 4, "--seq-len", 64, "--lr", 3e-2, "--warmup", 2]
    flags += ["--dtype", "float32", "--save-every", 10, "--eval-every", 5, "--export-hf", hf, "--quiet"]
    code, cap = _run(capsys, *train_argv(ckpt, data, out, *flags, trainable=f"ids:{IDS}"))
    assert code == 0, cap.err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 21))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in recs)
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10, 15, 20] and all("new_token_acc" in r for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05  # the rows learned something
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(os.listdir(out / "checkpoints")) == ["10", "20"]
    before, after = jaxvocab.load(ckpt, show_progress=False), jaxvocab.load(out / "final", show_progress=False)
    ids = [int(i) for i in IDS.split(",")]
    keep = np.setdiff1d(np.arange(256), ids)
    e0, e1 = _host(before.embed[...]), _host(after.embed[...])
    assert np.array_equal(e0[keep], e1[keep]) and not np.any(np.all(e0[ids] == e1[ids], axis=1))
    for name, w in before.layers.weights().items():
        assert np.array_equal(_host(w), _host(after.layers.weights()[name]))
    # the HF export is what transformers loads
    import torch
    from transformers import LlamaForCausalLM

    tm = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert np.array_equal(tm.model.embed_tokens.weight.detach().numpy(), e1)


@pytest.mark.parametrize(
    "extra, code, match",
    [
        (["--trainable", "new"], 2, "no vocab_plan.json"),
        (["--trainable", "ids:"], 2, "--trainable ids:: lists no ids"),
        (["--trainable", "ids:5,x"], 2, "integers"),
        (["--trainable", "ids:999"], 2, "--trainable ids:999: trainable id 999 is outside the model's vocabulary"),
        (["--lora-rank", "100000"], 2, "--lora-rank 100000: larger than"),
        (["--trainable", "tokens:@nope.txt"], 2, "no tokenizer files"),
        (["--seq-len", "4096"], 2, "max_position_embeddings"),
        (["--steps", "0"], 2, "--steps 0"),
        (["--steps", "3", "--warmup", "3"], 2, "must be below --steps"),  # the lr would never reach --lr
        (["--tables", "embed"], 2, "ties embedding and head"),
        (["--mesh", "fsdp=3"], 2, "--mesh"),
        (["--data", "MISSING"], 1, "no such file"),
        (["--data", "BAD"], 1, "bad.jsonl:2: invalid JSON"),
        (["--model", "NOMODEL"], 1, "no such file or directory"),
    ],
)
def test_bad_inputs_one_line_errors(setup, tmp_path, capsys, extra, code, match):
    ckpt, data, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2\n')
    subst = {"MISSING": tmp_path / "missing.jsonl", "BAD": bad, "NOMODEL": tmp_path / "nomodel"}
    extra = [str(subst.get(x, x)) for x in extra]
    args = train_argv(ckpt, data, tmp_path / "out", "--seq-len", 64, "--quiet", *extra, trainable=f"ids:{IDS}")
    got, cap = _run(capsys, *args)
    assert got == code, cap.err
    assert cap.err.startswith("error: ") and cap.err.strip().count("\n") == 0 and match in cap.err, cap.err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_help_teaches(capsys):
    """What the command does, every default a run depends on, and the examples as they are typed."""
    code = main(["--help"])
    text = capsys.readouterr().out
    assert code == 0 and "Fine-tune only chosen rows" in text and "tokenize" in text.splitlines()[0]
    for default in ("optimizer steps (default 100)", "(default 8)", "(default 0.001)", "(default 3)", "(default 100;"):
        assert default in " ".join(text.split()), default
    assert "--lora-lr 2e-4 \\\n" in text  # a continued example keeps its backslash and line break


def test_existing_out_and_flag_conflicts(setup, tmp_path, capsys):
    ckpt, data, _ = setup
    out = tmp_path / "run"
    out.mkdir()
    # default --dtype bfloat16 compute over the f32 checkpoint
    base = train_argv(ckpt, data, out, "--seq-len", 32, "--steps", 2, "--quiet", trainable=f"ids:{IDS}")
    code, cap = _run(capsys, *base)
    assert code == 2 and "--resume" in cap.err and "--overwrite" in cap.err
    code, cap = _run(capsys, *base, "--resume", "--overwrite")
    assert code == 2
    code, cap = _run(capsys, *base, "--overwrite")
    assert code == 0, cap.err
    assert all(np.isfinite(json.loads(x)["loss"]) for x in (out / "metrics.jsonl").read_text().splitlines())
    code, cap = _run(capsys, *base, "--resume", "--lr", "0.5")
    assert code == 2 and "--lr" in cap.err
    code, cap = _run(capsys, *train_argv(ckpt, data, ckpt / "sub", trainable="ids:5"))
    assert code == 2 and "outside the inputs" in cap.err
    code, cap = _run(capsys, *train_argv(ckpt, data, tmp_path / "x", "--schedule", "linear"))
    assert code == 2 and "invalid choice" in cap.err


def test_trainable_specs(tmp_path, llama3_tokenizer_dir):
    from jaxvocab.errors import UsageError
    from jaxvocab.io.tokenizer_read import load_tokenizer
    from jaxvocab.vocab import PlannedToken, VocabPlan
    from train.__main__ import resolve_trainable

    tok = load_tokenizer(llama3_tokenizer_dir)
    f = tmp_path / "tokens.txt"
    f.write_text("<|eot_id|>\n\nhello\n")
    assert resolve_trainable(f"tokens:@{f}", None, tok) == sorted([128009, tok.encode("hello")[0]])
    f.write_text("hello\nhello wonderful world\n")
    with pytest.raises(UsageError, match=r"tokens.txt:2: 'hello wonderful world' is 3 tokens"):
        resolve_trainable(f"tokens:@{f}", None, tok)
    assert resolve_trainable("ids:7,3,7", None, tok) == [3, 7]
    f.write_text('" world"\n')  # quoted as in --add-tokens files: the leading space is kept
    assert resolve_trainable(f"tokens:@{f}", None, tok) == tok.encode(" world")

    path, _ = make_hf_checkpoint(tmp_path / "m", zero_rows=(10, 11, 12))
    model = jaxvocab.load(path, show_progress=False)
    plan = VocabPlan(
        [
            PlannedToken("<a>", 12, "reserved", "<|r|>"),
            PlannedToken("hi", 40, "existing"),
            PlannedToken("<b>", 200, "spare_row"),
        ],
        old_rows=256,
        new_rows=256,
        tokenizer_size_before=256,
        tokenizer_size_after=256,
        pad_to_multiple_of=1,
        padding_ids=[],
    )
    assert resolve_trainable("new", model, None, plan) == [12, 200]
    assert resolve_trainable("untrained", model, None, plan) == [10, 11, 12]
    assert resolve_trainable("new+untrained", model, None, plan) == [10, 11, 12, 200]
    with pytest.raises(UsageError, match="expected new, untrained"):
        resolve_trainable("fresh", model, None, plan)


def _env():
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT))
    return env


def test_orbax_loads_only_when_a_checkpoint_is_saved_or_restored(tmp_path):
    """orbax and tensorstore (~25 MB resident) stay out of the process until the first save, so
    they add nothing to the training steps' peak memory."""
    code = (
        "import sys, train.__main__, train.loop, jaxvocab.io, jaxvocab.io.checkpoint\n"
        "from pathlib import Path\n"
        "ckpts = train.loop.Checkpoints(Path(sys.argv[1]), 2)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('orbax', 'tensorstore')), Path(sys.argv[1]).exists())\n"
        "ckpts.manager(); print('orbax.checkpoint' in sys.modules, Path(sys.argv[1]).is_dir())"
    )
    got = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ck")], env=_env(), cwd=ROOT, capture_output=True, text=True
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.split("\n")[:2] == ["[] False", "True True"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "lora", [[], ["--lora-rank", "2", "--lora-targets", "q,down", "--lora-dropout", "0.1"]], ids=["rows", "rows+lora"]
)
def test_kill_9_and_resume_is_bit_identical(setup, tmp_path, lora):
    ckpt, data, _ = setup
    steps = 200

    def cmd(out, *extra):
        flags = ["--steps", steps, "--batch-size", 2, "--seq-len", 32, "--lr", "1e-2", "--warmup", 5]
        flags += ["--save-every", 7, "--keep", 2, "--dtype", "float32", "--mesh", "fsdp=2", "--quiet", *lora, *extra]
        return [sys.executable, "-m", "train", *train_argv(ckpt, data, out, *flags, trainable=f"ids:{IDS}")]

    ref = subprocess.run(cmd(tmp_path / "ref"), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, seen = out / "metrics.jsonl", 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        seen = len(lines)
        if seen >= 30:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    assert 30 <= seen < steps and not (out / "final").exists()
    resumed = subprocess.run(cmd(out, "--resume"), env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    ra = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rb] == list(range(1, steps + 1))
    assert [(r["loss"], r["grad_norm"]) for r in rb] == [(r["loss"], r["grad_norm"]) for r in ra]
    a = jaxvocab.load(tmp_path / "ref" / "final", show_progress=False)
    b = jaxvocab.load(out / "final", show_progress=False)
    assert np.array_equal(_host(a.embed[...]), _host(b.embed[...]))
    for name, w in a.layers.weights().items():  # with --lora-rank: the merged adapters too
        assert np.array_equal(_host(w), _host(b.layers.weights()[name])), name


@pytest.mark.slow
def test_mission_plan_expand_train_new_rows(tmp_path, capsys, llama3_tokenizer_dir):
    """Real Llama-3 tokenizer: plan two tokens, expand, train --trainable new on chat data, generate."""
    from jaxvocab.io.tokenizer_read import load_tokenizer

    tok = load_tokenizer(llama3_tokenizer_dir)
    cfg = jaxvocab.LlamaConfig(
        tok.n_words,
        64,
        128,
        2,
        4,
        2,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        eos_token_id=128001,
        dtype="float32",
    )
    model = random_llama(cfg)
    plan = jaxvocab.plan_vocab(tok, ["<|lang_xx|>", "<think>"], model=model)
    model, tok, plan = jaxvocab.expand_vocab(model, tok, plan)
    jaxvocab.save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok, plan=plan)
    new = sorted(t.id for t in plan.tokens if t.action != "existing")
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(12):
            msgs = [
                {"role": "user", "content": f"Say it in xx: number {i}"},
                {"role": "assistant", "content": f"<|lang_xx|> <think> {i} <|lang_xx|>"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    out = tmp_path / "run"
    flags = ["--eval", data, "--steps", 6, "--batch-size", 8, "--seq-len", 64, "--lr", 5e-2, "--dtype", "float32"]
    code, cap = _run(capsys, *train_argv(tmp_path / "ckpt", data, out, *flags, "--mesh", "data=8", "--quiet"))
    assert code == 0, cap.err
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["eval_new_tokens"] > 0 and recs[-1]["new_token_acc"] is not None
    final = jaxvocab.load(out / "final", show_progress=False)
    assert (out / "final" / "vocab_plan.json").is_file() and jaxvocab.load_plan(out / "final") == plan
    ftok = load_tokenizer(out / "final")
    assert all(ftok.encode(t.token, allowed_special="all") == [t.id] for t in plan.tokens)  # <|lang_xx|>: special
    e0, e1 = _host(model.embed[...]), _host(final.embed[...])
    keep = np.setdiff1d(np.arange(cfg.vocab_size), new)
    assert np.array_equal(e0[keep], e1[keep]) and not np.array_equal(e0[new], e1[new])
    text = jaxvocab.generate(final, ftok, [{"role": "user", "content": "Say it in xx: number 3"}], 8, plan=plan)
    assert isinstance(text, str)


def test_training_text_matches_the_plans_new_special_tokens(tmp_path, llama3_tokenizer_dir):
    """New control tokens are what a run teaches, so text lines must encode them as their ids;
    the model's older specials stay literal text."""
    from jaxvocab.io.tokenizer_files import write_tokenizer_files
    from jaxvocab.io.tokenizer_read import load_tokenizer
    from train.__main__ import tokenizer_of

    tok = load_tokenizer(llama3_tokenizer_dir)
    plan = jaxvocab.plan_vocab(tok, ["<|tool|>"], special=True, pad_to_multiple_of=1)
    (tmp_path / "tok").mkdir()
    write_tokenizer_files(
        llama3_tokenizer_dir, tmp_path / "tok", plan.renamed, plan.appended, plan.special_ids, plan.new_rows
    )
    (new_id,) = plan.renamed
    taught = tokenizer_of(tmp_path / "tok", plan)
    got = taught.encode("call <|tool|> now <|eot_id|>")
    assert new_id in got and tok.eot_id not in got
    assert new_id not in tokenizer_of(tmp_path / "tok").encode("call <|tool|> now")
    assert taught.added_plain != load_tokenizer(tmp_path / "tok").added_plain  # a new tokenizer, none mutated
