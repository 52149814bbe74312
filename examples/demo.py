"""`make demo`: the whole mission, end to end, on a tiny Llama-3 with the real 128256-token vocab.

Every stage goes through the same public API and CLIs a user would call, and prints what it found,
so the demo doubles as a smoke test of the product. Everything lands in one output dir, written
whole or not at all.
"""

from __future__ import annotations

if __name__ == "__main__":  # `make demo`: huge pages as the CLIs get them, before the heavy imports
    from train.hugepages import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from examples.demo_data import EVAL, NEW_PLAIN, NEW_SPECIAL, PROBE, TRAIN, write_jsonl

STAGES = 10


class Stage:
    """Numbered, timed stage headers: long work shows where it is."""

    def __init__(self):
        self.n, self.t0 = 0, time.perf_counter()

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n[{self.n}/{STAGES}] {title}  (t={time.perf_counter() - self.t0:.0f}s)", flush=True)


def run_demo(out: Path, overwrite: bool = False, attention: str = "auto") -> None:
    """Each phase hands the next only what a user would carry between the calls: files and objects."""
    from jaxvocab.io.atomic import atomic_dir

    stage = Stage()
    with atomic_dir(out, overwrite) as tmp:
        model, tok = _import_base(stage, tmp, attention)
        model, probe = _fix_untrained(stage, model, tok)
        ckpt, tok, plan = _expand(stage, model, tok, probe, tmp)
        data, run = _finetune_rows(stage, ckpt, tmp, attention)
        _finetune_lora(stage, ckpt, data, tmp, tok, plan, attention)
        _export_and_generate(stage, run, tmp, tok, plan, attention)
    print(
        f"\ndone in {time.perf_counter() - stage.t0:.0f}s; everything is in {out}/ "
        "(base, ckpt, run/metrics.jsonl, run/final, hf, run-lora, hf-lora, peft-adapter)"
    )


def _import_base(stage: Stage, tmp: Path, attention: str):
    """A base-model-like checkpoint: untrained rows included, so the demo has something to find and fix."""
    import jaxvocab
    from examples.demo_model import build_demo_checkpoint

    stage("building a tiny Llama-3 HF checkpoint (real tokenizer, base-model-like untrained rows)")
    base = build_demo_checkpoint(tmp / "base")
    print(f"  {base.relative_to(tmp)}: {jaxvocab.LlamaConfig.from_hf_file(base).num_params() / 1e6:.1f}M params")

    stage("importing it onto a device mesh")
    mesh = jaxvocab.parse_mesh(None)
    model = jaxvocab.load(base, mesh=mesh, attention=attention)
    tok = jaxvocab.load_tokenizer(base)
    print(f"  mesh {dict(mesh.shape)}; embed sharded as {model.embed[...].sharding.spec}")
    return model, tok


def _fix_untrained(stage: Stage, model, tok):
    """Shows the probability mass the untrained rows steal before and after the fix, the reason to fix them."""
    import jaxvocab
    from jaxvocab import diagnostics
    from jaxvocab.vocab import describe_untrained

    stage("finding untrained rows")
    untrained = jaxvocab.find_untrained(model, tok)
    names = describe_untrained(untrained, tok, limit=6)
    print(f"  {len(untrained)} untrained rows, e.g. {', '.join(names)}")
    probe = diagnostics.probe_ids(tok, PROBE)
    before = _mass(model, probe, untrained)
    model = jaxvocab.fix_untrained(model, untrained, tok=tok)
    print(
        f"  probability mass on them before the fix: {before:.4f}; after (mean init): "
        f"{_mass(model, probe, untrained):.2e}"
    )
    return model, probe


def _expand(stage: Stage, model, tok, probe, tmp: Path):
    """Plan, score the candidate inits with the KL diagnostic, then expand with the one it favours."""
    import jaxvocab
    from jaxvocab import diagnostics

    stage("planning the new tokens")
    plan = jaxvocab.plan_vocab(tok, NEW_SPECIAL + NEW_PLAIN, model=model, special=NEW_SPECIAL, reuse_reserved="special")
    print(_indent(plan.summary()))

    stage("KL diagnostic: how much would each init disturb the model?")
    reports = [diagnostics.expansion_kl(model, probe, plan, tok, init=i) for i in ("mean", "random")]
    print(_indent(diagnostics.summary(reports)))

    stage("expanding the vocabulary (mean init) and saving a jaxvocab checkpoint")
    model, tok, plan = jaxvocab.expand_vocab(model, tok, plan, init="mean")
    ckpt = jaxvocab.save_checkpoint(model, tmp / "ckpt", tokenizer=tok, plan=plan)
    print(f"  {model.config.vocab_size} rows; wrote {ckpt.relative_to(tmp)}")
    return ckpt, tok, plan


def _finetune_rows(stage: Stage, ckpt: Path, tmp: Path, attention: str) -> tuple[Path, Path]:
    """Through jaxvocab-train's own entry point, so the demo exercises the CLI users run."""
    stage("fine-tuning only the new rows (jaxvocab-train)")
    data = tmp / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", TRAIN)
    write_jsonl(data / "eval.jsonl", EVAL)
    run = tmp / "run"
    _train(ckpt, data, run, attention=attention)
    _summarise(run / "metrics.jsonl")
    print(f"  loss and new-token accuracy plotted in {(run / 'loss.png').relative_to(tmp)}")
    return data, run


