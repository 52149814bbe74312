"""One exception family, so the CLIs can print any failure as a single `error: ...` line.

Every message names the offending file or flag and says what to do about it.
"""

import contextlib
import json
import os
import re
import reprlib
import signal
import sys


class JaxVocabError(Exception):
    """Base of every error jaxvocab raises on bad input."""


class ConfigError(JaxVocabError):
    """A config.json / params.json describes something we cannot build faithfully."""


class CheckpointError(JaxVocabError):
    """Checkpoint files are missing, inconsistent or malformed."""


class WriteError(CheckpointError):
    """An output could not be written: the target filesystem is full or read-only (nothing was left)."""

    def __init__(self, path, reason: str, hint: str):
        super().__init__(f"{path}: cannot write it ({reason}); nothing was written; {hint}")
        self.path, self.reason, self.hint = path, reason, hint

    def __reduce__(self):
        return type(self), (self.path, self.reason, self.hint)


class VocabError(JaxVocabError):
    """A vocabulary request cannot be planned (duplicates, clashes, empty tokens)."""


class DataError(JaxVocabError):
    """Training data is malformed; messages carry file:line."""


class UsageError(JaxVocabError):
    """A flag value is invalid; CLIs exit 2 for these."""


class TrainError(JaxVocabError):
    """Training cannot go on (a non-finite loss or gradient)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same cleanup runs."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 4
_REPR.maxlevel = 2


def brief(value) -> str:
    """repr of an untrusted value, bounded in size and in the work it takes (nested, shared,
    huge values never render unbounded)."""
    if isinstance(value, int) and abs(value) > 10**30:
        return f"<int of {value.bit_length()} bits>"
    try:
        return _REPR.repr(value)
    except Exception:  # a value whose repr fails (or refuses, like ints past the str limit) is just named
        return f"<{type(value).__name__}>"


def fault_point(name: str) -> None:
    """Deterministic fault injection for the interrupt tests: JAXVOCAB_FAULT=<point>:<SIGNAL>[,...]
    makes this process send itself SIGNAL when it reaches <point>. Unset, this costs one dict lookup."""
    spec = os.environ.get("JAXVOCAB_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        point, _, sig = item.rpartition(":")
        if point == name:
            os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))


@contextlib.contextmanager
def malformed(what: str, fix: str):
    """Reading a file whose structure a parser trusts: a wrong JSON type deep inside (a list where
    an object belongs) surfaces as TypeError & co.; report it as one line naming the file."""
    try:
        yield
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, RecursionError) as e:
        raise CheckpointError(f"{what}: malformed ({type(e).__name__}: {brief(str(e))}); {fix}") from None


def read_json(
    path,
    error: type[JaxVocabError] = CheckpointError,
    fix: str = "fix or re-download it",
    missing: str | None = None,
    member: str | None = None,
):
    """The one JSON file reader: any way a file can fail to be JSON is one `error` line naming it.

    Args:
      path: the file.
      error: the JaxVocabError subclass to raise (ConfigError for configs, CheckpointError for files beside weights).
      fix: what the user should do, appended to every message.
      missing: the message's tail when the file does not exist (default: `fix`).
      member: decode only this member of the top-level object (None when absent): the members
        before it are decoded, the rest of the file is not checked.

    Returns:
      The parsed JSON value (or the member's).
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
        return json.loads(text) if member is None else _member(text, member)
    except FileNotFoundError:
        raise error(f"{path}: not found; {missing or fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e.msg}: line {e.lineno} column {e.colno}); {fix}") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not readable JSON ({type(e).__name__}); {fix}") from None


_BLANK = re.compile(r"[ \t\n\r]*")


def _member(text: str, key: str):
    """One member of the top-level object, decoded up to it and no further."""
    decoder, i = json.JSONDecoder(), _BLANK.match(text).end()
    if text[i : i + 1] != "{":
        raise json.JSONDecodeError("Expecting an object", text, i)
    i = _BLANK.match(text, i + 1).end()
    while text[i : i + 1] != "}":
        if text[i : i + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, i)
        name, i = decoder.raw_decode(text, i)
        i = _BLANK.match(text, i).end()
        if text[i : i + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, i)
        value, i = decoder.raw_decode(text, _BLANK.match(text, i + 1).end())
        if name == key:
            return value
        i = _BLANK.match(text, i).end()
        if text[i : i + 1] == ",":
            i = _BLANK.match(text, i + 1).end()
            if text[i : i + 1] == "}":
                raise json.JSONDecodeError("Illegal trailing comma before end of object", text, i)
        elif text[i : i + 1] != "}":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, i)
    return None


