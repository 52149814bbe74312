"""LoRA beside the rows: parity with PEFT (loss, grads, 3 AdamW steps), merges, sharding, frozen weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxvocab
from jaxvocab import lora
from jaxvocab import rows as row_split
from jaxvocab.low_rank import low_rank
from jaxvocab.sharding import parse_mesh
from tests.builders import bigram_ids, make_hf_checkpoint
from train import loop
from train.data import Batch

IDS = [5, 9, 77, 200]
RANK, ALPHA = 4, 8.0
HF = {
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


def _host(a):
    return np.asarray(jax.device_get(a))


def _batch(seed=0, B=2, T=520):
    ids = np.random.RandomState(seed).randint(0, 256, (B, T + 1)).astype(np.int32)
    ids[:, 1::4] = np.random.RandomState(seed + 1).choice(IDS, ids[:, 1::4].shape)  # the rows matter
    ones = np.ones((B, T), np.float32)
    return Batch(ids[None, :, :-1], ones[None].astype(np.int32), ids[None, :, 1:], ones[None])


def _peft(torch_model, rm, tied):
    """PEFT model over the same base, adapters copied from jaxvocab's (B made non-zero on both sides)."""
    import peft
    import torch

    tokens = IDS if tied else {"embed_tokens": IDS, "lm_head": IDS}
    cfg = peft.LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=[HF[t].split(".")[1] for t in lora.TARGETS.values()],
        lora_dropout=0.0,
        trainable_token_indices=tokens,
    )
    pm = peft.get_peft_model(torch_model, cfg)
    named = dict(pm.named_parameters())
    with torch.no_grad():
        for t in lora.TARGETS.values():
            a, b = _host(rm.lora[lora.a_key(t)][...]), _host(rm.lora[lora.b_key(t)][...])
            for i in range(a.shape[0]):
                pre = f"base_model.model.model.layers.{i}.{HF[t]}"
                named[f"{pre}.lora_A.default.weight"].copy_(torch.tensor(a[i]))
                named[f"{pre}.lora_B.default.weight"].copy_(torch.tensor(b[i]))
    return pm


def _setup(tmp_path, tied):
    path, tm = make_hf_checkpoint(tmp_path / "hf", tied=tied, seed=11, max_pos=1024)
    model = jaxvocab.load(path, mesh=parse_mesh("fsdp=2,tensor=4"), show_progress=False)
    rm = row_split.split(model, IDS, "both", lora.LoraSpec(RANK, ALPHA))
    rs = np.random.RandomState(3)
    for t in lora.TARGETS.values():  # non-zero B, so A has a gradient and the deltas change the logits
        b = rm.lora[lora.b_key(t)]
        b.set_value(jax.device_put(jnp.asarray(0.05 * rs.standard_normal(b.shape), jnp.float32), b[...].sharding))
    return model, rm, tm


def _torch_grads(pm, batch, tied):
    import torch

    out = pm(torch.tensor(batch.inputs[0], dtype=torch.long)).logits.float()
    nll = torch.nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), torch.tensor(batch.targets[0], dtype=torch.long).reshape(-1)
    )
    pm.zero_grad()
    nll.backward()
    return float(nll.detach())


def _peft_tensors(pm, tied, grad):
    """PEFT's trainable tensors, in jaxvocab's param-dict layout (adapters stacked over layers)."""
    named = dict(pm.named_parameters())
    get = (lambda n: named[n].grad.numpy()) if grad else (lambda n: named[n].detach().numpy())
    layers = pm.base_model.model.config.num_hidden_layers
    out = {"lora": {}}
    for t in lora.TARGETS.values():
        for key, ab in ((lora.a_key(t), "A"), (lora.b_key(t), "B")):
            out["lora"][key] = np.stack(
                [get(f"base_model.model.model.layers.{i}.{HF[t]}.lora_{ab}.default.weight") for i in range(layers)]
            )
    out["embed_rows"] = get("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default")
    if not tied:
        out["head_rows"] = get("base_model.model.lm_head.token_adapter.trainable_tokens_delta.default")
    return out


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_parity_with_peft(tmp_path, tied):
    """Same base, same adapters, same 520-token batch: loss, grads and 3 AdamW steps agree with PEFT."""
    import torch

    _, rm, tm = _setup(tmp_path, tied)
    pm = _peft(tm, rm, tied)
    batch = _batch()
    cfg = loop.TrainConfig(
        steps=3,
        lr=1e-3,
        lora_lr=2e-3,
        schedule="constant",
        clip=0.0,
        weight_decay=0.0,
        remat=False,
        batch_size=2,
        seq_len=520,
    )
    trainer = loop.Trainer(rm, cfg, parse_mesh("fsdp=2,tensor=4"))
    s, n, g = jax.jit(loop.batch_grads, static_argnums=0)(
        trainer.graphdef, trainer.params, trainer.frozen, trainer.put(batch)
    )
    t_loss = _torch_grads(pm, batch, tied)
    assert abs(float(s / n) - t_loss) / t_loss < 1e-5
    tg = _peft_tensors(pm, tied, grad=True)
    jg = jax.tree.map(lambda a: _host(a) / float(n), g)
    worst = max(jax.tree.leaves(jax.tree.map(_rel, jg, tg)))
    print(f"parity tied={tied}: loss {float(s / n):.6f} vs {t_loss:.6f}; max grad rel err {worst:.2e}")
    assert worst < 1e-5

    groups = [
        {"params": [p for k, p in pm.named_parameters() if "lora_" in k], "lr": 2e-3},
        {"params": [p for k, p in pm.named_parameters() if "trainable_tokens_delta" in k], "lr": 1e-3},
    ]
    opt = torch.optim.AdamW(groups, eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        trainer.step(batch)
        _torch_grads(pm, batch, tied)
        opt.step()
    jp, tp = jax.tree.map(_host, trainer.params), _peft_tensors(pm, tied, grad=False)
    close = jax.tree.map(lambda a, b: np.isclose(a, b, rtol=1e-5, atol=1e-5), jp, tp)
    frac = sum(int(c.sum()) for c in jax.tree.leaves(close)) / sum(c.size for c in jax.tree.leaves(close))
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), jp, tp)))
    print(f"after 3 AdamW steps: {100 * frac:.3f}% of elements within 1e-5, max abs diff {diff:.2e}")
    assert frac >= 0.999
    # adapters stay sharded by their weight's logical axes (A [L, r, in]: in = embed -> fsdp; B [L, out, r]:
    # q_heads -> tensor), and the frozen weights are the very arrays we started from
    assert trainer.params["lora"][lora.a_key("wq")].sharding.spec == P(None, None, "fsdp")
    assert trainer.params["lora"][lora.b_key("wq")].sharding.spec == P(None, "tensor", None)
    after = trainer.model()
    for name, w in rm.layers.items():
        assert np.array_equal(_host(after.layers[name][...]), _host(w[...]))


