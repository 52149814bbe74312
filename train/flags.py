"""jaxvocab-train's flags: the parsers and the checks that run before anything loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxvocab.errors import UsageError
from jaxvocab.io.atomic import check_output, check_overlap
from train import distributed

DESCRIPTION = """Fine-tune only chosen rows of a Llama-3 checkpoint's embedding and lm_head (new tokens,
untrained rows), optionally with LoRA adapters beside them; optimizer state and gradients are k x d,
never V x d. Writes checkpoints (resumable), metrics.jsonl and final/ into --out.
`jaxvocab-train tokenize --help`: tokenize a large corpus once into a store that training reads lazily."""

# --lora-targets' default: every name of jaxvocab.lora.TARGETS, spelled here so `--help` imports no jax.
ALL_TARGETS = "q,k,v,o,gate,up,down"

EPILOG = """examples:
  jaxvocab-train --model ckpt --data train.jsonl --out run1 --steps 500 --dtype bfloat16
  jaxvocab-train --model ckpt --data chat.jsonl --eval eval.jsonl --out run2 --trainable new+untrained \\
                 --mesh data=1,fsdp=2,tensor=4 --save-every 100 --export-hf run2-hf
  jaxvocab-train ... --out run2 --resume          # continue after a crash / preemption
  jaxvocab-train tokenize --model ckpt --data a.jsonl.gz b.parquet --out store --workers 8
  jaxvocab-train --model ckpt --data store --out run3 --distributed   # same command on every host of a pod
  jaxvocab-train --model ckpt --data chat.jsonl --out run3 --lora-rank 16 --lora-lr 2e-4 \\
                 --export-hf run3-merged --export-peft run3-adapter   # LoRA on all 7 projections + the rows

data lines: {"text": "..."} | {"messages": [{"role": "user", "content": "..."}, ...]}
            | {"input_ids": [...], "loss_mask": [...]}   (loss_mask optional)
--trainable: new | untrained | new+untrained | ids:1,2,3 | tokens:@file.txt (one token per line;
             a line in double quotes is a JSON string, e.g. " Paris" with its space)
             | none (adapters only; needs --lora-rank or --lora-init)

environment: JAXVOCAB_COMPILE_CACHE=DIR|off  compiled programs are kept in ~/.cache/jaxvocab/xla and
             reused by the next run; JAXVOCAB_HUGE_PAGES=0  no restart with glibc's huge-page tunable
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxvocab-train",
        usage="%(prog)s [tokenize] --model CKPT --data DATA --out OUT [options]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _io_args(p)
    _optimizer_args(p)
    _execution_args(p)
    _lora_args(p)
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip (and log) a step whose loss or gradient is NaN/Inf instead of stopping the run there",
    )
    p.add_argument("--allow-nonfinite", action="store_true", help="load a --model whose weights hold NaN or Inf")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    distributed.add_args(p)
    return p


def _io_args(p: argparse.ArgumentParser) -> None:
    """What is read and written: model, data, run dir, checkpoints, exports."""
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
    p.add_argument("--seed", type=int, default=0, help="data order seed (default %(default)s)")
    p.add_argument(
        "--save-every", type=int, default=100, help="checkpoint every N steps (default %(default)s; 0: final only)"
    )
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start afresh")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (always at the end)")
    p.add_argument("--export-hf", type=Path, help="also write the final model as an HF dir here (adapters merged)")
    p.add_argument(
        "--export-dtype",
        choices=["float32"],
        help="--export-hf / final/ dtype (default: the checkpoint's; float32 keeps the f32 merge)",
    )


def _optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch (default %(default)s)")
    p.add_argument("--seq-len", type=int, help="tokens per packed row (default: 1024, capped by the model)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the rows (default %(default)s)")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps, fewer than --steps (default 0)")
    p.add_argument(
        "--schedule", default="cosine", choices=["cosine", "constant"], help="after the warmup (default %(default)s)"
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW decay, on the rows only (default %(default)s)"
    )
    p.add_argument(
        "--clip", type=float, default=1.0, help="global-norm gradient clipping (default %(default)s; 0: off)"
    )


def _execution_args(p: argparse.ArgumentParser) -> None:
    """How each step runs: dtype, recompute, attention kernel, mesh."""
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="compute dtype, whatever the checkpoint's (default bfloat16, also on CPU; float32 for f32 math)",
    )
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


def _lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA (adapters on the frozen projections, trained beside the rows)")
    g.add_argument("--lora-rank", type=int, help="adapter rank r (enables LoRA)")
    g.add_argument("--lora-alpha", type=float, help="scale is alpha/r (default: 2 x rank)")
    g.add_argument(
        "--lora-targets",
        default=ALL_TARGETS,
        help=f"comma list of the projections that get adapters, from {ALL_TARGETS} (default: all seven)",
    )
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-lr", type=float, help="adapters' peak learning rate (default: --lr)")
    g.add_argument(
        "--lora-init",
        type=Path,
        help="start the adapters from a PEFT LoRA dir (enables LoRA; its r, alpha and targets unless given)",
    )
    g.add_argument("--export-peft", type=Path, help="also write the adapters + rows as a PEFT adapter dir here")


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
    if args.warmup >= args.steps:
        raise UsageError(
            f"--warmup {args.warmup}: must be below --steps {args.steps}, or the learning rate never reaches --lr"
        )
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
    if args.lora_init is not None:
        _adapter_defaults(args)
    lora_only = {
        "--lora-alpha": args.lora_alpha,
        "--lora-lr": args.lora_lr,
        "--export-peft": args.export_peft,
        "--lora-init": args.lora_init,
        "--lora-dropout": args.lora_dropout or None,
        "--lora-targets": None if args.lora_targets == ALL_TARGETS else args.lora_targets,
    }
    if args.lora_rank is None:
        given = [f for f, v in lora_only.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} needs --lora-rank R (LoRA is off without it)")
        if args.trainable == "none":
            raise UsageError(
                "--trainable none: nothing would train; add --lora-rank R (or --lora-init DIR) to train adapters only"
            )
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


def _adapter_defaults(args) -> None:
    """--lora-init's adapter_config.json gives --lora-rank, --lora-alpha and --lora-targets where they
    are not passed: continuing from an adapter needs no copying of its numbers (passed ones must match)."""
    from jaxvocab.io.peft import read_peft_config

    cfg = read_peft_config(args.lora_init)
    rows = cfg.get("trainable_token_indices")
    if rows:
        print(
            f"warning: {args.lora_init} also holds trained rows (PEFT trainable_token_indices); --lora-init "
            "starts only the adapters, the rows start from --model's (to continue a run, --resume it; "
            "to keep its rows, train from its --export-hf)",
            file=sys.stderr,
        )
    if args.lora_rank is None:
        args.lora_rank = cfg["r"]
    if args.lora_alpha is None and isinstance(cfg.get("lora_alpha"), int | float):
        args.lora_alpha = float(cfg["lora_alpha"])
    modules = cfg.get("target_modules")
    if args.lora_targets == ALL_TARGETS and isinstance(modules, list) and modules:
        args.lora_targets = ",".join(map(str, modules))