_caught: list[KeyboardInterrupt] = []  # the signals a running command received (see raise_if_interrupted)


def _on_signal(signum, frame):
    e = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    _caught.append(e)
    raise e


def raise_if_interrupted() -> None:
    """Raise again a Ctrl-C / SIGTERM that Python swallowed. A signal's exception is raised in
    whatever Python code runs at that moment; inside a garbage-collection callback (jaxlib has one)
    or a `__del__`, Python can only report it as unraisable and goes on, and an interrupted import
    ran to the end and exited 0. Called before an output is published and after each training step."""
    if _caught:
        raise type(_caught[-1])()


def exit_process(code: int):
    """sys.exit(code), except after Ctrl-C / SIGTERM (130 / 143): XLA may still be compiling or
    running in its own threads, and interpreter teardown under them crashed (exit 139) in most
    interrupts during a first, compiling training step. By then the command has published or removed
    everything it writes (checkpoints are written synchronously), so the process ends without teardown."""
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def run_command(command, interrupted: str) -> int:
    """Run a CLI command: one `error: ...` line and exit 2 for bad flags, 1 for bad files, 130 on
    Ctrl-C and 143 on SIGTERM (with `interrupted` saying what the user still has); 0 on success.
    An OSError that escaped (a full or read-only disk outside an output dir) is one line too, and
    progress bars are drawn only on a terminal, so a log file holds that line alone."""
    from jaxvocab.progress import terminal_only

    sigs = (signal.SIGINT, signal.SIGTERM)
    old = [signal.signal(s, _on_signal) for s in sigs] if _main_thread() else None
    _caught.clear()
    mute_background_failures()
    terminal_only()
    try:
        command()  # a signal swallowed after the last output was published: the work is done, exit 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JaxVocabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"error: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; {interrupted}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, free space and permissions", file=sys.stderr)
        return 1
    finally:
        if old is not None:
            for s, handler in zip(sigs, old, strict=True):
                signal.signal(s, handler)
    return 0


def mute_background_failures() -> None:
    """Keep a failed checkpoint write to the command's one error line, for the rest of the process.
    When orbax's write fails (a full disk), its threads log the failure through absl with
    tracebacks, tensorstore's callbacks then reach the event loop orbax has closed (each an
    unraisable `RuntimeError: Event loop is closed`), and at exit asyncio logs every failed write
    task and Python warns of each write coroutine never awaited: ~200 lines around the error the
    command prints itself. absl's and asyncio's loggers are muted, that unraisable error and that
    warning dropped (jaxvocab runs no coroutine of its own), and so is a Ctrl-C that Python could only
    report as unraisable (`raise_if_interrupted` raises it again); anything else still shows."""
    import logging
    import warnings

    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    if getattr(sys.unraisablehook, "drops_closed_loop", False):
        return
    previous = sys.unraisablehook

    def unraisable(u) -> None:
        closed_loop = isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        swallowed_signal = isinstance(u.exc_value, KeyboardInterrupt) and _caught  # raised again later
        if not (closed_loop or swallowed_signal):
            previous(u)

    unraisable.drops_closed_loop = True
    sys.unraisablehook = unraisable


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
