"""How much does a vocabulary expansion disturb the model's next-token distributions?

For every probe position we compare p, the old model's softmax over the rows it keeps, with q,
the expanded model's softmax over all its rows, and report KL(p || q) and the probability q puts
on the re-initialised rows, beside Hewitt's bound for the mean init.

The bound. Let T be the trained rows the init statistics are taken over (n = |T|) and K the rows
the expansion (re)writes -- new tokens, reused reserved/spare slots, padding and fixed untrained
rows -- (k = |K|). The kept rows are all other old rows, so T is a subset of them and
q(w) = p(w) * Z / (Z + sum_{j in K} exp(l_j)) on every kept w, where Z sums exp over kept rows. Hence
KL(p || q) = log(1 + sum_{j in K} exp(l_j) / Z). With the mean init every new logit is
l_j = h . mean_T(e) = mean_T(h . e), and Jensen gives exp(mean_T l) <= mean_T exp(l) <= Z / n, so
KL <= log(1 + k / n) (Hewitt, "Initializing new word embeddings for pretrained language models").
k counts *every* written row, padding included, because each of them takes part in the softmax;
n counts only trained rows because the mean is over those. Nothing bounds the random init: a row
near 0 scores ~0 against logits that are mostly large and negative, and takes most of the mass.

Rows a probe *reads* that the expansion rewrites (untrained ids in the probe) change the hidden
states too; the plan-based path (`expanded=None`) measures the head only and ignores that.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvocab.errors import VocabError
from jaxvocab.model import project
from jaxvocab.row_init import init_rows
from jaxvocab.vocab import VocabPlan, expansion_layout, model_mesh, subword_arrays

CHUNK = 256  # probe positions per KL step: [CHUNK, V] f32 logits stay small even at 128k rows


@dataclasses.dataclass(frozen=True)
class KLReport:
    init: str
    positions: int
    max_kl: float
    mean_kl: float
    new_mass_mean: float  # q's mass on the written rows, averaged over positions
    new_mass_max: float
    k: int  # rows written by the expansion (they all receive probability)
    n: int  # trained rows the init statistics come from

    @property
    def bound(self) -> float:
        """Hewitt's bound log(1 + k/n); it holds for init="mean" only."""
        return math.log1p(self.k / self.n) if self.n else math.inf


def summary(reports: list[KLReport]) -> str:
    head = ("init", "max KL", "mean KL", "new-row mass", "bound log(1+k/n)", "k", "n")
    rows = [head] + [
        (r.init, f"{r.max_kl:.3g}", f"{r.mean_kl:.3g}", f"{r.new_mass_mean:.3g}", f"{r.bound:.3g}", str(r.k), str(r.n))
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    )


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, state, ids):
    h, _ = nnx.merge(graphdef, state).hidden(ids)
    return h


def final_hidden(model, ids) -> jax.Array:
    """[P, D] final-norm hidden states of the probe (all positions of all rows, flattened): the
    model's own `hidden` stage."""
    ids = jnp.asarray(np.atleast_2d(np.asarray(ids, np.int32)))
    h = _hidden(*nnx.split(model), ids)
    return h.reshape(-1, h.shape[-1])


@jax.jit
def _kl(old_logits, new_logits, kept, written):
    """Per position: KL(p || q) over kept rows, and q's mass on written rows, in f32.

    Written as KL = log1p(s) - E_p[delta], delta = new - old logit on kept rows and
    s = E_p[expm1(delta)] + sum_written exp(l - logZ_old): no two nearly equal log-partition
    functions are subtracted, so KLs of 1e-7 are still accurate in f32.
    """
    v = old_logits.shape[-1]
    lo = jnp.where(kept, old_logits, -jnp.inf)
    log_z = jax.nn.logsumexp(lo, axis=-1, keepdims=True)
    p = jnp.exp(lo - log_z)
    delta = jnp.where(kept, new_logits[:, :v] - old_logits, 0.0)
    added = jnp.sum(jnp.where(written, jnp.exp(new_logits - log_z), 0.0), axis=-1)
    s = jnp.sum(p * jnp.expm1(delta), axis=-1) + added
    kl = jnp.log1p(s) - jnp.sum(p * delta, axis=-1)
    return kl, added / (1.0 + s)


