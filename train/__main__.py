"""jaxvocab-train: fine-tune only the chosen vocabulary rows of a Llama checkpoint.

Everything that can be checked is checked before the first step (flags, model, trainable ids,
every data line), so a bad run fails in seconds with one `error: ...` line: exit 2 for bad flags,
1 for bad files. Results land in --out: metrics.jsonl, loss.png, checkpoints/ (orbax, resumable)
and final/ (a jaxvocab checkpoint with the rows merged back and the vocab plan carried).
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m train`: as the console script, before the heavy imports
    from train.hugepages import restart_with_huge_pages

    restart_with_huge_pages()

import json
import shutil
import sys
from pathlib import Path

from jaxvocab.errors import CheckpointError, UsageError, WriteError, brief, run_command
from jaxvocab.io.atomic import check_output
from jaxvocab.io.multihost import barrier, is_main
from train import compile_cache, distributed
from train.distributed import say
from train.flags import build_parser, build_tokenize_parser, check_flags
from train.trainable import resolve_trainable, tokenizer_of

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
    "lora_init",  # before the values it supplies when they are not given (train/flags.py)
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_dropout",
    "lora_lr",
)


def cmd_tokenize(args) -> None:
    from train import store

    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: must be at least 1")
    out = args.out.resolve()
    for src in (args.model, *args.data):
        if out == src.resolve() or out in src.resolve().parents or src.resolve() in out.parents:
            raise UsageError(f"--out {args.out} overlaps {src}; choose an --out outside your inputs")

    check_output(args.out, args.overwrite, "--out")
    m = store.tokenize(args.model, args.data, args.out, args.workers, args.overwrite)
    print(
        f"wrote {args.out}: {m['docs']} documents, {m['tokens']} tokens, {m['targets']} targets"
        + (f" ({m['dropped']} records without a target dropped)" if m["dropped"] else "")
    )


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


def _shown(value) -> str:
    return "not given" if value is None else brief(value)


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
                f"--resume: {flag} is {_shown(rec[k])} but the run in {out} used {_shown(old.get(k))}; "
                "resume with the same flags or start a new --out"
            )


def cmd_train(args) -> None:
    check_flags(args)
    from jaxvocab import rows
    from jaxvocab.sharding import parse_mesh
    from train import loop
    from train.data import read_jsonl

    mesh = parse_mesh(args.mesh)
    model, plan = _load_model(args, mesh)
    tok = tokenizer_of(args.model, plan)
    ids = resolve_trainable(args.trainable, model, tok, plan)
    rm = rows.split(model, ids, args.tables, getattr(args, "lora_spec", None), args.seed)
    if args.lora_init is not None:
        from jaxvocab.io.peft import load_adapters

        load_adapters(rm, args.lora_init)
    docs = _training_data(args, model, tok)
    eval_docs = read_jsonl(args.eval, tok, model.config.vocab_size) if args.eval else None
    _prepare_out(args, _run_record(args, ids))
    trained = loop.run(
        rm,
        _train_config(args),
        mesh,
        docs,
        args.out,
        eval_docs=eval_docs,
        resume=args.resume,
        show_progress=not args.quiet,
    )
    _report_reads(args.out, docs)
    try:
        _write_results(args, trained, plan, ids)
    except WriteError as e:
        hint = f"the trained run is kept in {args.out}: free some space, then rerun the same command with --resume"
        raise WriteError(e.path, e.reason, hint) from None


def _load_model(args, mesh):
    """The model, built with the run's construction choices, and its vocab plan (or None)."""
    import jaxvocab

    model = jaxvocab.load(
        args.model,
        mesh=mesh,
        show_progress=not args.quiet and is_main(),
        allow_nonfinite=args.allow_nonfinite,
        attention=args.attention,
        remat=args.remat,
        compute_dtype=args.dtype,
    )
    plan = jaxvocab.load_plan(args.model)  # a jaxvocab checkpoint's, or an HF dir's that jaxvocab exported
    limit = model.config.max_position_embeddings
    args.seq_len = args.seq_len or min(1024, limit)
    if args.seq_len > limit:
        raise UsageError(
            f"--seq-len {args.seq_len}: longer than the model's max_position_embeddings ({limit}); "
            f"pass --seq-len {limit} or less"
        )
    return model, plan


def _prepare_out(args, rec: dict) -> None:
    if args.resume:
        _check_resume(args.out, rec)
    barrier("flags-checked")  # every process has judged --out before process 0 creates it
    if is_main():
        if args.overwrite and not args.resume and args.out.exists():
            shutil.rmtree(args.out)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "run.json").write_text(json.dumps(rec, indent=2) + "\n")
    barrier("out-created")


def _train_config(args):
    from train import loop

    return loop.TrainConfig(
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


def _write_results(args, trained, plan, ids) -> None:
    """final/ (rows merged back, the source's tokenizer files and the plan carried), then the exports."""
    import jaxvocab
    from jaxvocab import rows
    from jaxvocab.io.carried import CarriedFiles

    final = rows.merge(trained, args.export_dtype)
    files = CarriedFiles.of(args.model)
    jaxvocab.save_checkpoint(final, args.out / "final", tokenizer=files, plan=plan, overwrite=True)
    what = f"{len(ids)} row{'' if len(ids) == 1 else 's'}" + (
        f" + rank-{args.lora_rank} adapters" if args.lora_rank else ""
    )
    say(f"trained {what} for {args.steps} steps; wrote {args.out / 'final'}")
    if args.export_hf is not None:
        jaxvocab.save_hf(
            final, args.export_hf, tokenizer=files, plan=plan, overwrite=args.overwrite, show_progress=not args.quiet
        )
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
    compile_cache.enable()
    if tokenize:
        return run_command(lambda: cmd_tokenize(args), "no store was written")

    def command():
        distributed.start(args)
        cmd_train(args)

    return distributed.run_job(
        command,
        f"rerun with --resume to continue {args.out} (from its last checkpoint; from the start if none was saved)",
    )


if __name__ == "__main__":
    from jaxvocab.errors import exit_process

    exit_process(main())
