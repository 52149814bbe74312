"""Vocabulary expansion at load time: a checkpoint read straight into the plan's final-size tables.

    plan = plan_vocab(tok, ["<|lang_xx|>"], model=abstract_model)        # before any weight is read
    model, tok, plan = load_expanded(src, tok, plan, init="mean")       # what `import --add-tokens` runs

Growing a loaded model copies each table into a larger one. Here the loader allocates the final
rows from the start (rows past the checkpoint are zero), so only the planned rows are written.
Both functions give rows and ids bit-identical to `load` + `expand_vocab` (tested), except that
`load_expanded`'s covariance rows agree to f32 rounding (their sampling compiles in a program of its own).
"""

from __future__ import annotations

from concurrent.futures import Executor, ThreadPoolExecutor

import jax

from jaxvocab.errors import VocabError
from jaxvocab.io.loader import TABLES  # in `tables(model)` order
from jaxvocab.model import check_live
from jaxvocab.row_init import table_rows
from jaxvocab.row_stats import model_stats, start_model_stats
from jaxvocab.sharding import single_device_mesh
from jaxvocab.vocab import Expansion, VocabPlan, _check_stat_init, _layout, _rewrite, model_mesh, subword_arrays


def load_expanded(
    path, tok, plan: VocabPlan, init: str = "mean", *, fix_untrained: bool = False, seed: int = 0, **load_options
) -> Expansion:
    """Load `path` with its vocabulary expanded by `plan`: `load` + `expand_vocab` in one pass, at the
    memory and (nearly) the time of a plain `load`.

    On a CPU mesh the planned rows are written into the loader's host buffers before they become the
    tables (a borrowed table cannot be updated in place by XLA: it would copy it). On accelerators
    the model is loaded at the final size and `expand_loaded` updates the donated tables in place.

    Args:
      path: an HF or Meta checkpoint dir.
      tok: its tokenizer, which `plan` was made for.
      plan: from `plan_vocab(tok, tokens, model=...)` on the checkpoint's row count (an abstract
        model from its config is enough: see `convert/vocab_cli.plan_for_import`).
      init, fix_untrained, seed: as in `expand_vocab`.
      load_options: `load`'s keywords (dtype, mesh, show_progress, allow_nonfinite, ...).

    Returns:
      Expansion(model, tokenizer, plan).

    Example:
      >>> model, tok, plan = load_expanded("Llama-3.2-1B", tok, plan_vocab(tok, ["<x>"], model=abstract))
    """
    from jaxvocab.io import load

    if plan.tokenizer_size_before != tok.n_words:
        raise VocabError(
            f"the plan was made for a tokenizer of {plan.tokenizer_size_before} ids but this one has "
            f"{tok.n_words}; re-plan with this tokenizer"
        )
    if (load_options.get("mesh") or single_device_mesh()).devices.flat[0].platform != "cpu":
        model = load(path, vocab_rows=plan.new_rows, **load_options)
        return expand_loaded(model, tok, plan, init, fix_untrained=fix_untrained, seed=seed)
    # Tracing and compiling each table's statistics (0.05-0.3 s) run on a worker thread, so the
    # loader goes on reading meanwhile; XLA then runs them in its own threads.
    with ThreadPoolExecutor(1, thread_name_prefix="jaxvocab-stats") as worker:
        fill = _PlannedRows(tok, plan, init, fix_untrained, seed, worker)
        model = load(path, vocab_rows=plan.new_rows, fill=fill, **load_options)
    return Expansion(model, tok.with_tokens(fill.plan.renamed, fill.plan.appended, fill.plan.special_ids), fill.plan)


