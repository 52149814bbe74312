"""The vocabulary flags of `jaxvocab-convert import` and `inspect`.

Token lists come inline (`--add-tokens '<a>,<b>'`) or from a file (`--add-tokens @tokens.txt`): one
token per line, optionally `token=description` (the description's tokenization seeds the subword
init; the line is split at its first '=' after a leading `<|...|>`). A line that starts with '"' is a
JSON string, the token exactly (leading spaces, commas, '=' kept), then optionally the flag and
`=description`: `" Paris" [plain]=the city`.
A token may end with ` [special]` or ` [plain]` (after a space) to set its special flag, overriding
`--special-tokens` (default auto: `<|...|>` tokens special, every other token plain).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import warnings
from pathlib import Path

from jaxvocab.row_init import INITS  # the CLI imports jax anyway (jaxvocab.errors loads the package)

PROBE_TOKENS = 1024  # probe positions used by inspect --probe (a CPU can score these against 128k rows)


def add_import_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vocabulary (writes vocab_plan.json into OUT)")
    g.add_argument(
        "--add-tokens",
        metavar="T1,T2|@FILE",
        help="new tokens, comma-separated or @file (UTF-8, one per line; every non-blank line is a token, "
        "'#' lines too; in a file, token=description gives --init subword its words, and a line in double "
        'quotes is a JSON string kept exactly, e.g. " Paris" for a leading space)',
    )
    g.add_argument(
        "--init",
        choices=INITS,
        help="how new and fixed rows start (default mean: the f32 mean of the trained rows, "
        "which keeps KL(old||new) <= log(1+k/n))",
    )
    g.add_argument(
        "--reuse-reserved",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put new tokens into free <|reserved_special_token_N|> slots before appending (default: yes)",
    )
    g.add_argument(
        "--fix-untrained",
        action="store_true",
        help="re-initialise rows the checkpoint never trained (all ~0 or duplicated), like new rows",
    )
    g.add_argument(
        "--pad-to-multiple-of",
        type=int,
        metavar="N",
        help="pad the row count to a multiple of N (default: what the mesh needs, >= 128 on several devices)",
    )
    g.add_argument(
        "--special-tokens",
        nargs="?",
        const="all",
        default="auto",
        choices=("auto", "all", "none"),
        help="which new tokens are special (control tokens: skipped in decoded output by vLLM and "
        "transformers by default, typed CONTROL by llama.cpp): auto (default) = <|...|> tokens, "
        "all (also the bare flag), none; a token written 'TOKEN [special]' or 'TOKEN [plain]' "
        "in --add-tokens overrides this",
    )
    g.add_argument(
        "--llama-version",
        choices=("3.0", "3.1"),
        help="Meta dirs only: name the 256 special tokens as Llama 3.0 or 3.1+ "
        "(default: 3.1 if params.json sets use_scaled_rope, else 3.0)",
    )


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--add-tokens",
        metavar="T1,T2|@FILE",
        help="also print the vocabulary plan for these tokens (no weights needed)",
    )
    p.add_argument(
        "--probe",
        type=Path,
        metavar="TEXT_FILE",
        help=f"LOADS THE WEIGHTS: list untrained rows and, with --add-tokens, score the expansion on the "
        f"first {PROBE_TOKENS} tokens of this text: KL(old||new) and new-row mass under mean and "
        "random init beside the bound log(1+k/n)",
    )


_FLAG = re.compile(r"(.*?\S)\s+\[(special|plain)\]")


_ANY_FLAG = re.compile(r".*?\S\s+\[(\w+)\]")


def split_flag(token: str, where: str = "") -> tuple[str, bool | None]:
    """'<think> [plain]' -> ('<think>', False); a token without the suffix -> (token, None).
    `where` (' @file:line') goes into the error messages."""
    from jaxvocab.errors import UsageError

    m = _FLAG.fullmatch(token)
    if m and _ANY_FLAG.fullmatch(m.group(1)):
        raise UsageError(f"--add-tokens{where}: {token!r} has two [flags]; give one of [special] or [plain]")
    if m:
        return m.group(1), m.group(2) == "special"
    typo = _ANY_FLAG.fullmatch(token)
    if typo:
        raise UsageError(
            f"--add-tokens{where}: {token!r} ends in [{typo.group(1)}], not a flag; write [special] or [plain], "
            "or drop the space if the brackets are part of the token"
        )
    return token, None


def parse_token_flags(spec: str) -> tuple[dict[str, str | None], dict[str, bool]]:
    """--add-tokens value -> ({token: description or None}, {token: special} for annotated tokens)."""
    from jaxvocab.errors import UsageError, brief

    tokens, flags = {}, {}
    for where, token, desc, flag in _entries(spec):
        try:
            (token + (desc or "")).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: a quoted line's \ud83d, or bytes argv could not decode
            raise UsageError(
                f"--add-tokens{where}: {brief(token)} is not valid UTF-8 text (a lone surrogate); "
                "write the character itself"
            ) from None
        if token in tokens:
            raise UsageError(f"--add-tokens{where}: {brief(token)} is listed twice; list each token once")
        tokens[token] = desc
        if flag is not None:
            flags[token] = flag
    return tokens, flags


def parse_tokens(spec: str) -> dict[str, str | None]:
    """--add-tokens value -> {token: description or None}, in order."""
    return parse_token_flags(spec)[0]


def special_arg(args, tokens, flags: dict[str, bool]) -> set[str]:
    """The tokens to flag special: per-token annotations first, then --special-tokens."""
    from jaxvocab.vocab import looks_special

    rule = {"auto": looks_special, "all": lambda t: True, "none": lambda t: False}[args.special_tokens]
    return {t for t in tokens if flags.get(t, rule(t))}


def _entries(spec: str) -> list[tuple[str, str, str | None, bool | None]]:
    """--add-tokens value -> [(where, token, description or None, special flag or None)]."""
    from jaxvocab.errors import UsageError

    if not spec.startswith("@"):
        tokens = [t.strip() for t in spec.split(",")]
        if not all(tokens):
            raise UsageError(f"--add-tokens {spec!r}: empty token in the list; separate tokens with single commas")
        if any(len(t) > 1 and t[0] == t[-1] == '"' for t in tokens):
            warnings.warn(
                "--add-tokens: quotes in the inline list are part of the token; "
                "quote tokens in a tokens file (@FILE), where a quoted line is a JSON string",
                stacklevel=2,
            )
        return [("", *_flagged(t, "")) for t in tokens]
    path = Path(spec[1:])
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM (Notepad) is no part of a token
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"--add-tokens {spec}: cannot read {path} ({e}); give a UTF-8 file, one token per line"
        ) from None
    out = [
        (f" {spec}:{n}", *_file_line(line.strip(), f" {spec}:{n}")) for n, line in enumerate(lines, 1) if line.strip()
    ]
    if not out:
        raise UsageError(f"--add-tokens {spec}: the file lists no tokens; put one token per line")
    return out


def _flagged(token: str, where: str) -> tuple[str, None, bool | None]:
    token, flag = split_flag(token, where)
    return token, None, flag


_AFTER_QUOTE = re.compile(r"\s*(?:\[(special|plain)\])?\s*(?:(=)(.*))?")


def _file_line(line: str, where: str) -> tuple[str, str | None, bool | None]:
    """One stripped line of a tokens file -> (token, description or None, special flag or None).
    Surrounding spaces are never part of a token, unless it is quoted: a line that starts with '"'
    is a JSON string (the token exactly: ' Paris', 'a,b'), then optionally [special] / [plain] and =description."""
    from jaxvocab.errors import UsageError, brief

    if line.startswith('"'):
        try:
            token, end = json.JSONDecoder().raw_decode(line)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"--add-tokens{where}: {brief(line)} is not a quoted JSON string ({e.msg}, column {e.colno})"
            ) from None
        after = _AFTER_QUOTE.fullmatch(line[end:])
        if not token.strip():
            raise UsageError(f"--add-tokens{where}: {brief(line)} is an empty or all-space token; drop the line")
        if after is None:
            raise UsageError(
                f"--add-tokens{where}: {brief(line)}: after a quoted token write only [special], [plain] "
                'or =description (e.g. " Paris" [plain]=the city)'
            )
        flag = None if after.group(1) is None else after.group(1) == "special"
        sep, desc = after.group(2) or "", after.group(3) or ""
    else:
        if line.startswith("# "):
            warnings.warn(
                f"--add-tokens{where}: {brief(line)} is added as a token (the file has no comments)", stacklevel=3
            )
        token, sep, desc = _split_description(line)
        token, _, flag = _flagged(token, where)
    if sep and not desc.strip():
        raise UsageError(f"--add-tokens{where}: empty description after '='; drop the '=' or add text")
    return token, desc.strip() if sep else None, flag


def _split_description(line: str) -> tuple[str, str, str]:
    """'token=description' -> (token, '=', description). The '=' is the first one after a leading
    `<|...|>` (so '<|x=y|>' stays one token); one that starts the line is part of the token."""
    start = line.find("|>") + 2 if line.startswith("<|") and "|>" in line else 0
    eq = line.find("=", start)
    if eq <= 0:
        return line, "", ""
    return line[:eq].strip(), "=", line[eq + 1 :]


@contextlib.contextmanager
def _warnings_as_lines():
    """Library warnings as one `warning: ...` line each on stderr, like our errors."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)  # jaxvocab's own; not ResourceWarnings of an interrupted read
        warnings.showwarning = show
        yield