def _finetune_lora(stage: Stage, ckpt: Path, data: Path, tmp: Path, tok, plan, attention: str) -> None:
    """The merged HF export is reloaded in transformers: the check that the adapters really were merged."""
    import jaxvocab

    stage("fine-tuning LoRA adapters (all 7 projections) + the new rows, merged export reloaded in transformers")
    lora_run, lora_hf = tmp / "run-lora", tmp / "hf-lora"
    lora_flags = ["--lora-rank", "8", "--lora-lr", "5e-3"]
    exports = ["--export-hf", str(lora_hf), "--export-peft", str(tmp / "peft-adapter")]
    _train(ckpt, data, lora_run, [*lora_flags, *exports], attention=attention, steps=60, eval_every=20)
    _summarise(lora_run / "metrics.jsonl")
    _compare_transformers(jaxvocab.load(lora_run / "final"), lora_hf, tok, plan)


def _export_and_generate(stage: Stage, run: Path, tmp: Path, tok, plan, attention: str) -> None:
    """The trained checkpoint's own tokenizer and plan travel into the export, as a user's would."""
    import jaxvocab

    stage("exporting to Hugging Face and reloading in transformers")
    final = jaxvocab.load(run / "final", attention=attention)
    final_tok, final_plan = jaxvocab.load_tokenizer(run / "final"), jaxvocab.load_plan(run / "final")
    hf = jaxvocab.save_hf(final, tmp / "hf", max_shard_size="20MB", tokenizer=final_tok, plan=final_plan)
    print(f"  wrote {hf.relative_to(tmp)}: {', '.join(sorted(p.name for p in hf.iterdir()))}")
    _compare_transformers(final, hf, tok, plan)

    stage("generating with the fine-tuned rows")
    for prompt in ("Q: What is the weather in Lyon?", "Let me reason step by step:"):
        text = jaxvocab.generate(final, tok, prompt, max_new_tokens=12, plan=plan)
        print(f"  {prompt!r} -> {text!r}")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _mass(model, probe, ids) -> float:
    import jax

    logits = np.asarray(jax.jit(lambda m, x: m(x))(model, probe[None] if probe.ndim == 1 else probe))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return float(p[..., ids].sum(-1).mean())


def _train(
    ckpt: Path,
    data: Path,
    run: Path,
    extra: tuple[str, ...] = (),
    attention: str = "auto",
    steps: int = 120,
    eval_every: int = 30,
) -> None:
    from jaxvocab.errors import JaxVocabError
    from train.__main__ import main as train_main

    argv = [
        "--model",
        str(ckpt),
        "--data",
        str(data / "train.jsonl"),
        "--eval",
        str(data / "eval.jsonl"),
        "--out",
        str(run),
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--lr",
        "0.05",
        "--warmup",
        "10",
        "--dtype",
        "float32",
        "--save-every",
        "60",
        "--eval-every",
        str(eval_every),
        "--attention",
        attention,
        *extra,
    ]
    print("  jaxvocab-train " + " ".join(argv))
    if train_main(argv) != 0:
        raise JaxVocabError("the demo's training stage failed (see the error above)")


def _summarise(metrics: Path) -> None:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    first, last = rows[0], rows[-1]
    print(
        f"  train loss {first['loss']:.3f} (step 1) -> {last['loss']:.3f} (step {last['step']}), "
        f"{last['tokens_per_s']:.0f} tokens/s"
    )
    for r in evals:
        acc, tacc = r.get("new_token_acc"), r.get("train_new_token_acc")
        print(
            f"  step {r['step']:>4}: eval loss {r['eval_loss']:.3f}, new-token accuracy "
            f"{'n/a' if acc is None else f'{acc:.0%}'} (eval) / {'n/a' if tacc is None else f'{tacc:.0%}'} (train batch)"
        )


def _compare_transformers(model, hf: Path, tok, plan) -> None:
    try:
        import torch
        from transformers import AutoTokenizer, LlamaForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        print("  (transformers/torch not installed: skipping the reload check)")
        return
    hf_logging.set_verbosity_error()  # its Mistral-regex heuristic misfires on Llama-3's own pattern
    hf_tok = AutoTokenizer.from_pretrained(hf)
    mapped = {t.token: hf_tok.convert_tokens_to_ids(t.token) for t in plan.tokens}
    ok = all(mapped[t.token] == t.id for t in plan.tokens)
    print(f"  AutoTokenizer maps every new token to its planned id: {ok}; len(tokenizer) = {len(hf_tok)}")
    ref = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = np.array([tok.encode(PROBE, bos=True)[:600]], np.int32)
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(ids))[..., : want.shape[-1]]  # the export drops the mesh's padding rows
    print(
        f"  logits on {ids.shape[1]} tokens vs transformers: max abs diff {np.abs(got - want).max():.2e}, "
        f"argmax agreement {(got.argmax(-1) == want.argmax(-1)).mean():.1%}"
    )


def main(argv=None) -> int:
    """`make demo` = `python -m examples.demo`; `jaxvocab-convert demo` is an alias."""
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output dir (default ./demo-out)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "chunked", "cudnn", "splash"],
        help="attention implementation (default auto)",
    )
    args = p.parse_args(argv)
    from jaxvocab.errors import run_command

    return run_command(
        lambda: run_demo(args.out, overwrite=args.overwrite, attention=args.attention), "no output was written"
    )


if __name__ == "__main__":
    sys.exit(main())
