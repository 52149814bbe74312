"""jaxvocab-train: fine-tune only the chosen vocabulary rows of a Llama checkpoint.

Everything that can be checked is checked before the first step (flags, model, trainable ids,
every data line), so a bad run fails in seconds with one `error: ...` line: exit 2 for bad flags,
1 for bad files. Results land in --out: metrics.jsonl, loss.png, checkpoints/ (orbax, resumable)
and final/ (a jaxvocab checkpoint with the rows merged back and the vocab plan carried).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from jaxvocab.errors import CheckpointError, UsageError, brief, malformed, run_command
from jaxvocab.io.atomic import check_output, check_overlap
from jaxvocab.io.multihost import barrier, is_main
from train import distributed
from train.distributed import say

EPILOG = """examples:
  jaxvocab-train --model ckpt --data train.jsonl --out run1 --steps 500 --dtype bfloat16
  jaxvocab-train --model ckpt --data chat.jsonl --eval eval.jsonl --out run2 --trainable new+untrained \\
                 --mesh data=1,fsdp=2,tensor=4 --save-every 100 --export-hf run2-hf
  jaxvocab-train ... --out run2 --resume          # continue after a crash / preemption
  jaxvocab-train tokenize --model ckpt --data a.jsonl.gz b.parquet --out store --workers 8
  jaxvocab-train --model ckpt --data store --out run3 --distributed   # same command on every host of a pod
  jaxvocab-train --model ckpt --data chat.jsonl --out run3 --lora-rank 16 --lora-lr 2e-4 \
                 --export-hf run3-merged --export-peft run3-adapter   # LoRA on all 7 projections + the rows

data lines: {"text": "..."} | {"messages": [{"role": "user", "content": "..."}, ...]}
            | {"input_ids": [...], "loss_mask": [...]}   (loss_mask optional)
--trainable: new | untrained | new+untrained | ids:1,2,3 | tokens:@file.txt (one token per line)
             | none (adapters only; needs --lora-rank)
