"""jaxvocab-convert: move Llama-3 checkpoints between HF, Meta and jaxvocab (orbax) layouts.

Errors print as one line `error: ...` and exit 1 (2 for bad flags); outputs appear whole or not at all.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m convert`: as the console script, before the heavy imports
    from train.hugepages import restart_with_huge_pages

    restart_with_huge_pages()

import argparse
from pathlib import Path

from convert import vocab_cli
from jaxvocab.errors import fault_point
from train import distributed

EPILOG = """examples:
  jaxvocab-convert inspect ./Llama-3.2-1B
  jaxvocab-convert import ./Llama-3.2-1B ./ckpt --dtype bfloat16 --mesh data=1,fsdp=2,tensor=4
  jaxvocab-convert export ./ckpt ./hf-out --max-shard-size 5GB
  jaxvocab-convert demo                       # the whole mission on a tiny model, into ./demo-out

environment: JAXVOCAB_COMPILE_CACHE=DIR|off  compiled programs are kept in ~/.cache/jaxvocab/xla and
             reused by the next run; JAXVOCAB_HUGE_PAGES=0  no restart with glibc's huge-page tunable
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxvocab-convert",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _import_parser(sub)
    _export_parser(sub)
    ins = sub.add_parser(
        "inspect", help="describe a checkpoint from its headers (fast; loads weights only with --probe)"
    )
    ins.add_argument("src", type=Path, metavar="SRC", help="any checkpoint dir: HF, hub-cache snapshot, Meta, jaxvocab")
    vocab_cli.add_inspect_args(ins)
    _attention_arg(ins, "the forward pass of --probe")
    ins.set_defaults(run=cmd_inspect)

    demo = sub.add_parser("demo", help="run the whole mission on a tiny deterministic Llama-3 model")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output dir (default ./demo-out)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _attention_arg(demo, "every forward and training pass")
    demo.set_defaults(run=cmd_demo)
    return p


def _import_parser(sub) -> None:
    imp = sub.add_parser(
        "import",
        help="HF or Meta checkpoint dir -> jaxvocab checkpoint dir",
        description="Read SRC tensor by tensor onto the mesh and write a jaxvocab checkpoint "
        "(orbax state + config.json + tokenizer files) to OUT.",
    )
    imp.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="HF dir (config.json + *.safetensors) or Meta dir (params.json + consolidated.*.pth)",
    )
    imp.add_argument("out", type=Path, metavar="OUT", help="output dir (must not exist unless --overwrite)")
    imp.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="parameter dtype (default: as stored)")
    imp.add_argument("--mesh", help="device mesh, e.g. data=1,fsdp=2,tensor=4 (default: fsdp over all devices)")
    imp.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    imp.add_argument(
        "--rope-factor",
        type=float,
        metavar="F",
        help="Meta dirs only: llama3 rope factor params.json omits (default: 32 if the head is tied "
        "to the embedding, as in 3.2 1B/3B, else 8)",
    )
    imp.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="load weights holding NaN or Inf instead of refusing them (such rows never enter a mean)",
    )
    vocab_cli.add_import_args(imp)
    distributed.add_args(imp)
    imp.set_defaults(run=cmd_import)


def _export_parser(sub) -> None:
    exp = sub.add_parser(
        "export",
        help="jaxvocab checkpoint dir -> HF dir (transformers, vLLM, llama.cpp)",
        description="Write CKPT as an HF dir: safetensors shards + index, config.json, "
        "generation_config.json and the (edited) tokenizer files.",
    )
    exp.add_argument("ckpt", type=Path, metavar="CKPT", help="jaxvocab checkpoint dir (or any dir `load` reads)")
    exp.add_argument("out", type=Path, metavar="OUT_HF", help="HF dir to write (must not exist unless --overwrite)")
    exp.add_argument("--max-shard-size", default="5GB", help="largest shard file (default 5GB; e.g. 500MB, 2GiB)")
    exp.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="cast weights on export")
    exp.add_argument("--overwrite", action="store_true", help="replace OUT_HF if it exists")
    exp.add_argument(
        "--mesh",
        help="device mesh to load onto (default: one device; with --distributed: fsdp over every host's devices)",
    )
    distributed.add_args(exp)
    exp.add_argument(
        "--keep-padding",
        action="store_true",
        help="keep the padding rows jaxvocab added to divide the mesh (default: drop them, so no "
        "client can sample them; padding the source already had is always kept)",
    )
    exp.add_argument("--allow-nonfinite", action="store_true", help="export weights holding NaN or Inf")
    exp.set_defaults(run=cmd_export)