def check_import_flags(args) -> bool:
    """Vocabulary flags checked before any loading; True when they ask for an expansion."""
    from jaxvocab.errors import UsageError

    if args.add_tokens is not None and not args.add_tokens.strip():
        raise UsageError("--add-tokens '': no tokens given; list tokens (T1,T2) or @FILE, or drop the flag")
    if args.pad_to_multiple_of is not None and args.pad_to_multiple_of < 1:
        raise UsageError(f"--pad-to-multiple-of {args.pad_to_multiple_of}: give a positive integer")
    if args.add_tokens is not None:
        _quietly(parse_token_flags, args.add_tokens)
    if not (args.add_tokens or args.fix_untrained or args.pad_to_multiple_of):
        given = [
            f
            for f, v in (
                ("--init", args.init),
                ("--special-tokens", args.special_tokens != "auto"),
                ("--no-reuse-reserved", not args.reuse_reserved),
            )
            if v
        ]
        if given:
            raise UsageError(f"{given[0]} needs --add-tokens, --fix-untrained or --pad-to-multiple-of")
        return False
    return True


PLAN_ROWS_SHOWN = 40  # import's table; the checkpoint's vocab_plan.json has every token


def plan_for_import(args, mesh):
    """The plan of `import`'s vocabulary flags, made before any weight is read (config.json and the
    tokenizer are enough), so the loader reads the checkpoint straight into the final-size tables.
    Returns (plan, tokenizer), or None when no flag asks for an expansion."""
    import numpy as np

    import jaxvocab
    from jaxvocab.vocab import check_growth, mesh_multiple

    if not check_import_flags(args):
        return None
    abstract = _abstract_model(Path(args.src))
    with _warnings_as_lines():
        tokens, flags = parse_token_flags(args.add_tokens) if args.add_tokens is not None else ({}, {})
        tok = _tokenizer(args.src, args.llama_version)
        plan = jaxvocab.plan_vocab(
            tok,
            tokens,
            reuse_reserved=args.reuse_reserved,
            pad_to_multiple_of=args.pad_to_multiple_of or mesh_multiple(mesh),
            model=abstract,
            special=special_arg(args, tokens, flags),
        )
    check_growth(plan, abstract.config, np.dtype(args.dtype or abstract.config.dtype).itemsize, mesh)
    return plan, tok


