"""Expansion: init statistics over trained rows only, bit-identical old rows, mesh independence,
shardings, and the full export path checked by transformers (AutoTokenizer + LlamaForCausalLM)."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxvocab
from convert.__main__ import main as convert_main
from jaxvocab.model import TABLE_AXES
from jaxvocab.row_init import COV_SCALE, NOISE_SCALE, RANDOM_STD, init_rows, no_subword
from jaxvocab.sharding import sharding_for
from jaxvocab.vocab import VocabPlan, find_untrained, fix_untrained, plan_vocab, subword_arrays
from jaxvocab.vocab_load import expand_loaded, load_expanded
from tests._tok_util import build_gpt2_style
from tests.builders import make_hf_checkpoint, random_ids, torch_logits
from tests.test_vocab import sharded_model, tiny_config

ZERO_ROWS = (5, 6, 7)


def _gpt2_checkpoint(path, tied=False):
    build_gpt2_style(str(path))
    n = jaxvocab.load_tokenizer(path).n_words
    return make_hf_checkpoint(path, vocab=n, tied=tied, zero_rows=ZERO_ROWS)


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    return _gpt2_checkpoint(tmp_path_factory.mktemp("gpt2ckpt"))


@pytest.fixture(scope="module")
def gpt2_ckpt_tied(tmp_path_factory):
    return _gpt2_checkpoint(tmp_path_factory.mktemp("gpt2tied"), tied=True)


@pytest.fixture(scope="module")
def text_tok_dir(tmp_path_factory):
    """The package's tokenizer minus the vision-only <|image|>: a Llama-3 text tokenizer (128256 ids)."""
    from examples.llama3_tokenizer import write_text_tokenizer

    d = tmp_path_factory.mktemp("texttok")
    write_text_tokenizer(d)
    return d


def _host(model):
    return [
        np.asarray(p.get_value()) for p in ([model.embed] if model.lm_head is None else [model.embed, model.lm_head])
    ]


def _trained_mean(table, untrained):
    keep = np.ones(len(table), bool)
    keep[list(untrained)] = False
    return table[keep].astype(np.float64).mean(0), table.astype(np.float64).mean(0)


# ------------------------------------------------------------------------------------- expand
@pytest.mark.parametrize("tied", [False, True])
def test_expand_mean_on_mesh(gpt2_ckpt, gpt2_ckpt_tied, mesh24, tied):
    path, _ = gpt2_ckpt_tied if tied else gpt2_ckpt
    tok = jaxvocab.load_tokenizer(path)
    model = jaxvocab.load(path, mesh=mesh24, show_progress=False)
    before = _host(model)
    n = tok.n_words
    plan = plan_vocab(tok, ["<x>", "the", "<y>"], model=model)
    model2, tok2, plan2 = jaxvocab.expand_vocab(model, tok, plan)
    with pytest.raises(jaxvocab.JaxVocabError, match="consumed by expand_vocab"):
        model(np.zeros((1, 4), np.int32))  # donate=True (default): the old tables went into the new model
    model = model2
    assert model.config.vocab_size == plan.new_rows == 384
    assert plan2.init == "mean" and plan.init is None  # the applied plan is a new object
    assert (model.lm_head is None) == tied
    assert tok2.special_tokens["<x>"] == n and tok2.special_tokens["<y>"] == n + 1 and tok2.n_words == n + 2
    want_sharding = sharding_for((384, 64), TABLE_AXES, mesh24)
    for old, param in zip(before, [model.embed] if tied else [model.embed, model.lm_head], strict=True):
        new = param.get_value()
        assert new.shape == (384, 64) and new.sharding.spec == want_sharding.spec and new.sharding.spec[0] == "tensor"
        new = np.asarray(new)
        np.testing.assert_array_equal(new[:n], old)  # every old row, bit for bit
        mu, mu_all = _trained_mean(old, ZERO_ROWS)
        np.testing.assert_allclose(new[n:], np.broadcast_to(mu, (384 - n, 64)), rtol=0, atol=2e-7)
        assert np.abs(new[n] - mu_all).max() > 1e-5  # the zero rows were left out
    # zero rows are not fixed unless asked; the new rows are identical copies of the mean until trained
    assert jaxvocab.find_untrained(model, tok2) == [*ZERO_ROWS, n, n + 1]