def _attention_arg(p: argparse.ArgumentParser, used_by: str) -> None:
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "xla", "chunked", "cudnn", "splash"],
        help=f"attention implementation for {used_by} (default auto: splash on TPU, cuDNN on GPU, "
        "else xla for short sequences and memory-linear chunked for long ones)",
    )


def _mesh(spec):
    from jaxvocab.sharding import parse_mesh

    return parse_mesh(spec)


def _token_file(spec):
    return Path(spec[1:]) if spec and spec.startswith("@") else None


def cmd_import(args) -> None:
    import jaxvocab
    from jaxvocab.io.atomic import check_output, check_overlap

    check_overlap({"OUT": args.out}, {"SRC": args.src, "--add-tokens": _token_file(args.add_tokens)})
    check_output(args.out, args.overwrite)
    if args.llama_version:
        from jaxvocab.errors import UsageError
        from jaxvocab.io.meta_tokenizer import is_meta_tokenizer_dir

        if not is_meta_tokenizer_dir(args.src):
            raise UsageError(
                f"--llama-version: {args.src} is not a Meta dir with a bare tokenizer.model; "
                "its tokenizer files already name the special tokens"
            )
    mesh = _mesh(args.mesh)
    # Bad flags fail now, not after minutes of loading; with vocabulary flags the ids are planned
    # first, so the loader reads the checkpoint straight into the final-size tables.
    planned = vocab_cli.plan_for_import(args, mesh)
    options = {
        "dtype": args.dtype,
        "mesh": mesh,
        "rope_factor": args.rope_factor,
        "allow_nonfinite": args.allow_nonfinite,
    }
    model, tok, plan = vocab_cli.load_for_import(args, planned, options)
    fault_point("import:loaded")
    jaxvocab.save_checkpoint(
        model, args.out, tokenizer=tok, plan=plan, overwrite=args.overwrite, llama_version=args.llama_version
    )
    distributed.say(f"wrote {args.out} ({model.config.num_params() / 1e6:.1f}M params, {model.embed[...].dtype})")


def cmd_export(args) -> None:
    import jaxvocab
    from jaxvocab.io.atomic import check_output, check_overlap
    from jaxvocab.io.carried import CarriedFiles
    from jaxvocab.io.hf import parse_size

    check_overlap({"OUT_HF": args.out}, {"CKPT": args.ckpt})
    check_output(args.out, args.overwrite, "OUT_HF")
    parse_size(args.max_shard_size)  # a bad flag fails now, not after minutes of loading
    mesh = _mesh(args.mesh) if args.mesh or getattr(args, "multi", False) else None
    model = jaxvocab.load(args.ckpt, dtype=args.dtype, mesh=mesh, allow_nonfinite=args.allow_nonfinite)
    fault_point("export:loaded")
    jaxvocab.save_hf(
        model,
        args.out,
        max_shard_size=args.max_shard_size,
        tokenizer=CarriedFiles.of(args.ckpt),
        plan=jaxvocab.load_plan(args.ckpt),
        overwrite=args.overwrite,
        keep_padding=args.keep_padding,
    )
    distributed.say(f"wrote {args.out}")


def cmd_inspect(args) -> None:
    from convert.describe import describe

    vocab_cli.check_inspect_flags(args)  # bad flags fail before the description is printed
    print(describe(args.src))
    report = vocab_cli.inspect_report(args)
    if report:
        print(report)


def cmd_demo(args) -> None:
    """Thin alias of `make demo` (examples/demo.py), kept so the subcommand users know still works.
    examples/ is no installed package; an editable install finds it beside this package's dir."""
    import sys

    checkout = str(Path(__file__).resolve().parents[1])
    if (Path(checkout) / "examples" / "demo.py").is_file() and checkout not in sys.path:
        sys.path.append(checkout)
    try:
        from examples.demo import run_demo
    except ModuleNotFoundError as e:
        if e.name not in ("examples", "examples.demo"):
            raise
        from jaxvocab.errors import UsageError

        raise UsageError("the demo lives in examples/ of a source checkout: run `make demo` there") from None
    run_demo(args.out, overwrite=args.overwrite, attention=args.attention)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from jaxvocab.errors import run_command
    from train import compile_cache

    compile_cache.enable()

    if not hasattr(args, "distributed"):
        return run_command(lambda: args.run(args), "no output was written")
    return distributed.run_job(lambda: _start_and_run(args), "no output was written")


def _start_and_run(args) -> None:
    args.multi = distributed.start(args)
    args.run(args)


if __name__ == "__main__":
    from jaxvocab.errors import exit_process

    exit_process(main())