def load_for_import(args, planned, options: dict):
    """(model, tokenizer or files to carry, plan or None): with vocabulary flags the checkpoint is read
    straight into the final-size tables with the planned rows initialised (`load_expanded`); without,
    the model as loaded, with the source's files to carry."""
    import jaxvocab
    from jaxvocab.io.carried import CarriedFiles
    from jaxvocab.vocab import describe_untrained
    from jaxvocab.vocab_load import load_expanded

    if planned is None:
        return jaxvocab.load(args.src, **options), CarriedFiles.of(args.src), None
    plan, tok = planned
    with _warnings_as_lines():
        model, tok, plan = load_expanded(
            args.src, tok, plan, init=args.init or "mean", fix_untrained=args.fix_untrained, **options
        )
    print(plan.summary(limit=PLAN_ROWS_SHOWN))
    if plan.untrained_fixed:
        shown = describe_untrained(plan.untrained_fixed, tok, limit=5)
        print(f"fixed untrained rows: {', '.join(shown)}{' ...' if len(plan.untrained_fixed) > 5 else ''}")
    return model, tok, plan


def _tokenizer(src, llama_version=None):
    import jaxvocab
    from jaxvocab.errors import malformed

    with malformed(f"{src}: tokenizer.json / tokenizer_config.json", "fix or re-download the tokenizer files"):
        return jaxvocab.load_tokenizer(src, llama_version=llama_version)