def _logits_t(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_merged_and_peft_exports_match_the_trained_model(tmp_path, tied):
    """bf16 checkpoint of a trained base, trained-looking adapters and rows: the f32 merge (transformers)
    and PEFT on the plain base both give jaxvocab's logits within 1e-4; the bf16 merge keeps every top-1
    with KL <= 1e-3 at every position. The base learns a bigram language first: a random model's logits
    are near-ties everywhere, which no 16-bit storage can keep in order."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    from jaxvocab.io.peft import save_peft

    path, _ = make_hf_checkpoint(
        tmp_path / "hf", tied=tied, seed=12, max_pos=1024, dtype="bfloat16", std=0.02, bigram_steps=200
    )
    model = jaxvocab.load(path, mesh=parse_mesh("fsdp=2,tensor=4"), show_progress=False, compute_dtype="float32")
    rm = row_split.split(model, IDS, "both", lora.LoraSpec(RANK, ALPHA, dropout=0.1))
    rs = np.random.RandomState(4)
    trained = [v for v in jax.tree.leaves(rm.lora, is_leaf=lambda x: hasattr(x, "set_value"))]
    trained += [v for v in (rm.embed_rows, rm.head_rows) if v is not None]
    for v in trained:
        noise = jnp.asarray(0.01 * rs.standard_normal(v.shape), jnp.float32)
        v.set_value(jax.device_put(v[...] + noise, v[...].sharding))
    ids = bigram_ids(256, batch=2, length=520, seed=99).astype(np.int32)
    want = _host(rm(jnp.asarray(ids)))
    jaxvocab.save_hf(row_split.merge(rm, "float32"), tmp_path / "f32")
    jaxvocab.save_hf(row_split.merge(rm), tmp_path / "bf16")
    jaxvocab.save_hf(model, tmp_path / "base")
    save_peft(rm, tmp_path / "adapter")
    f32 = _logits_t(LlamaForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.float32), ids)
    err = float(np.max(np.abs(f32 - want)))
    bf16 = _logits_t(LlamaForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32), ids)
    agree = bf16.argmax(-1) == f32.argmax(-1)
    top2 = np.sort(f32, -1)[..., -2:]
    p = _log_softmax(f32.astype(np.float64))
    kl = np.sum(np.exp(p) * (p - _log_softmax(bf16.astype(np.float64))), -1)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    effect = float(np.max(np.abs(_logits_t(base, ids) - f32)))  # what the adapters and rows change
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    peft_err = float(np.max(np.abs(_logits_t(pm, ids) - f32)))
    print(
        f"tied={tied}: f32 merge vs jaxvocab {err:.2e}; PEFT vs f32 merge {peft_err:.2e}; bf16 merge: top-1 "
        f"{100 * agree.mean():.1f}% (smallest f32 top-2 margin {np.min(top2[..., 1] - top2[..., 0]):.2f}), "
        f"KL max {kl.max():.2e}, max |logit diff| {np.max(np.abs(bf16 - f32)):.2e} (adapters+rows move {effect:.2f})"
    )
    assert err < 1e-4 and peft_err < 1e-4
    assert agree.all() and kl.max() <= 1e-3
    assert np.max(np.abs(bf16 - f32)) < 0.2 * effect  # the bf16 merge kept the adapters' effect
    frozen = jaxvocab.load(tmp_path / "bf16", show_progress=False)
    for name in ("attn_norm", "mlp_norm"):  # weights without adapters: bit-identical
        assert np.array_equal(_host(frozen.layers.weights()[name]), _host(model.layers.weights()[name]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_low_rank_custom_backward_equals_autodiff(dtype):
    """low_rank's hand-written backward (r^T dy, dr^T x) gives autodiff's value and gradients."""
    rs = np.random.RandomState(0)
    x, a, b, dy = (jnp.asarray(rs.randn(*s), dtype) for s in ((2, 33, 24), (4, 24), (40, 4), (2, 33, 40)))

    def plain(x, a, b):
        return jnp.einsum("btr,or->bto", jnp.einsum("bti,ri->btr", x, a), b)

    y0, vjp0 = jax.vjp(plain, x, a, b)
    y1, vjp1 = jax.vjp(low_rank, x, a, b)
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_array_equal(np.asarray(y0, np.float32), np.asarray(y1, np.float32))
    for g0, g1, primal in zip(vjp0(dy), vjp1(dy), (x, a, b), strict=True):
        assert g1.shape == primal.shape and g1.dtype == primal.dtype
        scale = float(jnp.max(jnp.abs(g0.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g1, np.float32), np.asarray(g0, np.float32), atol=tol * scale)
