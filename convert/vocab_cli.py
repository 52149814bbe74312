"""The vocabulary flags of `jaxvocab-convert import` and `inspect`.

Token lists come inline (`--add-tokens '<a>,<b>'`) or from a file (`--add-tokens @tokens.txt`): one
token per line, optionally `token=description` (the description's tokenization seeds the subword
init; the line is split at its first '=', so a token containing '=' cannot carry a description).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path

PROBE_TOKENS = 1024   # probe positions used by inspect --probe (a CPU can score these against 128k rows)
# jaxvocab.init.INITS, spelled out so that building the parser (and --help) does not import jax.
INITS = ("mean", "mean-noise", "covariance", "subword", "random", "zeros")


def add_import_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vocabulary (writes vocab_plan.json into OUT)")
    g.add_argument("--add-tokens", metavar="T1,T2|@FILE",
                   help="new tokens, comma-separated or @file (one per line, optional token=description)")
    g.add_argument("--init", choices=INITS,
                   help="how new and fixed rows start (default mean: the f32 mean of the trained rows, "
                        "which keeps KL(old||new) <= log(1+k/n))")
    g.add_argument("--reuse-reserved", action=argparse.BooleanOptionalAction, default=True,
                   help="put new tokens into free <|reserved_special_token_N|> slots before appending (default: yes)")
    g.add_argument("--fix-untrained", action="store_true",
                   help="re-initialise rows the checkpoint never trained (all ~0 or duplicated), like new rows")
    g.add_argument("--pad-to-multiple-of", type=int, metavar="N",
                   help="pad the row count to a multiple of N (default: what the mesh needs, >= 128 on several devices)")
    g.add_argument("--special-tokens", action="store_true",
                   help="flag the new tokens special (control tokens, matched only when allowed); default: plain text")


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--add-tokens", metavar="T1,T2|@FILE",
                   help="also print the vocabulary plan for these tokens (no weights needed)")
    p.add_argument("--probe", type=Path, metavar="TEXT_FILE",
                   help=f"LOADS THE WEIGHTS: list untrained rows and, with --add-tokens, score the expansion on the "
                        f"first {PROBE_TOKENS} tokens of this text: KL(old||new) and new-row mass under mean and "
                        "random init beside the bound log(1+k/n)")


def parse_tokens(spec: str) -> dict[str, str | None]:
    """--add-tokens value -> {token: description or None}, in order."""
    from jaxvocab.errors import UsageError
    if spec.startswith("@"):
        path = Path(spec[1:])
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--add-tokens {spec}: cannot read {path} ({e}); give a UTF-8 file, one token per line") from None
        out: dict[str, str | None] = {}
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            token, sep, desc = line.partition("=") if line.find("=") > 0 else (line, "", "")
            if token in out:
                raise UsageError(f"--add-tokens {spec}:{n}: {token!r} is listed twice; list each token once")
            if sep and not desc.strip():
                raise UsageError(f"--add-tokens {spec}:{n}: empty description after '='; drop the '=' or add text")
            out[token] = desc.strip() if sep else None
        if not out:
            raise UsageError(f"--add-tokens {spec}: the file lists no tokens")
        return out
    tokens = [t.strip() for t in spec.split(",")]
    if not all(tokens):
        raise UsageError(f"--add-tokens {spec!r}: empty token in the list; separate tokens with single commas")
    twice = sorted({t for t in tokens if tokens.count(t) > 1})
    if twice:
        raise UsageError(f"--add-tokens: {twice[0]!r} is listed twice; list each token once")
    return dict.fromkeys(tokens)


@contextlib.contextmanager
def _warnings_as_lines():
    """Library warnings as one `warning: ...` line each on stderr, like our errors."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def expand_for_import(model, args):
    """Apply the vocabulary flags of `import` to the loaded model; returns the plan (or None)."""
    import jaxvocab
    from jaxvocab.errors import UsageError
    from jaxvocab.vocab import VocabPlan, describe_untrained
    if not (args.add_tokens or args.fix_untrained or args.pad_to_multiple_of):
        given = [f for f, v in (("--init", args.init), ("--special-tokens", args.special_tokens),
                                ("--no-reuse-reserved", not args.reuse_reserved)) if v]
        if given:
            raise UsageError(f"{given[0]} needs --add-tokens, --fix-untrained or --pad-to-multiple-of")
        return None
    tokens = parse_tokens(args.add_tokens) if args.add_tokens else {}
    with _warnings_as_lines():
        tok = jaxvocab.load_tokenizer(model.source_dir)
        plan = jaxvocab.plan_vocab(tok, tokens, reuse_reserved=args.reuse_reserved,
                                   pad_to_multiple_of=args.pad_to_multiple_of, model=model,
                                   special=bool(args.special_tokens))
        jaxvocab.expand_vocab(model, tok, plan, init=args.init or "mean", fix_untrained=args.fix_untrained)
    plan = VocabPlan.from_json(model.vocab_plan)
    src = Path(model.source_dir)
    named = any((src / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    if (plan.renamed or plan.appended) and not named:
        print(f"warning: {src} has no tokenizer.json / tokenizer_config.json; the new tokens are recorded in "
              "vocab_plan.json only, not in the written tokenizer files", file=sys.stderr)
    print(plan.table())
    if plan.untrained_fixed:
        shown = describe_untrained(plan.untrained_fixed, tok, limit=5)
        print(f"fixed untrained rows: {', '.join(shown)}{' ...' if len(plan.untrained_fixed) > 5 else ''}")
    return plan


def _abstract_model(src: Path):
    """Config-only stand-in (no weights) so plan_vocab sees the row count and the tokenizer dir."""
    from flax import nnx
    from convert.inspect import _meta_config
    from jaxvocab.config import LlamaConfig
    from jaxvocab.io import detect
    from jaxvocab.model import Llama
    config = _meta_config(src) if detect(src) == "meta" else LlamaConfig.from_hf_file(src)
    model = nnx.eval_shape(lambda: Llama(config))
    model.source_dir = str(src)
    return model


def inspect_report(args) -> str | None:
    """The vocabulary part of `inspect`: free slots, the plan, untrained rows and the KL probe."""
    if not (args.add_tokens or args.probe):
        return None
    import jaxvocab
    from jaxvocab import diagnostics
    from jaxvocab.errors import UsageError
    from jaxvocab.vocab import describe_untrained
    tokens = parse_tokens(args.add_tokens) if args.add_tokens else None
    probe_text = None
    if args.probe:
        try:
            probe_text = args.probe.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--probe {args.probe}: cannot read it ({e}); give a UTF-8 text file") from None
    lines = ["vocabulary"]
    with _warnings_as_lines():
        tok = jaxvocab.load_tokenizer(args.src)
        model = jaxvocab.load(args.src, show_progress=False, attention=args.attention) if args.probe else _abstract_model(args.src)
        rows = model.config.vocab_size
        lines.append(f"  tokenizer      {tok.n_words} ids, {len(tok.free_reserved())} free reserved slots")
        if rows > tok.n_words:
            lines.append(f"  padding rows   {rows - tok.n_words} model rows beyond the tokenizer")
        if args.probe:
            untrained = jaxvocab.find_untrained(model, tok)
            shown = ", ".join(describe_untrained(untrained, tok, limit=6))
            lines.append(f"  untrained rows {len(untrained)}" + (f": {shown}{' ...' if len(untrained) > 6 else ''}"
                                                               if untrained else ""))
        if tokens is None:
            return "\n".join(lines)
        plan = jaxvocab.plan_vocab(tok, tokens, model=model)
        lines += ["", plan.table()]
        if args.probe:
            ids = diagnostics.probe_ids(tok, probe_text, PROBE_TOKENS)
            reports = [diagnostics.expansion_kl(model, ids, plan, tok, init=i) for i in ("mean", "random")]
            lines += ["", f"expansion on {ids.size} probe tokens from {args.probe} (bound holds for mean only):",
                      diagnostics.table(reports)]
    return "\n".join(lines)