"""

# Flags whose change makes a resumed run a different run.
RUN_KEYS = (
    "model",
    "data",
    "eval",
    "trainable_ids",
    "tables",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "schedule",
    "weight_decay",
    "clip",
    "dtype",
    "seed",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "lora_lr",
    "lora_init",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxvocab-train",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint dir (jaxvocab, HF or Meta)")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a tokenized store (jaxvocab-train tokenize; read lazily, per host) or a JSONL file",
    )
    p.add_argument("--eval", type=Path, help="eval JSONL (loss and new-token accuracy)")
    p.add_argument(
        "--out", type=Path, required=True, help="run dir (refused if it exists, unless --resume/--overwrite)"
    )
    p.add_argument("--trainable", default="new", help="which rows train (default: new; see below)")
    p.add_argument(
        "--tables",
        default="both",
        choices=["both", "embed", "head"],
        help="untied models: train embedding rows, head rows or both (default both)",
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (default: 1024, capped by the model)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay (applies to the rows only)")
    p.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping (0: off)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument(
        "--remat",
        default="auto",
        choices=["auto", "full", "dots", "none"],
        help="recompute in the backward pass: full (each layer), dots (all but the matmul outputs), none, "
        "or auto (default): dots when its estimate fits in half the device memory (CPU: available RAM), else full",
    )
    p.add_argument("--no-remat", dest="remat", action="store_const", const="none", help="same as --remat none")
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "chunked", "cudnn", "splash"],
        help="attention implementation (default auto: splash on TPU, cuDNN on GPU, else xla for "
        "short sequences and memory-linear chunked for long ones)",
    )
    p.add_argument("--mesh", help="e.g. data=1,fsdp=2,tensor=4 (default: fsdp over all devices)")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: final only)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start afresh")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (always at the end)")
    p.add_argument("--export-hf", type=Path, help="also write the final model as an HF dir here (adapters merged)")
    g = p.add_argument_group("LoRA (adapters on the frozen projections, trained beside the rows)")
    g.add_argument("--lora-rank", type=int, help="adapter rank r (enables LoRA)")
    g.add_argument("--lora-alpha", type=float, help="scale is alpha/r (default: 2 x rank)")
    g.add_argument(
        "--lora-targets", default="q,k,v,o,gate,up,down", help="projections that get adapters (default: all seven)"
    )
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-lr", type=float, help="adapters' peak learning rate (default: --lr)")
    g.add_argument("--lora-init", type=Path, help="start the adapters from a PEFT LoRA dir (same r, alpha, targets)")
    g.add_argument("--export-peft", type=Path, help="also write the adapters + rows as a PEFT adapter dir here")
    p.add_argument(
        "--export-dtype",
        choices=["float32"],
        help="--export-hf / final/ dtype (default: the checkpoint's; float32 keeps the f32 merge)",
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip (and log) a step whose loss or gradient is NaN/Inf instead of stopping the run there",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="load a --model whose weights hold NaN or Inf")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    distributed.add_args(p)
    return p


def build_tokenize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxvocab-train tokenize",
        description="Tokenize JSONL (.jsonl, .jsonl.gz) and Parquet files once, in parallel, "
        "into a store that training reads lazily, per host.",
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint dir whose tokenizer (and vocab plan) to use")
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        required=True,
        metavar="SRC",
        help="source files, in order: records with 'text', 'messages' or 'input_ids' (+ 'loss_mask')",
    )
    p.add_argument("--out", type=Path, required=True, help="store dir to write (atomically)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def cmd_tokenize(args) -> None:
    from train import store

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    out = args.out.resolve()
    for src in (args.model, *args.data):
        if out == src.resolve() or out in src.resolve().parents or src.resolve() in out.parents:
            raise UsageError(f"--out {args.out} overlaps {src}; choose an --out outside your inputs")
    from jaxvocab.io.atomic import check_output

    check_output(args.out, args.overwrite, "--out")
    m = store.tokenize(args.model, args.data, args.out, args.workers, args.overwrite)
    print(
        f"wrote {args.out}: {m['docs']} documents, {m['tokens']} tokens, {m['targets']} targets"
        + (f" ({m['dropped']} records without a target dropped)" if m["dropped"] else "")
    )


def check_flags(args) -> None:
    positive = {
        "--steps": args.steps,
        "--batch-size": args.batch_size,
        "--grad-accum": args.grad_accum,
        "--keep": args.keep,
        "--lr": args.lr,
    }
    for flag, v in positive.items():
        if not (0 < v < 1e38):  # also finite in float32, where the step computes
            raise UsageError(f"{flag} {v}: must be a positive (finite) number")
    for flag, v in {
        "--warmup": args.warmup,
        "--save-every": args.save_every,
        "--eval-every": args.eval_every,
        "--weight-decay": args.weight_decay,
        "--clip": args.clip,
    }.items():
        if not (0 <= v < 1e38):
            raise UsageError(f"{flag} {v}: must be a finite number >= 0")
    if args.seq_len is not None and args.seq_len < 2:
        raise UsageError(f"--seq-len {args.seq_len}: need at least 2 (one input and one target per row)")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if args.out.exists() and not (args.resume or args.overwrite):
        raise UsageError(
            f"{args.out}: already exists; pass --resume to continue it, --overwrite to replace it, "
            "or choose another --out"
        )
    tokens_file = Path(args.trainable[len("tokens:@") :]) if args.trainable.startswith("tokens:@") else None
    check_overlap(
        {"--out": args.out, "--export-hf": args.export_hf, "--export-peft": args.export_peft},
        {
            "--model": args.model,
            "--data": args.data,
            "--eval": args.eval,
            "--trainable": tokens_file,
            "--lora-init": args.lora_init,
        },
    )
    check_output(args.out, True, "--out")
    for flag, d in (("--export-hf", args.export_hf), ("--export-peft", args.export_peft)):
        if d is not None:
            check_output(d, args.overwrite, flag)
    check_lora_flags(args)


def check_lora_flags(args) -> None:
    """The LoRA flags, checked (and --lora-alpha / --lora-lr defaulted) before anything loads."""
    lora_only = {
        "--lora-alpha": args.lora_alpha,
        "--lora-lr": args.lora_lr,
        "--export-peft": args.export_peft,
        "--lora-init": args.lora_init,
        "--lora-dropout": args.lora_dropout or None,
        "--lora-targets": None if args.lora_targets == "q,k,v,o,gate,up,down" else args.lora_targets,
    }
    if args.lora_rank is None:
        given = [f for f, v in lora_only.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} needs --lora-rank R (LoRA is off without it)")
        if args.trainable == "none":
            raise UsageError("--trainable none: nothing would train; add --lora-rank R to train adapters only")
        args.lora_targets = None
        return
    if args.lora_rank <= 0:
        raise UsageError(f"--lora-rank {args.lora_rank}: must be a positive integer (e.g. 16)")
    if args.lora_lr is not None and not args.lora_lr > 0:
        raise UsageError(f"--lora-lr {args.lora_lr}: must be positive")
    from jaxvocab.lora import LoraSpec, parse_targets

    args.lora_alpha = float(2 * args.lora_rank if args.lora_alpha is None else args.lora_alpha)
    args.lora_targets = ",".join(parse_targets(args.lora_targets))
    args.lora_spec = LoraSpec(args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")), args.lora_dropout)


def tokenizer_of(model):
    """The checkpoint's own tokenizer, or None when it ships none (then data must be pre-tokenized).

    The tokens the vocab plan added are what this run teaches, so they are matched wherever they
    appear in the data's text and chat content, special or not; the model's older control tokens
    (<|eot_id|>, ...) stay literal text, so data cannot inject them by accident.
    """
    src = getattr(model, "source_dir", None)
    if not src or not any((Path(src) / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
        return None
    from jaxvocab.tokenizer import load_tokenizer
    from jaxvocab.vocab import VocabPlan

    with malformed(f"{src}: tokenizer.json / tokenizer_config.json", "fix or re-download the tokenizer files"):
        tok = load_tokenizer(src)
    plan = getattr(model, "vocab_plan", None)
    if plan:
        tok.added_plain |= {
            t.token
            for t in VocabPlan.from_json(plan).tokens
            if t.action != "existing" and tok.special_tokens.get(t.token) == t.id
        }
    return tok


def resolve_trainable(spec: str, model, tok) -> list[int]:
    """--trainable value -> sorted ids (see EPILOG)."""
    from jaxvocab.rows import new_ids

    if spec == "none":
        return []
    if spec.startswith("ids:"):
        try:
            ids = {int(x) for x in spec[4:].split(",") if x.strip()}
        except ValueError:
            raise UsageError(f"--trainable {spec!r}: expected ids:1,2,3 (integers)") from None
    elif spec.startswith("tokens:"):
        ids = set(_token_file_ids(spec, tok))
    else:
        ids = set()
        for part in spec.split("+"):
            if part == "new":
                if not getattr(model, "vocab_plan", None):
                    raise UsageError(
                        "--trainable new: the checkpoint has no vocab_plan.json (its vocabulary was not "
                        "expanded by jaxvocab); pass --trainable ids:... or tokens:@file.txt"
                    )
                ids |= set(new_ids(model))
            elif part == "untrained":
                from jaxvocab.vocab import find_untrained

                ids |= set(find_untrained(model, tok))
            else:
                raise UsageError(
                    f"--trainable {spec!r}: expected new, untrained, new+untrained, ids:1,2,3 or tokens:@file.txt"
                )
    if not ids:
        raise UsageError(
            f"--trainable {spec}: no trainable ids (nothing new/untrained in this checkpoint?); "
            "pass --trainable ids:... explicitly"
        )
    return sorted(ids)


def _token_file_ids(spec: str, tok) -> list[int]:
    name = spec[len("tokens:") :]
    if not name.startswith("@"):
        raise UsageError(f"--trainable {spec!r}: expected tokens:@file.txt (a file with one token per line)")
    path = Path(name[1:])
    if tok is None:
        raise UsageError(
            f"--trainable {spec}: the checkpoint has no tokenizer files to look tokens up in; pass --trainable ids:..."
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"--trainable {spec}: cannot read {path} ({e.strerror})") from None
    ids = []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        if text in tok.special_tokens:
            ids.append(tok.special_tokens[text])
            continue
        enc = tok.encode(text)
        if len(enc) != 1:
            raise UsageError(
                f"--trainable {spec}: {path}:{n}: {text!r} is {len(enc)} tokens, not one; "
                "list single tokens of the (expanded) tokenizer"
            )
        ids.append(enc[0])
    return ids


def _run_record(args, ids) -> dict:
    rec = {
        "model": str(args.model.resolve()),
        "data": str(args.data.resolve()),
        "eval": str(args.eval.resolve()) if args.eval else None,
        "trainable": args.trainable,
        "trainable_ids": ids,
        "steps": args.steps,
        "lora_init": str(args.lora_init.resolve()) if args.lora_init else None,
    }
    rec.update({k: getattr(args, k) for k in RUN_KEYS if k not in rec})
    return rec


def _check_resume(out: Path, rec: dict) -> None:
    f = out / "run.json"
    if not f.is_file():
        return
    try:
        old = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        old = None
    if not isinstance(old, dict):
        raise CheckpointError(
            f"{f}: corrupt (not a JSON object); --resume cannot tell which run this was: "
            "restore the file or start a new --out"
        )
    keys = RUN_KEYS + (("steps",) if rec["schedule"] == "cosine" else ())
    for k in keys:
        if old.get(k) != rec[k]:
            flag = "--trainable" if k == "trainable_ids" else "--" + k.replace("_", "-")
            raise UsageError(
                f"--resume: {flag} is {brief(rec[k])} but the run in {out} used {brief(old.get(k))}; "
                "resume with the same flags or start a new --out"
            )


def cmd_train(args) -> None:
    check_flags(args)
    import jaxvocab
    from jaxvocab import rows
    from jaxvocab.sharding import parse_mesh
    from train import loop
    from train.data import read_jsonl

    mesh = parse_mesh(args.mesh)
    model = jaxvocab.load(
        args.model,
        mesh=mesh,
        show_progress=not args.quiet and is_main(),
        allow_nonfinite=args.allow_nonfinite,
        attention=args.attention,
    )
    model.compute_dtype = args.dtype
    plan = Path(getattr(model, "source_dir", None) or args.model) / "vocab_plan.json"
    if not getattr(model, "vocab_plan", None) and plan.is_file():  # an HF dir exported by jaxvocab
        model.vocab_plan = plan.read_text()
    limit = model.config.max_position_embeddings
    args.seq_len = args.seq_len or min(1024, limit)
    if args.seq_len > limit:
        raise UsageError(
            f"--seq-len {args.seq_len}: longer than the model's max_position_embeddings ({limit}); "
            f"pass --seq-len {limit} or less"
        )
    tok = tokenizer_of(model)
    ids = resolve_trainable(args.trainable, model, tok)
    rm = rows.split(model, ids, args.tables, getattr(args, "lora_spec", None), args.seed)
    if args.lora_init is not None:
        from jaxvocab.io.peft import load_adapters

        load_adapters(rm, args.lora_init)
    docs = _training_data(args, model, tok)
    eval_docs = read_jsonl(args.eval, tok, model.config.vocab_size) if args.eval else None
    rec = _run_record(args, ids)
    if args.resume:
        _check_resume(args.out, rec)
    barrier("flags-checked")  # every process has judged --out before process 0 creates it
    if is_main():
        if args.overwrite and not args.resume and args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "run.json").write_text(json.dumps(rec, indent=2) + "\n")
    barrier("out-created")

    cfg = loop.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        schedule=args.schedule,
        lora_lr=args.lora_lr,
        weight_decay=args.weight_decay,
        clip=args.clip,
        seed=args.seed,
        save_every=args.save_every,
        keep=args.keep,
        eval_every=args.eval_every,
        remat=args.remat,
        skip_nonfinite=args.skip_nonfinite,
    )
    trained = loop.run(
        rm, cfg, mesh, docs, args.out, eval_docs=eval_docs, resume=args.resume, show_progress=not args.quiet
    )
    _report_reads(args.out, docs)
    final = rows.merge(trained, args.export_dtype)
    jaxvocab.save_checkpoint(final, args.out / "final", overwrite=True)
    what = f"{len(ids)} rows" + (f" + rank-{args.lora_rank} adapters" if args.lora_rank else "")
    say(f"trained {what} for {args.steps} steps; wrote {args.out / 'final'}")
    if args.export_hf is not None:
        jaxvocab.save_hf(final, args.export_hf, overwrite=args.overwrite, show_progress=not args.quiet)
        say(f"wrote {args.export_hf}")
    if args.export_peft is not None:
        from jaxvocab.io.peft import save_peft

        save_peft(trained, args.export_peft, overwrite=args.overwrite)
        say(f"wrote {args.export_peft}")


def _training_data(args, model, tok):
    """A store dir is opened (checked, nothing read yet); a JSONL file is tokenized here, in RAM."""
    from train.data import read_jsonl
    from train.store import Store, is_store

    if is_store(args.data):
        return Store(args.data, model.config.vocab_size, tok)
    return read_jsonl(args.data, tok, model.config.vocab_size)


def _report_reads(out: Path, docs) -> None:
    """data_read/process-I.json: what this process read of the store (each host reads only its share)."""
    import jax

    from train import store

    if not isinstance(docs, store.Store):
        return
    (out / "data_read").mkdir(exist_ok=True)
    rec = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "bytes": store.BYTES_READ,
        "pieces": store.ROWS_READ,
        "store_bytes": 5 * docs.manifest["tokens"],
    }
    (out / "data_read" / f"process-{jax.process_index()}.json").write_text(json.dumps(rec) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    tokenize = argv[:1] == ["tokenize"]
    parser = build_tokenize_parser() if tokenize else build_parser()
    try:
        args = parser.parse_args(argv[1:] if tokenize else argv)
    except SystemExit as e:
        return int(e.code or 0)
    if tokenize:
        return run_command(lambda: cmd_tokenize(args), "no store was written")

    def command():
        distributed.start(args)
        cmd_train(args)

    return distributed.run_job(command, f"rerun with --resume to continue from the last checkpoint in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
