"""Runnable examples of the public API (`make demo`); not part of the installed library."""
