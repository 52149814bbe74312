"""`jaxvocab-convert`: checkpoints between Hugging Face, Meta and jaxvocab layouts."""


def cli() -> None:
    """The `jaxvocab-convert` console script (train/console.py: huge pages, then main)."""
    from train.console import run

    def load_main():
        from convert.__main__ import main

        return main

    run(load_main)