class _PlannedRows:
    """`load_expanded`'s `loader.Fill`. Each table's statistics are dispatched as soon as it is read,
    so XLA runs them while the loader reads the next table and the layers. On one device they run on
    a zero-copy view of the checkpoint's rows: the exact-size program `expand_vocab` runs, so the
    bits match, at ~0.5x the time of a cut of the final-size table (see row_stats._stats_fn)."""

    def __init__(self, tok, plan: VocabPlan, init: str, fix_untrained: bool, seed: int, worker: Executor):
        self.tok, self.plan, self.init, self.fix_untrained, self.seed = tok, plan, init, fix_untrained, seed
        self.sources, self.stats, self.views, self.worker = {}, {}, [], worker

    def table_read(self, model, path, whole) -> None:
        param = getattr(model, path[0])
        table = param.get_value()
        if whole is not None and len(table.devices()) == 1:
            table = jax.device_put(whole[: self.plan.old_rows], next(iter(table.devices())))
            self.views.append(table)
        self.sources[path] = table
        self.stats[path] = self.worker.submit(start_model_stats, model, [param], [table], self.plan.old_rows)

    def rows(self, model) -> dict:
        paths = [p for p in TABLES if p in self.sources]
        try:
            stats = [self.stats[p].result()()[0] for p in paths]
            layout, rows = _planned(
                model,
                self.tok,
                self.plan,
                self.init,
                self.fix_untrained,
                self.seed,
                stats,
                [self.sources[p] for p in paths],
            )
        finally:
            for view in self.views:
                view.delete()
        self.plan = layout.plan
        return {table: (layout.targets, r) for table, r in zip(TABLES, rows, strict=False)}


def _planned(model, tok, plan: VocabPlan, init: str, fix_untrained: bool, seed: int, stats, sources: list):
    """(layout, [k, D] host rows per table) of `plan` on a model loaded at the plan's size, from its
    tables' `stats`, reading each table's first `plan.old_rows` rows from `sources` (exact-size views
    or the final-size tables)."""
    layout = _layout(model, tok, plan, init, fix_untrained, stats)
    if len(layout.targets) == 0:
        return layout, []
    _check_stat_init(init, layout.trained)
    subword = subword_arrays(tok, layout.texts, layout.trained, init)
    k, mesh = len(layout.targets), model_mesh(model)
    rows = [
        table_rows(src, layout.trained, k, seed, n, subword, method=init, mesh=mesh, sums=st.sums, summed_rows=st.rows)
        for n, (src, st) in enumerate(zip(sources, stats, strict=True))
    ]
    return layout, rows


def expand_loaded(
    model, tok, plan: VocabPlan, init: str = "mean", *, fix_untrained: bool = False, seed: int = 0, donate: bool = True
) -> Expansion:
    """`expand_vocab` for a model read straight into the plan's final-size tables
    (`load(src, vocab_rows=plan.new_rows)`, rows past the checkpoint zero): the planned rows are
    written into the same-size tables, so no table is copied to grow it.

    Args:
      model: loaded with `vocab_rows=plan.new_rows`; its first `plan.old_rows` rows are the checkpoint's.
      tok: the checkpoint's tokenizer, which `plan` was made for.
      plan: from `plan_vocab(tok, tokens, model=...)` on the checkpoint's row count.
      init, fix_untrained, seed, donate: as in `expand_vocab`.

    Returns:
      Expansion(model, tokenizer, plan), with rows and ids identical to `expand_vocab`'s result.

    Example:
      >>> plan = plan_vocab(tok, ["<x>"], model=abstract_model)
      >>> model, tok, plan = expand_loaded(load(src, vocab_rows=plan.new_rows), tok, plan)
    """
    check_live(model)
    if model.config.vocab_size != plan.new_rows:
        raise VocabError(
            f"expand_loaded needs the model loaded at the plan's {plan.new_rows} rows, not "
            f"{model.config.vocab_size}; load it with vocab_rows=plan.new_rows or use expand_vocab"
        )
    stats = model_stats(model, rows=plan.old_rows)
    plan, targets, trained, texts = _layout(model, tok, plan, init, fix_untrained, stats)
    new_tok = tok.with_tokens(plan.renamed, plan.appended, plan.special_ids)
    new_model = _rewrite(model, targets, trained, texts, tok, init, plan.new_rows, seed, donate, stats)
    return Expansion(new_model, new_tok, plan)
