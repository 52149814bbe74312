"""The training loop: one jitted, donated step over the rows; orbax checkpoints; exact resume.

The step takes the whole accumulated batch [K, B, T] and scans over its K micro-batches inside
the jit, so gradient accumulation adds no second compiled function and no extra optimizer state
(optax.MultiSteps would keep a k x d accumulator between calls). Summed losses and gradients are
divided by the number of target tokens of the whole batch: the loss is the mean over every masked
token, however the batch is cut into micro-batches.

Only `params` (the rows) and `opt_state` are donated and checkpointed; the frozen model is an
input that keeps its mesh shardings. Each checkpoint also stores the data stream's position, so a
resumed run replays the very batches an uninterrupted one would have seen: kill -9 at any step and
--resume ends with bit-identical rows.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvocab.rows import Frozen, RowsModel
from jaxvocab.sharding import RULES, axis_size
from train import report
from train.data import Batch, Doc, Packer, eval_batches
from train.loss import eval_sums, token_sums


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 512
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 0
    schedule: str = "cosine"       # cosine | constant (after linear warmup)
    weight_decay: float = 0.0
    clip: float = 1.0              # global-norm clipping; <= 0 disables
    seed: int = 0
    save_every: int = 0            # 0: only the final step
    keep: int = 3
    eval_every: int = 0            # 0: only at the end
    remat: str = "auto"            # full: recompute each layer in the backward pass (activations shrink
                                   # to one [B, T, D] per layer for one more forward); none; auto: full
                                   # only when the activations would not fit (jaxvocab/remat.py)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    main_steps = max(cfg.steps - cfg.warmup, 1)
    main = optax.cosine_decay_schedule(cfg.lr, main_steps) if cfg.schedule == "cosine" else optax.constant_schedule(cfg.lr)
    if cfg.warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup), main], [cfg.warmup])


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(schedule(cfg), weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip > 0 else adamw


def batch_grads(graphdef, params, frozen, batch: Batch):
    """Summed NLL, target count and summed row gradients over the K micro-batches of `batch`."""
    def micro(carry, mb):
        grads, total, count = carry
        loss_fn = lambda p: token_sums(graphdef, p, frozen, mb)  # noqa: E731  (NLL sum, aux: count)
        (s, n), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
    (grads, total, count), _ = jax.lax.scan(micro, init, batch)
    return total, count, grads


def train_step(graphdef, cfg: TrainConfig, params, opt_state, frozen, batch: Batch):
    total, count, grads = batch_grads(graphdef, params, frozen, batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer(cfg).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": total / denom, "grad_norm": optax.global_norm(grads), "targets": count}


def eval_step(graphdef, params, frozen, batch: Batch, is_new):
    return eval_sums(graphdef, params, frozen, jax.tree.map(lambda a: a[0], batch), is_new)


class Trainer:
    """Rows + optimizer state on the mesh, and the compiled step that advances them."""

    def __init__(self, rm: RowsModel, cfg: TrainConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        caller_remat, rm.remat = rm.remat, cfg.remat     # baked into the graphdef, then given back
        self.graphdef, params, frozen = nnx.split(rm, nnx.Param, Frozen)
        rm.remat = caller_remat
        self.frozen = nnx.to_pure_dict(frozen)
        replicated = NamedSharding(mesh, P())
        # Copies: the step donates its inputs, and the caller's RowsModel must stay usable.
        self.params = jax.device_put(jax.tree.map(jnp.copy, nnx.to_pure_dict(params)), replicated)
        self.opt_state = jax.jit(optimizer(cfg).init, out_shardings=replicated)(self.params)
        self.lr = schedule(cfg)
        is_new = jnp.zeros(rm.config.vocab_size, bool).at[rm.ids[...]].set(True)
        self.is_new = jax.device_put(is_new, replicated)
        # Pinned output shardings: left to the compiler, the rows come back sharded, the second step
        # compiles a differently partitioned program, and a resumed run would not be bit-identical.
        # graphdef and cfg are static: Trainers of the same model and config share one compilation.
        self._step = jax.jit(train_step, static_argnums=(0, 1), donate_argnums=(2, 3), out_shardings=replicated)
        self._eval = jax.jit(eval_step, static_argnums=0)

    def put(self, batch: Batch) -> Batch:
        """Host batch -> device, its B axis split over (data, fsdp) when that divides it."""
        B = batch.inputs.shape[1]
        spec = P(None, RULES["batch"], None) if B % axis_size(self.mesh, "batch") == 0 else P()
        return Batch(*(jax.device_put(a, NamedSharding(self.mesh, spec)) for a in batch))

    def step(self, batch: Batch) -> dict:
        self.params, self.opt_state, metrics = self._step(self.graphdef, self.cfg, self.params, self.opt_state,
                                                          self.frozen, self.put(batch))
        return metrics

    def evaluate(self, batches: list[Batch]) -> dict:
        sums = np.zeros(4)
        for b in batches:
            sums += np.array(jax.device_get(self._eval(self.graphdef, self.params, self.frozen, self.put(b),
                                                       self.is_new)))
        s, n, correct, on_new = sums
        return {"eval_loss": s / max(n, 1.0), "new_token_acc": correct / on_new if on_new else None,
                "eval_new_tokens": int(on_new)}

    def model(self) -> RowsModel:
        return nnx.merge(self.graphdef, self.params, self.frozen)

    def state(self) -> dict:
        return {"rows": self.params, "opt_state": self.opt_state}

    def restore(self, state: dict) -> None:
        self.params, self.opt_state = state["rows"], state["opt_state"]


def checkpoint_manager(path: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, trainer: Trainer, data_state: dict) -> None:
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(trainer.state()),
        meta=ocp.args.JsonSave({"step": step, "data": data_state})), force=True)


def restore_latest(mngr: ocp.CheckpointManager, trainer: Trainer, packer: Packer) -> int:
    step = mngr.latest_step()
    if step is None:
        return 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.state())
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    meta=ocp.args.JsonRestore()))
    trainer.restore(got.state)
    packer.load_state(got.meta["data"])
    return int(got.meta["step"])


def run(rm: RowsModel, cfg: TrainConfig, mesh: Mesh, docs: list[Doc], out: Path, *,
        eval_docs: list[Doc] | None = None, resume: bool = False, show_progress: bool = True) -> RowsModel:
    """Train `rm`'s rows for cfg.steps into `out` (metrics.jsonl, checkpoints/); returns the trained RowsModel."""
    trainer = Trainer(rm, cfg, mesh)
    packer = Packer(docs, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed)
    evals = eval_batches(eval_docs, cfg.seq_len, cfg.batch_size) if eval_docs else None
    with checkpoint_manager(out / "checkpoints", cfg.keep) as mngr:
        start = restore_latest(mngr, trainer, packer) if resume else 0
        metrics = report.MetricsLog(out / "metrics.jsonl", keep_through=start if resume else None)
        bar = report.progress_bar(cfg.steps, start, disable=not show_progress)
        try:
            t_prev = time.perf_counter()
            for step in range(start + 1, cfg.steps + 1):
                batch = packer.next()
                m = jax.device_get(trainer.step(batch))
                now = time.perf_counter()
                tokens = int(np.count_nonzero(batch.segments))
                rec = {"step": step, "loss": float(m["loss"]), "lr": float(trainer.lr(step - 1)),
                       "grad_norm": float(m["grad_norm"]), "tokens": tokens,
                       "targets": int(m["targets"]), "tokens_per_s": tokens / max(now - t_prev, 1e-9)}
                if evals and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    rec.update(trainer.evaluate(evals))
                metrics.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    save(mngr, step, trainer, packer.state)
                t_prev = time.perf_counter()
        finally:
            bar.close()
            metrics.close()
    report.plot_loss(out / "metrics.jsonl", out / "loss.png")
    return trainer.model()

