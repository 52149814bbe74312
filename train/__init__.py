"""jaxvocab-train (`python -m train`): fine-tune only the chosen vocabulary rows.

data.py    JSONL -> packed, loss-masked batches with a resumable position
loop.py    jitted donated train step, eval, orbax checkpoints, exact resume
report.py  metrics.jsonl, loss.png, progress bar
"""


def cli() -> None:
    """The `jaxvocab-train` console script: restart with huge pages (train/hugepages.py) before the
    heavy imports, then run."""
    import sys

    from train.hugepages import restart_with_huge_pages

    restart_with_huge_pages()
    from train.__main__ import main

    sys.exit(main())
