"""The training loop: one jitted, donated step over the rows (and LoRA adapters); orbax checkpoints; exact resume.

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
import itertools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvocab.errors import CheckpointError, TrainError, brief, fault_point, raise_if_interrupted
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
    lora_lr: float | None = None  # the adapters' peak learning rate (None: lr)
    warmup: int = 0
    schedule: str = "cosine"  # cosine | constant (after linear warmup)
    weight_decay: float = 0.0
    clip: float = 1.0  # global-norm clipping; <= 0 disables
    seed: int = 0
    save_every: int = 0  # 0: only the final step
    keep: int = 3
    eval_every: int = 0  # 0: only at the end
    remat: str | None = None  # None: the model's own choice (Llama(..., remat=)); full: recompute each
    # layer in the backward pass (activations shrink to one [B, T, D] per layer for one more forward);
    # dots: keep only the matmul outputs; none; auto: dots when they fit, else full (jaxvocab/remat.py)
    skip_nonfinite: bool = False  # a step with a non-finite loss / gradient: skip it (logged) instead of stopping


def schedule(cfg: TrainConfig, peak: float | None = None) -> optax.Schedule:
    peak = cfg.lr if peak is None else peak
    main_steps = max(cfg.steps - cfg.warmup, 1)
    main = optax.cosine_decay_schedule(peak, main_steps) if cfg.schedule == "cosine" else optax.constant_schedule(peak)
    if cfg.warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup), main], [cfg.warmup])


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled step is built from. The learning rates and the seed are its arguments, so a
    run with another --lr, --lora-lr, --warmup, --steps or --seed reuses the compiled step and the
    compile cache instead of compiling a new one (minutes at 8B)."""

    clip: float
    weight_decay: float
    remat: str | None

    @classmethod
    def of(cls, cfg: TrainConfig) -> StepConfig:
        return cls(cfg.clip, cfg.weight_decay, cfg.remat)


def _group(key: str) -> str:
    return "lora" if key == "lora" else "rows"


def param_labels(params: dict) -> dict:
    """'lora' for the adapters (the params' "lora" subtree), 'rows' for the embedding/head rows."""
    return {k: jax.tree.map(lambda _, k=k: _group(k), v) for k, v in params.items()}


def optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    """AdamW over rows and adapters at a unit learning rate (train_step scales each group's update by
    its own rate, an argument); clipping by their joint norm. The unit rate is a schedule, so the state
    keeps its schedule count and run dirs of earlier versions still resume."""
    unit = lambda count: 1.0  # noqa: E731
    groups = {g: optax.adamw(unit, weight_decay=cfg.weight_decay) for g in ("rows", "lora")}
    adamw = optax.multi_transform(groups, param_labels)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip > 0 else adamw


def batch_grads(graphdef, params, frozen, batch: Batch, dropout_key=None, remat=None):
    """Summed NLL, target count and summed gradients over the K micro-batches of `batch`."""

    def micro(carry, xs):
        mb, k = xs
        grads, total, count = carry
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, k)
        loss_fn = lambda p: token_sums(graphdef, p, frozen, mb, key, remat)  # noqa: E731  (NLL sum, aux: count)
        (s, n), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (jax.tree.map(jnp.add, grads, g), total + s, count + n), None

    init = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), jnp.float32(0))
    (grads, total, count), _ = jax.lax.scan(micro, init, (batch, jnp.arange(batch.inputs.shape[0])))
    return total, count, grads


def _scaled(updates, rate):
    """AdamW's unit-rate update times the group's rate: bit for bit what a rate inside optax gives."""
    return jax.tree.map(lambda u: u * rate.astype(u.dtype), updates)


def _all_finite(*trees) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree.leaves(t)]))


