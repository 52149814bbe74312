"""One process of a 2-process JAX job on this machine (started by tests/test_multihost.py).

Each process owns 4 CPU devices; together they form the 8-device global mesh data=1,fsdp=2,tensor=4.
It loads each checkpoint dir given onto that mesh (each process reading only the slices its own
devices hold), computes logits, gathers them to every process and saves them with the bytes it
read; with --train it also runs one fine-tuning step (train/loop.py) on the first checkpoint.

    python tests/multihost_worker.py --port P --process-id I --out DIR --ids IDS.npy [--train] CKPT...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

TRAIN_IDS = [3, 7, 100, 255]


def train_batch(vocab: int, batch: int = 2, length: int = 128):
    """One accumulated batch [K=1, B, T] of two packed documents per row, chosen ids frequent."""
    from train.data import Batch

    rng = np.random.RandomState(7)
    tokens = rng.randint(0, vocab, (batch, length + 1)).astype(np.int32)
    tokens[:, ::5] = TRAIN_IDS[1]
    tokens[:, 2::11] = TRAIN_IDS[2]
    segments = np.where(np.arange(length) < length // 3, 1, 2).astype(np.int32)[None].repeat(batch, 0)
    weights = np.ones((batch, length), np.float32)
    weights[:, length // 3 - 1] = 0  # no target across the document boundary
    return Batch(tokens[None, :, :-1], segments[None], tokens[None, :, 1:], weights[None])


def train_one_step(model, mesh) -> dict[str, np.ndarray]:
    """Rows and metrics after one step of train.loop.Trainer on `model`, as host arrays."""
    import jax
    from jax.experimental import multihost_utils

    from jaxvocab.rows import split
    from train.loop import TrainConfig, Trainer

    cfg = TrainConfig(steps=1, batch_size=2, seq_len=128, lr=1e-2, schedule="constant")
    trainer = Trainer(split(model, TRAIN_IDS), cfg, mesh)
    metrics = trainer.step(train_batch(model.config.vocab_size))
    gather = (
        (lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)))
        if jax.process_count() > 1
        else (lambda a: np.asarray(jax.device_get(a)))
    )
    out = {f"rows.{k}": gather(v) for k, v in trainer.params.items()}
    out.update({f"metric.{k}": gather(v) for k, v in metrics.items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ids", type=Path, required=True)
    p.add_argument("--train", action="store_true")
    p.add_argument("ckpts", type=Path, nargs="+")
    args = p.parse_args()

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes, process_id=args.process_id
    )

    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxvocab
    from jaxvocab.io import pth, safetensors_io
    from jaxvocab.sharding import parse_mesh

    mesh = parse_mesh("data=1,fsdp=2,tensor=4")
    ids = np.load(args.ids)
    global_ids = jax.make_array_from_callback(ids.shape, NamedSharding(mesh, P()), lambda idx: ids[idx])
    report = {
        "process": jax.process_index(),
        "local_devices": [d.id for d in jax.local_devices()],
        "global_devices": jax.device_count(),
        "bytes_read": {},
    }
    for i, ckpt in enumerate(args.ckpts):
        before = safetensors_io.BYTES_READ + pth.BYTES_READ
        model = jaxvocab.load(ckpt, mesh=mesh, show_progress=False)
        report["bytes_read"][str(ckpt)] = safetensors_io.BYTES_READ + pth.BYTES_READ - before
        logits = nnx.jit(lambda m, x: m(x))(model, global_ids)
        assert not logits.is_fully_addressable  # really spread over both processes
        full = multihost_utils.process_allgather(logits, tiled=True)
        np.save(args.out / f"logits{i}_p{args.process_id}.npy", np.asarray(full))
        if args.train and i == 0:
            np.savez(args.out / f"train_p{args.process_id}.npz", **train_one_step(model, mesh))
    (args.out / f"report_p{args.process_id}.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