def _abstract_model(src: Path):
    """Config-only stand-in (no weights) so plan_vocab sees the row count."""
    from flax import nnx

    from convert.describe import _meta_config
    from jaxvocab.config import LlamaConfig
    from jaxvocab.io import detect
    from jaxvocab.model import Llama

    config = _meta_config(src) if detect(src) == "meta" else LlamaConfig.from_hf_file(src)
    return nnx.eval_shape(lambda: Llama(config))


def check_inspect_flags(args) -> None:
    from jaxvocab.errors import UsageError

    if args.add_tokens is not None and not args.add_tokens.strip():
        raise UsageError("--add-tokens '': no tokens given; list tokens (T1,T2) or @FILE, or drop the flag")
    if args.add_tokens is not None:
        _quietly(parse_tokens, args.add_tokens)


def _quietly(check, *args):
    """A flag check before the real parse, which reports the warnings (once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(*args)


def inspect_report(args) -> str | None:
    """The vocabulary part of `inspect`: free slots, the plan, untrained rows and the KL probe."""
    from jaxvocab.errors import UsageError

    if not (args.add_tokens or args.probe):
        return None
    import jaxvocab
    from jaxvocab import diagnostics
    from jaxvocab.vocab import describe_untrained

    with _warnings_as_lines():
        tokens, flags = parse_token_flags(args.add_tokens) if args.add_tokens else (None, {})
    probe_text = None
    if args.probe:
        try:
            probe_text = args.probe.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--probe {args.probe}: cannot read it ({e}); give a UTF-8 text file") from None
    lines = ["vocabulary"]
    with _warnings_as_lines():
        tok = _tokenizer(args.src)
        model = (
            jaxvocab.load(args.src, show_progress=False, attention=args.attention)
            if args.probe
            else _abstract_model(args.src)
        )
        rows = model.config.vocab_size
        lines.append(f"  tokenizer      {tok.n_words} ids, {len(tok.free_reserved())} free reserved slots")
        if rows > tok.n_words:
            lines.append(f"  padding rows   {rows - tok.n_words} model rows beyond the tokenizer")
        if args.probe:
            untrained = jaxvocab.find_untrained(model, tok)
            shown = ", ".join(describe_untrained(untrained, tok, limit=6))
            lines.append(
                f"  untrained rows {len(untrained)}"
                + (f": {shown}{' ...' if len(untrained) > 6 else ''}" if untrained else "")
            )
        if tokens is None:
            return "\n".join(lines)
        plan = jaxvocab.plan_vocab(tok, tokens, model=model, special=flags or "auto")
        lines += ["", plan.summary()]
        if args.probe:
            ids = diagnostics.probe_ids(tok, probe_text, PROBE_TOKENS)
            reports = [diagnostics.expansion_kl(model, ids, plan, tok, init=i) for i in ("mean", "random")]
            lines += [
                "",
                f"expansion on {ids.size} probe tokens from {args.probe} (bound holds for mean only):",
                diagnostics.summary(reports),
            ]
    return "\n".join(lines)
