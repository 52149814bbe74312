"""KL(old || new) of an expansion against Hewitt's bound, on a model whose logits are all negative
(as a pretrained Llama's mostly are): the mean init stays under log(1 + k/n), a random init does not."""

import math

import numpy as np
import pytest

import jaxvocab
from convert.__main__ import main as convert_main
from jaxvocab import diagnostics
from jaxvocab.model import project
from jaxvocab.tokenizer import Tokenizer
from jaxvocab.vocab import plan_vocab
from tests.test_vocab import sharded_model, tiny_config

V, D = 512, 64


def synthetic_tok(n: int = V) -> Tokenizer:
    """n ids of distinct byte strings, not Llama-3's: planning works, encoding is not needed."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({f"piece{i}".encode(): i for i in range(256, n)})
    return Tokenizer(ranks, {}, source="synthetic", llama3=False, not_llama3_reason="synthetic")


def negative_model(mesh, vocab: int = V, hidden: int = D, layers: int = 2, dead=(), seed: int = 0):
    """Every trained head row scores strongly against a constant direction of the hidden state, so
    all logits are large and negative; `dead` rows are zero (untrained) as in Llama-3 base."""
    rng = np.random.default_rng(seed)
    embed = rng.normal(0, 0.5, (vocab, hidden))
    head = rng.normal(0, 0.5, (vocab, hidden))
    embed[:, 0] = 3.0
    head[:, 0] = -3.0 * rng.uniform(0.5, 1.5, vocab)
    embed[list(dead)] = 0.0
    head[list(dead)] = 0.0
    norm = np.ones(hidden)
    norm[0] = 4.0
    return sharded_model(
        tiny_config(vocab, hidden=hidden, layers=layers), mesh, seed=seed, embed=embed, head=head, norm=norm, std=0.05
    )


@pytest.fixture(scope="module")
def probe():
    return np.random.default_rng(1).integers(0, V, (2, 300)).astype(np.int32)


def test_hidden_states_give_the_model_logits(mesh24, probe):
    model = negative_model(mesh24)
    h = diagnostics.final_hidden(model, probe)
    logits = np.asarray(project(h[None], model.lm_head.get_value(), h.dtype))[0].reshape(2, 300, V)
    np.testing.assert_allclose(logits, np.asarray(model(probe)), rtol=0, atol=1e-5)
    assert logits.max() < -5.0  # the premise: every logit is large and negative


@pytest.mark.parametrize("pad,dead", [(1, ()), (128, range(20, 30))])
def test_mean_under_bound_random_far_over(mesh24, probe, pad, dead):
    """Zero (untrained) rows score 0, the largest logit here: with them the random rows share the
    mass with the zero rows instead of taking nearly all of it, as in Llama-3 base."""
    model = negative_model(mesh24, dead=dead)
    tok = synthetic_tok()
    plan = plan_vocab(tok, [f"<new{i}>" for i in range(8)], model=model, pad_to_multiple_of=pad)
    mean = diagnostics.expansion_kl(model, probe, plan, tok, init="mean")
    rand = diagnostics.expansion_kl(model, probe, plan, tok, init="random")
    assert (mean.k, mean.n, mean.positions) == (plan.new_rows - V, V - len(dead), 600)
    assert mean.bound == pytest.approx(math.log1p(mean.k / mean.n))
    assert 0 < mean.max_kl <= mean.bound and mean.mean_kl <= mean.max_kl
    assert mean.new_mass_max < 1 - math.exp(-mean.bound) + 1e-7
    assert rand.mean_kl > 10 * rand.bound and rand.new_mass_mean > 100 * mean.new_mass_mean
    assert rand.new_mass_mean > (0.99 if not dead else 0.3)
    print(
        f"\npad {pad}, {len(dead)} zero rows: k={mean.k} n={mean.n} bound={mean.bound:.4g} | mean: max KL {mean.max_kl:.3g}, mean KL "
        f"{mean.mean_kl:.3g}, mass {mean.new_mass_mean:.3g} | random: max KL {rand.max_kl:.3g}, mean KL "
        f"{rand.mean_kl:.3g}, mass {rand.new_mass_mean:.3g}"
    )


@pytest.mark.parametrize("init", ["random", "mean-noise"])
def test_expanded_model_path_matches_plan_path_and_numpy(mesh24, probe, init):
    """Same numbers from the actual expanded model; and both against a float64 numpy KL. The probe
    avoids the rewritten rows: reading them would change the hidden states (plan path: head only)."""
    probe = np.where((probe >= 20) & (probe < 30), probe + 100, probe)
    tok = synthetic_tok()
    old = negative_model(mesh24, dead=range(20, 30))
    new = negative_model(mesh24, dead=range(20, 30))
    plan = plan_vocab(tok, [f"<new{i}>" for i in range(8)], model=old, pad_to_multiple_of=128)
    from_plan = diagnostics.expansion_kl(old, probe, plan, tok, init=init, fix_untrained=True)
    old_head = np.asarray(old.lm_head.get_value(), np.float64)
    new, _, _ = jaxvocab.expand_vocab(new, tok, plan, init=init, fix_untrained=True)
    from_model = diagnostics.expansion_kl(old, probe, plan, tok, init=init, fix_untrained=True, expanded=new)
    for a, b in (
        (from_plan.max_kl, from_model.max_kl),
        (from_plan.mean_kl, from_model.mean_kl),
        (from_plan.new_mass_mean, from_model.new_mass_mean),
    ):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-10)
    assert from_plan.k == from_model.k == 128 + 10  # 10 fixed rows are rewritten too
    h_old = np.asarray(diagnostics.final_hidden(old, probe), np.float64)
    h_new = np.asarray(diagnostics.final_hidden(new, probe), np.float64)
    lo, ln = h_old @ old_head.T, h_new @ np.asarray(new.lm_head.get_value(), np.float64).T
    kept = np.ones(V, bool)
    kept[20:30] = False
    lo = lo[:, kept]
    logp = lo - np.logaddexp.reduce(lo, axis=1, keepdims=True)
    logq = ln - np.logaddexp.reduce(ln, axis=1, keepdims=True)
    kl = (np.exp(logp) * (logp - logq[:, :V][:, kept])).sum(1)
    # f32 logits of the same row from two matmuls may differ in the last bit: a ~1e-12 KL floor
    assert from_model.mean_kl == pytest.approx(kl.mean(), rel=1e-4, abs=1e-10)
    assert from_model.max_kl == pytest.approx(kl.max(), rel=1e-4, abs=1e-10)


def test_report_table():
    r = diagnostics.KLReport("mean", 10, 0.01, 0.005, 0.004, 0.009, k=3, n=100)
    text = diagnostics.summary([r])
    assert "bound log(1+k/n)" in text and f"{math.log1p(0.03):.3g}" in text


# --------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def llama_negative_dir(tmp_path_factory, mesh1):
    """An HF dir with the real Llama-3 text tokenizer, 128256 all-negative rows, reserved rows zero."""
    from examples.llama3_tokenizer import write_text_tokenizer

    d = tmp_path_factory.mktemp("negllama")
    tok_dir = d / "tok"
    tok_dir.mkdir()
    write_text_tokenizer(tok_dir)
    tok = jaxvocab.load_tokenizer(tok_dir)
    model = negative_model(mesh1, vocab=tok.n_words, hidden=16, layers=1, dead=tok.free_reserved())
    return jaxvocab.save_hf(model, d / "hf", tokenizer=tok, show_progress=False), tok


def test_cli_inspect_probe(llama_negative_dir, tmp_path, capsys):
    path, tok = llama_negative_dir
    probe = tmp_path / "probe.txt"
    probe.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 20)
    rc = convert_main(["inspect", str(path), "--probe", str(probe), "--add-tokens", "<think>,</think>,hello"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(tok.free_reserved())} free reserved slots" in out
    assert f"untrained rows {len(tok.free_reserved())}: 128002 <|reserved_special_token_0|>" in out
    assert "renames <|reserved_special_token_0|>" in out and "existing" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["mean"], ["random"])}
    mean_max, bound = float(rows["mean"][1]), float(rows["mean"][4])
    assert bound == pytest.approx(math.log1p(2 / (tok.n_words - len(tok.free_reserved()))), rel=1e-2)
    assert mean_max <= bound and float(rows["random"][2]) > 100 * bound


def test_cli_inspect_plan_loads_no_weights(llama_negative_dir, monkeypatch, capsys):
    path, _ = llama_negative_dir

    def no_weights(*a, **k):
        raise AssertionError("inspect without --probe must not load weights")

    monkeypatch.setattr(jaxvocab, "load", no_weights)
    assert convert_main(["inspect", str(path), "--add-tokens", "<a>,<b>"]) == 0
    out = capsys.readouterr().out
    assert "<a>" in out and "128002" in out and "untrained rows" not in out