def train_step(graphdef, cfg: StepConfig, params, opt_state, frozen, batch: Batch, step, rates: dict, seed_key):
    """One optimizer step at learning `rates` ({"rows", "lora"}: the schedules at `step`); a step whose
    loss, gradients or new rows are not finite changes nothing (`finite` says so, and the host stops or skips)."""
    # Adapter dropout draws from (seed, step, micro-batch): a resumed run replays the same masks.
    key = jax.random.fold_in(seed_key, step)
    total, count, grads = batch_grads(graphdef, params, frozen, batch, key, cfg.remat)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, new_opt_state = optimizer(cfg).update(grads, opt_state, params)
    updates = {k: _scaled(v, rates[_group(k)]) for k, v in updates.items()}
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(total) & _all_finite(grads, new_params)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params, opt_state = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state)
    return (
        params,
        opt_state,
        {
            "loss": total / denom,
            "grad_norm": optax.global_norm(grads),
            "targets": count,
            "finite": finite,
            "lr": rates["rows"],  # what metrics.jsonl logs: the rate this step ran at
        },
    )


def eval_step(graphdef, params, frozen, batch: Batch, is_new):
    return eval_sums(graphdef, params, frozen, jax.tree.map(lambda a: a[0], batch), is_new)


class Trainer:
    """Rows + optimizer state on the mesh, and the compiled step that advances them."""

    def __init__(self, rm: RowsModel, cfg: TrainConfig, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.graphdef, params, frozen = nnx.split(rm, nnx.Param, Frozen)
        self.frozen = nnx.to_pure_dict(frozen)
        replicated = NamedSharding(mesh, P())
        # Copies: the step donates its inputs, and the caller's RowsModel must stay usable. Rows are
        # replicated; adapters keep the shardings their logical axes gave them (lora.py).
        params = nnx.to_pure_dict(params)
        shardings = {
            k: jax.tree.map(lambda a, k=k: a.sharding if k == "lora" else replicated, v) for k, v in params.items()
        }
        self.params = jax.device_put(jax.tree.map(jnp.copy, params), shardings)
        self.step_cfg = StepConfig.of(cfg)
        opt_state = jax.jit(optimizer(self.step_cfg).init)(self.params)  # moments follow their params' shardings
        opt_shardings = jax.tree.map(
            lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else replicated, opt_state
        )
        self.opt_state = jax.device_put(opt_state, opt_shardings)
        self.lr, self.lora_lr = schedule(cfg), schedule(cfg, cfg.lora_lr)
        self.seed_key = jax.random.key(cfg.seed)  # uncommitted, like the step number: every process passes its own
        is_new = jnp.zeros(rm.config.vocab_size, bool).at[rm.ids[...]].set(True)
        self.is_new = jax.device_put(is_new, replicated)
        # Pinned output shardings: left to the compiler, the rows come back sharded, the second step
        # compiles a differently partitioned program, and a resumed run would not be bit-identical.
        # graphdef and the StepConfig are static: Trainers of the same model share one compilation
        # whatever their learning rates, schedule lengths and seeds.
        self._step = jax.jit(
            train_step,
            static_argnums=(0, 1),
            donate_argnums=(2, 3),
            out_shardings=(shardings, opt_shardings, replicated),
        )
        self.steps_done = 0
        self._eval = jax.jit(eval_step, static_argnums=0)

    def batch_sharding(self, B: int) -> NamedSharding:
        """The B axis split over (data, fsdp) when that divides it, else replicated."""
        spec = P(None, RULES["batch"], None) if B % axis_size(self.mesh, "batch") == 0 else P()
        return NamedSharding(self.mesh, spec)

    def local_rows(self, B: int) -> slice:
        """The rows of a [K, B, T] batch this process's devices hold (all of them on one process)."""
        idx = self.batch_sharding(B).addressable_devices_indices_map((1, B, 1)).values()
        spans = sorted({s[1].indices(B)[:2] for s in idx})
        lo, hi = spans[0][0], max(e for _, e in spans)
        if sum(e - s for s, e in spans) < hi - lo or any(a[1] < b[0] for a, b in itertools.pairwise(spans)):
            return slice(0, B)  # this process's rows are not one block: it reads the whole batch
        return slice(lo, hi)

    def put(self, batch: Batch, global_rows: int | None = None) -> Batch:
        """Host batch -> global device array. `batch` holds either all rows or, with `global_rows`, only
        this process's block of them (`local_rows`); each process contributes what its devices hold."""
        B = global_rows or batch.inputs.shape[1]
        sharding = self.batch_sharding(B)
        return Batch(*(jax.make_array_from_process_local_data(sharding, a, (a.shape[0], B, a.shape[2])) for a in batch))

    def _args(self, batch: Batch) -> tuple:
        """The step's arguments. The rates follow the step number (the one metrics.jsonl logs), skipped
        steps included, so a resumed run takes them from its restored step alone."""
        s = self.steps_done
        rates = {"rows": np.float32(self.lr(s)), "lora": np.float32(self.lora_lr(s))}
        args = (self.params, self.opt_state, self.frozen, batch, jnp.int32(s), rates, self.seed_key)
        return (self.graphdef, self.step_cfg, *args)

    def step(self, batch: Batch, global_rows: int | None = None) -> dict:
        """One update; the metrics it returns carry the rows' learning rate it ran at ("lr")."""
        self.params, self.opt_state, metrics = self._step(*self._args(self.put(batch, global_rows)))
        self.steps_done += 1
        return metrics

    def lower(self, batch: Batch):
        """The step as `jax.jit(...).lower` gives it, for `batch` (placed with `put`): its compiled
        memory, its HLO (which no learning rate, schedule length or seed changes)."""
        return self._step.lower(*self._args(batch))

    def evaluate(self, batches: list[Batch], prefix: str = "eval_", global_rows: int | None = None) -> dict:
        """Loss, and loss / argmax accuracy on the targets that are trained ids (what rows training is
        for: on a big model the total loss hides them). `global_rows` as for `put`."""
        sums = np.zeros(5)
        for b in batches:
            sums += np.array(
                jax.device_get(
                    self._eval(self.graphdef, self.params, self.frozen, self.put(b, global_rows), self.is_new)
                )
            )
        s, n, correct, on_new, new_nll = sums
        acc_key = "new_token_acc" if prefix == "eval_" else prefix + "new_token_acc"
        return {
            prefix + "loss": s / max(n, 1.0),
            acc_key: correct / on_new if on_new else None,
            prefix + "new_token_loss": new_nll / on_new if on_new else None,
            prefix + "new_tokens": int(on_new),
        }

    def model(self) -> RowsModel:
        return nnx.merge(self.graphdef, self.params, self.frozen)

    def state(self) -> dict:
        return {"rows": self.params, "opt_state": self.opt_state}  # "rows" also holds the adapters ("lora")

    def restore(self, state: dict) -> None:
        self.params, self.opt_state = state["rows"], state["opt_state"]


class Checkpoints:
    """The run's orbax CheckpointManager, opened at the first save or restore: orbax and tensorstore
    (~25 MB resident, ~0.2 s to import) stay out of the process until then, so a run that saves
    only at its end holds none of it during the training steps, its peak memory."""

    def __init__(self, path: Path, keep: int):
        self.path, self.keep, self._manager = path, keep, None

    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True, enable_async_checkpointing=False)
            self._manager = ocp.CheckpointManager(self.path.absolute(), options=options)
        return self._manager

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        if self._manager is not None:
            self._manager.close()


