"""One exception family, so the CLIs can print any failure as a single `error: ...` line.

Every message names the offending file or flag and says what to do about it.
"""

import sys


class JaxVocabError(Exception):
    """Base of every error jaxvocab raises on bad input."""


class ConfigError(JaxVocabError):
    """A config.json / params.json describes something we cannot build faithfully."""


class CheckpointError(JaxVocabError):
    """Checkpoint files are missing, inconsistent or malformed."""


class VocabError(JaxVocabError):
    """A vocabulary request cannot be planned (duplicates, clashes, empty tokens)."""


class DataError(JaxVocabError):
    """Training data is malformed; messages carry file:line."""


class UsageError(JaxVocabError):
    """A flag value is invalid; CLIs exit 2 for these."""


def run_command(command, interrupted: str) -> int:
    """Run a CLI command: one `error: ...` line and exit 2 for bad flags, 1 for bad files, 130 on
    Ctrl-C (with `interrupted` saying what the user still has); 0 on success."""
    try:
        command()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JaxVocabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {interrupted}", file=sys.stderr)
        return 130
    return 0
