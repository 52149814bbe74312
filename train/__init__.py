"""jaxvocab-train (`python -m train`): fine-tune only the chosen vocabulary rows.

data.py    JSONL -> packed, loss-masked batches with a resumable position
loop.py    jitted donated train step, eval, orbax checkpoints, exact resume
report.py  metrics.jsonl, loss.png, progress bar
"""