def save(ckpts: Checkpoints, step: int, trainer: Trainer, data_state: dict) -> None:
    import orbax.checkpoint as ocp

    ckpts.manager().save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(trainer.state()), meta=ocp.args.JsonSave({"step": step, "data": data_state})
        ),
        force=True,
    )


def restore_latest(ckpts: Checkpoints, trainer: Trainer, packer: Packer) -> int:
    import orbax.checkpoint as ocp

    mngr = ckpts.manager()
    step = mngr.latest_step()
    if step is None:
        return 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainer.state())
    got = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    )
    trainer.restore(got.state)
    trainer.steps_done = int(got.meta["step"])
    packer.load_state(got.meta["data"])
    return int(got.meta["step"])


def _check_finite(m: dict, step: int, cfg: TrainConfig, ckpts: Checkpoints, out: Path) -> None:
    """Stop at the first non-finite step (its update was not applied), unless told to skip it."""
    if m["finite"] or cfg.skip_nonfinite:
        return
    last = ckpts.manager().latest_step()
    kept = (
        f"the last good checkpoint (step {last}) is in {out / 'checkpoints'}" if last else "no checkpoint was saved yet"
    )
    raise TrainError(
        f"step {step}: the loss ({float(m['loss'])}) or a gradient / updated row is not finite; {kept}. "
        "Lower --lr, check --weight-decay and the data, or pass --skip-nonfinite to skip such steps"
    )


