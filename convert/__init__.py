"""`jaxvocab-convert`: checkpoints between Hugging Face, Meta and jaxvocab layouts."""


def cli() -> None:
    """The `jaxvocab-convert` console script: restart with huge pages (train/hugepages.py) before the
    heavy imports, then run."""
    import sys

    from train.hugepages import restart_with_huge_pages

    restart_with_huge_pages()
    from convert.__main__ import main

    sys.exit(main())