@pytest.mark.parametrize("init", ["mean", "random"])
def test_expansion_is_mesh_independent(tmp_path_factory, mesh24, mesh1, init):
    """512 rows (313 tokens + spare padding rows): the vocab axis really is split 4 ways on mesh24."""
    path = tmp_path_factory.mktemp("padded")
    build_gpt2_style(str(path))
    make_hf_checkpoint(path, vocab=512, zero_rows=ZERO_ROWS, seed=1)
    tok = jaxvocab.load_tokenizer(path)
    out = {}
    for name, mesh in (("24", mesh24), ("1", mesh1)):
        model = jaxvocab.load(path, mesh=mesh, show_progress=False)
        assert model.embed.get_value().sharding.spec[0] == "tensor"
        plan = plan_vocab(tok, [f"<t{i}>" for i in range(200)], model=model, pad_to_multiple_of=128)
        assert plan.new_rows == 640 and plan.tokens[0].action == "spare_row"
        model, _, _ = jaxvocab.expand_vocab(model, tok, plan, init=init, fix_untrained=True)
        out[name] = _host(model)
    for a, b in zip(out["24"], out["1"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_reserved_slots_in_place_with_subword_and_fix(text_tok_dir, mesh24):
    tok = jaxvocab.load_tokenizer(text_tok_dir)
    v = tok.n_words
    rng = np.random.default_rng(3)
    embed, head = (rng.normal(0, 0.05, (v, 16)).astype(np.float32) for _ in range(2))
    dead = tok.free_reserved()[3:] + [tok.eot_id]
    embed[dead] = 0.0
    head[dead] = 0.0
    model = sharded_model(tiny_config(v, hidden=16, layers=1), mesh24, embed=embed, head=head)
    plan = plan_vocab(tok, {"<think>": None, "</think>": "end of thinking"}, model=model)
    assert plan.new_rows == v and sorted(plan.renamed) == tok.free_reserved()[:2]
    model, _, plan = jaxvocab.expand_vocab(model, tok, plan, init="subword", fix_untrained=True)
    e2, h2 = _host(model)
    assert e2.shape == embed.shape
    rows = dict(zip(sorted(plan.renamed), ("<think>", "end of thinking"), strict=True))
    fixed = plan.untrained_fixed
    assert fixed == sorted(dead)
    for table, new in ((embed, e2), (head, h2)):
        for i, text in rows.items():
            np.testing.assert_allclose(new[i], table[tok.encode(text)].mean(0), rtol=1e-6, atol=1e-7)
        # fixed rows use the subword rows of their own names, e.g. <|eot_id|> -> "<", "|", "eot", ...
        np.testing.assert_allclose(new[tok.eot_id], table[tok.encode("<|eot_id|>")].mean(0), rtol=1e-6, atol=1e-7)
        untouched = np.setdiff1d(np.arange(v), list(rows) + dead)
        np.testing.assert_array_equal(new[untouched], table[untouched])
    assert find_untrained(model, tok) == []


def test_plan_without_model_fits_the_models_rows(gpt2_ckpt, mesh24):
    """plan_vocab(tok, tokens) without model= assumes the tokenizer's rows; expand_vocab re-fits the
    plan to the rows the model has (fewer here: the last 3 tokenizer ids have none) instead of refusing."""
    path, _ = gpt2_ckpt
    tok = jaxvocab.load_tokenizer(path)
    n = tok.n_words
    model = sharded_model(tiny_config(n - 3), mesh24)
    plan = plan_vocab(tok, ["<x>"], pad_to_multiple_of=8)
    assert plan.old_rows == n  # what it had to assume
    with pytest.warns(UserWarning, match="beyond the model's"):
        model2, tok2, applied = jaxvocab.expand_vocab(model, tok, plan, donate=False)
    assert applied.old_rows == n - 3 and applied.unbacked_ids == [n - 3, n - 2, n - 1]
    assert applied.tokens[0].id == n and model2.config.vocab_size == applied.new_rows == 320
    np.testing.assert_array_equal(np.asarray(model2.embed.get_value())[: n - 3], np.asarray(model.embed.get_value()))


def test_fix_untrained(gpt2_ckpt, mesh24):
    path, _ = gpt2_ckpt
    tok = jaxvocab.load_tokenizer(path)
    model = jaxvocab.load(path, mesh=mesh24, show_progress=False)
    before = _host(model)
    ids = find_untrained(model, tok)
    assert ids == list(ZERO_ROWS)
    kept = fix_untrained(model, ids, tok=tok, donate=False)
    assert kept is not model
    for old, unchanged in zip(before, _host(model), strict=True):  # donate=False: the input stays intact
        np.testing.assert_array_equal(unchanged, old)
    model = fix_untrained(model, ids, tok=tok)
    for old, new in zip(before, _host(model), strict=True):
        mu, _ = _trained_mean(old, ids)
        np.testing.assert_allclose(new[ids], np.broadcast_to(mu, (3, 64)), rtol=0, atol=2e-7)
        keep = np.setdiff1d(np.arange(len(old)), ids)
        np.testing.assert_array_equal(new[keep], old[keep])
    assert find_untrained(model, tok) == ids  # three identical mean rows: still untrained
    model = fix_untrained(model, ids, "mean-noise", tok=tok)
    assert find_untrained(model, tok) == []  # distinct rows now
    with pytest.raises(jaxvocab.JaxVocabError, match="init"):
        fix_untrained(model, ids, "gaussian")
    with pytest.raises(jaxvocab.JaxVocabError, match="ids must lie"):
        fix_untrained(model, [10**6])


# --------------------------------------------------------------------------- init statistics
@pytest.fixture(scope="module")
def stats_table(mesh24):
    """512 x 16 rows with correlated dims; rows 0..9 untrained (zeros) and ignored by every statistic."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(512, 16)) @ rng.normal(size=(16, 16)) * 0.05 + 0.3).astype(np.float32)
    x[:10] = 0.0
    trained = np.ones(512, bool)
    trained[:10] = False
    table = jax.device_put(x, sharding_for(x.shape, TABLE_AXES, mesh24))
    return table, x, trained


def _rows(stats_table, mesh, method, k, subword=None, seed=0):
    table, _, trained = stats_table
    return np.asarray(
        init_rows(table, trained, jax.random.key(seed), subword or no_subword(k), method=method, k=k, mesh=mesh)
    )


def test_init_mean_zeros_random(stats_table, mesh24):
    _, x, trained = stats_table
    mu = x[trained].astype(np.float64).mean(0)
    np.testing.assert_allclose(_rows(stats_table, mesh24, "mean", 4)[0], mu, rtol=1e-6)
    assert np.abs(mu - x.astype(np.float64).mean(0)).max() > 1e-3
    assert not _rows(stats_table, mesh24, "zeros", 4).any()
    r = _rows(stats_table, mesh24, "random", 20000)
    assert abs(r.std() - RANDOM_STD) < 0.02 * RANDOM_STD and abs(r.mean()) < 2e-4


def test_init_mean_noise(stats_table, mesh24):
    _, x, trained = stats_table
    r = _rows(stats_table, mesh24, "mean-noise", 20000)
    mu, std = x[trained].astype(np.float64).mean(0), x[trained].astype(np.float64).std(0)
    np.testing.assert_allclose(r.std(0), NOISE_SCALE * std, rtol=0.03)
    np.testing.assert_allclose(r.mean(0), mu, atol=0.05 * NOISE_SCALE * std.max())


def test_init_covariance(stats_table, mesh24):
    _, x, trained = stats_table
    xt = x[trained].astype(np.float64)
    sigma = np.cov(xt, rowvar=False, bias=True)
    r = _rows(stats_table, mesh24, "covariance", 40000).astype(np.float64)
    got = np.cov(r, rowvar=False)
    assert np.linalg.norm(got - COV_SCALE * sigma) / np.linalg.norm(COV_SCALE * sigma) < 0.03
    np.testing.assert_allclose(
        r.mean(0), xt.mean(0), atol=3 * np.sqrt(COV_SCALE * sigma.diagonal().max() / 40000) + 1e-6
    )
    other = _rows(stats_table, mesh24, "covariance", 40000, seed=1)
    assert not np.allclose(other, r)


def test_init_subword(text_tok_dir, mesh24, tmp_path):
    tok = jaxvocab.load_tokenizer(text_tok_dir)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, (tok.n_words, 16)).astype(np.float32)
    trained = np.ones(tok.n_words, bool)
    hello = tok.encode("hello world")
    trained[hello[1]] = False  # an untrained piece is left out of its token's average
    texts = ["<think>", None, "hello world"]
    sub = subword_arrays(tok, texts, trained, "subword")
    table = jax.device_put(x, sharding_for(x.shape, TABLE_AXES, mesh24))
    rows = np.asarray(init_rows(table, trained, jax.random.key(0), sub, method="subword", k=3, mesh=mesh24))
    np.testing.assert_allclose(rows[0], x[tok.encode("<think>")].mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rows[1], x[trained].astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rows[2], x[[hello[0]] + hello[2:]].mean(0), rtol=1e-5, atol=1e-7)
    build_gpt2_style(str(tmp_path))
    gpt2 = jaxvocab.load_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="fall back to the mean"):
        sub = subword_arrays(gpt2, ["<think>"], trained, "subword")
    assert not sub[2].any()


# ------------------------------------------------------------------------------------ export
def test_export_reloads_in_transformers(gpt2_ckpt, mesh24, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path, ref = gpt2_ckpt
    tok = jaxvocab.load_tokenizer(path)
    n = tok.n_words
    model = jaxvocab.load(path, mesh=mesh24, show_progress=False)
    plan = plan_vocab(tok, ["<x>", "<|ctl|>", "hello"], special={"<|ctl|>"}, model=model)
    model, new_tok, plan = jaxvocab.expand_vocab(model, tok, plan)
    out = jaxvocab.save_hf(model, tmp_path / "hf", tokenizer=new_tok, plan=plan, show_progress=False)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.convert_tokens_to_ids(["<x>", "<|ctl|>", "hello"]) == [n, n + 1, plan.tokens[2].id]
    assert len(hf_tok) == n + 2 <= model.config.vocab_size
    assert n in hf_tok.encode("a <x> b", add_special_tokens=False)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"][str(n)]["special"] is False
    assert cfg["added_tokens_decoder"][str(n + 1)]["special"] is True
    # the 69 padding rows jaxvocab added for the mesh are dropped: 313 + 2 tokens = 315 rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n + 2 < model.config.vocab_size == 384
    assert VocabPlan.from_json((out / "vocab_plan.json").read_text()) == plan == jaxvocab.load_plan(out)
    hf = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    np.testing.assert_array_equal(
        hf.model.embed_tokens.weight.detach().numpy(), np.asarray(model.embed.get_value())[: n + 2]
    )
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.asarray(model.lm_head.get_value())[: n + 2])
    ids = random_ids(n, batch=1, length=520)
    got = torch_logits(hf, ids)
    np.testing.assert_allclose(got[..., :n], torch_logits(ref, ids), rtol=0, atol=1e-5)  # old tokens: same logits
    np.testing.assert_allclose(got, np.asarray(model(ids))[..., : n + 2], rtol=0, atol=1e-4)  # test_parity's tolerance
    kept = jaxvocab.save_hf(model, tmp_path / "hf-pad", plan=plan, show_progress=False, keep_padding=True)
    assert json.loads((kept / "config.json").read_text())["vocab_size"] == 384


def test_export_real_tokenizer_reserved_and_appended(text_tok_dir, mesh24, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = tmp_path / "src"
    make_hf_checkpoint(src, vocab=128256, hidden=32, intermediate=64, layers=1)
    for f in text_tok_dir.iterdir():
        shutil.copy(f, src / f.name)
    tok = jaxvocab.load_tokenizer(src)
    model = jaxvocab.load(src, mesh=mesh24, show_progress=False)
    new = [f"<|lang_{i}|>" for i in range(250)]
    plan = plan_vocab(tok, new, special=set(new[::2]), model=model)
    assert len(plan.renamed) == 247 and len(plan.appended) == 3 and plan.new_rows == 128384
    model, tok, plan = jaxvocab.expand_vocab(model, tok, plan)
    out = jaxvocab.save_hf(model, tmp_path / "hf", tokenizer=tok, plan=plan, show_progress=False)
    assert not (out / "tokenizer.model").exists()  # tiktoken file: under original/, as in Meta's HF repos
    assert (out / "original" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    planned = {**plan.renamed, **plan.appended}
    assert hf_tok.convert_tokens_to_ids(list(planned.values())) == list(planned)
    assert "<|reserved_special_token_0|>" not in hf_tok.get_vocab()
    assert len(hf_tok) == 128259 <= 128384
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert {i for i in planned if cfg["added_tokens_decoder"][str(i)]["special"]} == plan.special_ids
    assert plan.renamed[128003] == new[1] and 128003 not in plan.special_ids  # plain: matched in text
    assert 128003 in hf_tok.encode(f"x {new[1]} y", add_special_tokens=False)
    reloaded = jaxvocab.load_tokenizer(out)
    assert all(reloaded.special_tokens[t] == i for i, t in planned.items())
    hf = LlamaForCausalLM.from_pretrained(str(out))
    assert hf.config.vocab_size == 128259  # padding jaxvocab added is dropped
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), np.asarray(model.lm_head.get_value())[:128259])


# --------------------------------------------------------------------------------------- CLI
def test_cli_import_add_tokens_then_export(gpt2_ckpt, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from convert import vocab_cli

    monkeypatch.setattr(vocab_cli, "PLAN_ROWS_SHOWN", 2)  # the plan's table stops after 2 rows

    path, _ = gpt2_ckpt
    n = jaxvocab.load_tokenizer(path).n_words
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("<tool>=a tool call\n\n<think>\nhello\n")
    ck = tmp_path / "ck"
    rc = convert_main(
        [
            "import",
            str(path),
            str(ck),
            "--add-tokens",
            f"@{tokens}",
            "--fix-untrained",
            "--special-tokens",
            "--mesh",
            "fsdp=2,tensor=4",
        ]
    )
    assert rc == 0
    shown = capsys.readouterr().out
    assert "<tool>" in shown and "appended" in shown and "rows 313 -> 384" in shown
    assert "... 1 more token(s), every one listed in vocab_plan.json" in shown and "hello" not in shown
    plan = VocabPlan.from_json((ck / "vocab_plan.json").read_text())
    assert plan.appended == {n: "<tool>", n + 1: "<think>"} and plan.special_ids == {n, n + 1}
    assert plan.untrained_fixed == list(ZERO_ROWS) and plan.tokens[0].description == "a tool call"
    assert convert_main(["export", str(ck), str(tmp_path / "hf")]) == 0
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.convert_tokens_to_ids(["<tool>", "<think>"]) == [n, n + 1]


def test_cli_vocab_flag_errors(gpt2_ckpt, tmp_path, capsys):
    path, _ = gpt2_ckpt
    assert convert_main(["import", str(path), str(tmp_path / "a"), "--init", "random"]) == 2
    assert "--init needs --add-tokens" in capsys.readouterr().err
    assert convert_main(["import", str(path), str(tmp_path / "b"), "--add-tokens", "@missing.txt"]) == 2
    assert convert_main(["import", str(path), str(tmp_path / "c"), "--add-tokens", "<a>,,<b>"]) == 2
    assert convert_main(["import", str(path), str(tmp_path / "d"), "--add-tokens", "<a>,<a>"]) == 2
    assert convert_main(["import", str(path), str(tmp_path / "e"), "--add-tokens", " \t"]) == 2
    assert (
        convert_main(["import", str(path), str(tmp_path / "f"), "--add-tokens", "<a>", "--pad-to-multiple-of", "0"])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("error: ") == 5
    assert not any((tmp_path / d).exists() for d in "abcdef")


@pytest.mark.parametrize("init", ["mean", "subword"])
def test_expand_loaded_equals_load_then_expand(text_tok_dir, tmp_path, mesh24, init):
    """`load(vocab_rows=plan.new_rows)` + expand_loaded (what `import --add-tokens` runs) gives the
    tables, plan and tokenizer of load + expand_vocab, bit for bit: reserved slots reused, rows
    appended and padded on a sharded mesh, untrained rows fixed."""
    for f in text_tok_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tok = jaxvocab.load_tokenizer(tmp_path)
    dead = tok.free_reserved()[5:] + [tok.eot_id]
    make_hf_checkpoint(tmp_path, vocab=tok.n_words, hidden=16, intermediate=32, layers=1, zero_rows=dead)
    new = {"<think>": None, "</think>": "end of thinking", **{f"<|t{i}|>": None for i in range(8)}}
    grown = jaxvocab.load(tmp_path, mesh=mesh24, show_progress=False)
    plan = plan_vocab(tok, new, model=grown, reuse_reserved="special")
    assert plan.appended and plan.renamed and plan.padding_ids  # all three kinds of rows
    grown, tok_a, plan_a = jaxvocab.expand_vocab(grown, tok, plan, init=init, fix_untrained=True)
    loaded = jaxvocab.load(tmp_path, mesh=mesh24, show_progress=False, vocab_rows=plan.new_rows)
    assert loaded.config.vocab_size == plan.new_rows
    assert not np.asarray(loaded.embed.get_value())[plan.old_rows :].any()  # rows past the checkpoint: zero
    loaded, tok_b, plan_b = expand_loaded(loaded, tok, plan, init=init, fix_untrained=True)
    assert plan_b == plan_a and tok_b.special_tokens == tok_a.special_tokens
    for a, b, p in zip(_host(grown), _host(loaded), (loaded.embed, loaded.lm_head), strict=True):
        np.testing.assert_array_equal(a, b)
        assert p.get_value().sharding.spec == sharding_for(a.shape, TABLE_AXES, mesh24).spec
    # load_expanded (the CLI's path): the rows are written into the loader's host buffers
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    filled, tok_c, plan_c = load_expanded(tmp_path, tok, plan, init=init, fix_untrained=True, mesh=mesh24)
    assert plan_c == plan_a and tok_c.special_tokens == tok_a.special_tokens
    for a, b, p in zip(_host(grown), _host(filled), (filled.embed, filled.lm_head), strict=True):
        np.testing.assert_array_equal(a, b)
        assert p.get_value().sharding.spec == sharding_for(a.shape, TABLE_AXES, mesh24).spec
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # the source is never written


@pytest.mark.parametrize("init", ["mean", "mean-noise", "covariance", "subword", "random"])
def test_load_expanded_one_device(text_tok_dir, tmp_path, mesh1, init):
    """On one device (the CLI's default on CPU) the statistics run on a zero-copy view of the
    checkpoint's rows; the result is still load + expand_vocab's, bit for bit, tied and untied.
    Covariance is the one exception: its sampled rows (a Cholesky factor times noise) are compiled in
    a program of their own here and inside the table update there, and agree to f32 rounding."""
    for f in text_tok_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tok = jaxvocab.load_tokenizer(tmp_path)
    dead = tok.free_reserved()[3:] + [tok.eot_id]
    new = {"<think>": None, **{f"<|t{i}|>": None for i in range(6)}}
    for tie in (False, True):
        make_hf_checkpoint(tmp_path, vocab=tok.n_words, hidden=16, intermediate=32, layers=1, zero_rows=dead, tied=tie)
        model = jaxvocab.load(tmp_path, mesh=mesh1, show_progress=False)
        plan = plan_vocab(tok, new, model=model, pad_to_multiple_of=64, reuse_reserved="none")
        assert plan.appended and plan.new_rows > plan.old_rows
        model, tok_a, plan_a = jaxvocab.expand_vocab(model, tok, plan, init=init, fix_untrained=True)
        with pytest.raises(jaxvocab.JaxVocabError, match="re-plan with this tokenizer"):
            load_expanded(tmp_path, tok_a, plan, mesh=mesh1)  # a plan made for another tokenizer
        filled, _, plan_b = load_expanded(tmp_path, tok, plan, init=init, fix_untrained=True, mesh=mesh1)
        assert plan_a == plan_b and (filled.lm_head is None) == tie
        for a, b in zip(_host(model), _host(filled), strict=True):
            if init == "covariance":
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
                same = np.ones(len(a), bool)
                same[plan_a.reinit_ids] = False
                np.testing.assert_array_equal(a[same], b[same])  # every other row: bit for bit
            else:
                np.testing.assert_array_equal(a, b)


def test_load_expanded_reserved_slots_only(text_tok_dir, tmp_path, mesh24):
    """No growth (the new tokens fit the free reserved slots): the tables keep the checkpoint's rows,
    the loader's buffers are the readers' own copies, and the result equals load + expand_vocab."""
    for f in text_tok_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tok = jaxvocab.load_tokenizer(tmp_path)
    make_hf_checkpoint(tmp_path, vocab=tok.n_words, hidden=16, intermediate=32, layers=1, zero_rows=tok.free_reserved())
    model = jaxvocab.load(tmp_path, mesh=mesh24, show_progress=False)
    plan = plan_vocab(tok, ["<|a|>", "<|b|>"], model=model)
    assert plan.new_rows == plan.old_rows and len(plan.renamed) == 2
    model, _, plan_a = jaxvocab.expand_vocab(model, tok, plan)
    filled, _, plan_b = load_expanded(tmp_path, tok, plan, mesh=mesh24)
    assert plan_a == plan_b
    for a, b in zip(_host(model), _host(filled), strict=True):
        np.testing.assert_array_equal(a, b)
    assert jaxvocab.load(tmp_path, show_progress=False).embed.get_value()[plan.tokens[0].id].sum() == 0


def test_load_expanded_dispatches_statistics_off_the_loading_thread(text_tok_dir, tmp_path, mesh1, monkeypatch):
    """Tracing and compiling each table's statistics happen on a worker thread while the loader
    reads on, the head's (the longest: they fingerprint its rows) first; the worker is gone once
    load_expanded returns."""
    import threading

    from jaxvocab import vocab_load

    for f in text_tok_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tok = jaxvocab.load_tokenizer(tmp_path)
    make_hf_checkpoint(tmp_path, vocab=tok.n_words, hidden=16, intermediate=32, layers=1, zero_rows=tok.free_reserved())
    threads, tables, start = [], [], vocab_load.start_model_stats

    def recording(model, params, *args, **kwargs):
        threads.append(threading.current_thread())
        tables.append({id(model.lm_head): "head", id(model.embed): "embed"}[id(params[0])])
        return start(model, params, *args, **kwargs)

    monkeypatch.setattr(vocab_load, "start_model_stats", recording)
    plan = plan_vocab(tok, ["<|a|>"], model=jaxvocab.load(tmp_path, mesh=mesh1, show_progress=False))
    load_expanded(tmp_path, tok, plan, mesh=mesh1)
    assert tables == ["head", "embed"]
    assert len(threads) == 2 and all(t is not threading.main_thread() for t in threads)
    assert all(t.name.startswith("jaxvocab-stats") and not t.is_alive() for t in threads)