def _restore(ckpts: Checkpoints, trainer: Trainer, packer: Packer, out: Path) -> int:
    """restore_latest, with a damaged checkpoint as one line (orbax raises many types for it)."""
    try:
        return restore_latest(ckpts, trainer, packer)
    except Exception as e:
        raise CheckpointError(
            f"{out / 'checkpoints'}: the latest checkpoint cannot be restored ({type(e).__name__}: "
            f"{brief(str(e).splitlines()[0] if str(e) else '')}); delete that step's dir to resume "
            "from the one before, or start a new --out"
        ) from None


def _due(step: int, steps: int, every: int | None) -> bool:
    """Evals and saves run every `every` steps and always at the last one, so a finished run ends measured and saved."""
    return step == steps or bool(every and step % every == 0)


def _step_record(step: int, m: dict, packer: Packer, seconds: float, *, warn: bool) -> dict:
    """One metrics.jsonl line; a skipped step is marked there (and on stderr) so a flat loss curve is explained."""
    rec = {
        "step": step,
        "loss": float(m["loss"]),
        "lr": float(m["lr"]),
        "grad_norm": float(m["grad_norm"]),
        "tokens": packer.last_tokens,
        "targets": int(m["targets"]),
        "tokens_per_s": packer.last_tokens / max(seconds, 1e-9),
    }
    if not m["finite"]:
        rec["skipped"] = "non-finite loss or gradient"
        if warn:
            print(
                f"warning: step {step}: non-finite loss or gradient; step skipped (--skip-nonfinite)", file=sys.stderr
            )
    return rec


def run(
    rm: RowsModel,
    cfg: TrainConfig,
    mesh: Mesh,
    docs,
    out: Path,
    *,
    eval_docs: list[Doc] | None = None,
    resume: bool = False,
    show_progress: bool = True,
) -> RowsModel:
    """Train `rm`'s rows for cfg.steps into `out` (metrics.jsonl, checkpoints/); returns the trained RowsModel.

    `docs` is a list of Docs or a tokenized store (train/store.py). Every process plans the same global
    batches; each reads and places only the rows its devices hold. Process 0 alone writes metrics.
    """
    trainer = Trainer(rm, cfg, mesh)
    packer = Packer(docs, cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.seed)
    rows = trainer.local_rows(cfg.batch_size)
    evals = eval_batches(eval_docs, cfg.seq_len, cfg.batch_size) if eval_docs else None
    main = jax.process_index() == 0
    out.mkdir(parents=True, exist_ok=True)
    with Checkpoints(out / "checkpoints", cfg.keep) as ckpts:
        start = _restore(ckpts, trainer, packer, out) if resume else 0
        metrics = report.MetricsLog(out / "metrics.jsonl", keep_through=start if resume else None) if main else None
        bar = report.progress_bar(cfg.steps, start, disable=not (show_progress and main))
        try:
            t_prev = time.perf_counter()
            for step in range(start + 1, cfg.steps + 1):
                batch = packer.next(rows)
                m = jax.device_get(trainer.step(batch, cfg.batch_size))
                raise_if_interrupted()
                now = time.perf_counter()
                _check_finite(m, step, cfg, ckpts, out)
                rec = _step_record(step, m, packer, now - t_prev, warn=main)
                if evals and _due(step, cfg.steps, cfg.eval_every):
                    rec.update(trainer.evaluate(evals))
                    rec.update(trainer.evaluate([batch], prefix="train_", global_rows=cfg.batch_size))
                if metrics:
                    metrics.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
                if _due(step, cfg.steps, cfg.save_every):
                    save(ckpts, step, trainer, packer.state)
                    fault_point("train:checkpoint")
                t_prev = time.perf_counter()
        finally:
            bar.close()
            if metrics:
                metrics.close()
    if main:
        report.plot_loss(out / "metrics.jsonl", out / "loss.png")
    return trainer.model()
