"""jaxvocab-train (`python -m train`): fine-tune only the chosen vocabulary rows.

data.py    JSONL -> packed, loss-masked batches with a resumable position
loop.py    jitted donated train step, eval, orbax checkpoints, exact resume
report.py  metrics.jsonl, loss.png, progress bar
"""


def cli() -> None:
    """The `jaxvocab-train` console script (train/console.py: huge pages, then main)."""
    from train.console import run

    def load_main():
        from train.__main__ import main

        return main

    run(load_main)
