"""One exception family, so the CLIs can print any failure as a single `error: ...` line.

Every message names the offending file or flag and says what to do about it.
"""


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