def expansion_kl(
    model,
    probe_ids,
    plan: VocabPlan,
    tok,
    *,
    init: str = "mean",
    expanded=None,
    fix_untrained: bool = False,
    seed: int = 0,
) -> KLReport:
    """KL(old || new) over the probe's positions for `plan` under `init`.

    Args:
      model: the model before expansion; probe_ids: [P] or [B, T] ids (`probe_ids(tok, text)`).
      plan, tok: as for `expand_vocab`; init / fix_untrained / seed: the expansion to score.
      expanded: the model `expand_vocab(..., donate=False)` returned, to score its own logits.
    Returns:
      A KLReport (max / mean KL, new-row mass, Hewitt's bound log(1+k/n)).
    Example:
      >>> print(table([expansion_kl(model, probe_ids(tok, text), plan, tok, init=i) for i in ("mean", "random")]))

    Without `expanded`, the new head rows are computed exactly as expand_vocab would (same
    statistics, same seed) and scored against the old model's hidden states; with `expanded` (the
    model expand_vocab(model, tok, plan, init, ..., donate=False) returned), its own logits are used.
    """
    layout_plan, targets, trained, texts = expansion_layout(model, tok, plan, init, fix_untrained)
    new_rows = layout_plan.new_rows
    kept = np.ones(plan.old_rows, bool)
    kept[targets[targets < plan.old_rows]] = False
    written = np.ones(new_rows, bool)
    written[np.nonzero(kept)[0]] = False
    h = final_hidden(model, probe_ids)
    if expanded is not None:
        if expanded.config.vocab_size != new_rows:
            raise VocabError(f"the expanded model has {expanded.config.vocab_size} rows but the plan makes {new_rows}")
        new_logits = _expanded_logits(expanded, final_hidden(expanded, probe_ids))
    else:
        rows = _planned_rows(model, tok, trained, texts, init, len(targets), seed)
        new_logits = _projected_logits(rows, targets, new_rows - plan.old_rows)
    kl, mass = _chunked_kl(model, h, new_logits, jnp.asarray(kept), jnp.asarray(written))
    return KLReport(
        init=init,
        positions=int(kl.size),
        max_kl=float(kl.max()),
        mean_kl=float(kl.mean()),
        new_mass_mean=float(mass.mean()),
        new_mass_max=float(mass.max()),
        k=int(written.sum()),
        n=int(trained.sum()),
    )


def _expanded_logits(expanded, h_new):
    """New logits from the expanded model itself, so the score covers what expand_vocab really wrote."""
    return lambda s, old, hc: expanded.logits(h_new[s : s + CHUNK])


def _projected_logits(rows, targets, extra: int):
    """New logits without building the expanded model: old logits, padded, with the planned rows' scores set."""
    return lambda s, old, hc: jnp.pad(old, ((0, 0), (0, extra))).at[:, targets].set(project(hc, rows, hc.dtype))


def _chunked_kl(model, h, new_logits, kept, written):
    """Per-position KL and new-row mass, CHUNK positions at a time so [P, V] logits never exist at once."""
    kls, masses = [], []
    for s in range(0, h.shape[0], CHUNK):
        hc = h[s : s + CHUNK]
        old = model.logits(hc)
        kl, mass = _kl(old, new_logits(s, old, hc), kept, written)
        kls.append(np.asarray(kl))
        masses.append(np.asarray(mass))
    return np.concatenate(kls), np.concatenate(masses)


def _planned_rows(model, tok, trained, texts, init: str, k: int, seed: int):
    """The [k, D] head rows expand_vocab would write (same statistics, same per-table seed)."""
    head = model.head_table.get_value()
    n_table = 0 if model.lm_head is None else 1
    key = jax.random.fold_in(jax.random.key(seed), n_table)
    subword = subword_arrays(tok, texts, trained, init)
    return init_rows(head, trained, key, subword, method=init, k=k, mesh=model_mesh(model)).astype(head.dtype)


def probe_ids(tok, text: str, max_tokens: int = 1024) -> np.ndarray:
    """The probe text as one row of ids (bos first), cut to max_tokens."""
    ids = tok.encode(text, bos=tok.bos_id is not None)[:max_tokens]
    if len(ids) < 2:
        raise VocabError("the probe text encodes to fewer than 2 tokens; give a longer probe")
    return np.asarray([ids], np.int32)
