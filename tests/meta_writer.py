"""Meta-layout checkpoints (params.json + consolidated.NN.pth) written from tiny transformers models.

Written independently of jaxvocab's reader (own name list, torch ops only), and checked against
`meta_reference_logits`, a port of Meta's reference forward pass (complex-number rotary on
interleaved pairs, llama-models' apply_scaling), so a reader bug cannot hide behind a writer bug.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from tests.builders import randomize

COLUMN = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")  # split on dim 0
ROW = ("attention.wo", "feed_forward.w2")  # split on dim 1


def meta_ffn(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size (llama-models model.py), written out for the oracle."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def make_hf_model(
    path,
    *,
    vocab=384,
    dim=128,
    layers=2,
    heads=8,
    kv_heads=2,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    tied=False,
    factor=None,
    theta=500000.0,
    seed=0,
    std=0.2,
):
    """A random LlamaForCausalLM saved by transformers, with Meta's rope (original context 8192)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    scaling = None
    if factor is not None:
        scaling = {
            "rope_type": "llama3",
            "factor": float(factor),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": theta,
        }
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=meta_ffn(dim, multiple_of, ffn_dim_multiplier),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=dim // heads,
        tie_word_embeddings=tied,
        rope_scaling=scaling,
        rope_theta=theta,
        max_position_embeddings=131072 if factor else 8192,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = randomize(LlamaForCausalLM(cfg).eval(), std)
    model.save_pretrained(Path(path))
    return Path(path), model


def meta_tensors(model, dtype=None) -> dict:
    """HF state dict -> merged Meta tensors (q/k rows back to Meta's interleaved rotary layout)."""
    import torch

    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    hd = c.hidden_size // c.num_attention_heads

    def interleave(w, n):  # inverse of convert_llama_weights_to_hf.permute
        return w.view(n, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(w.shape).contiguous()

    embed = sd["model.embed_tokens.weight"]
    out = {
        "tok_embeddings.weight": embed,
        "norm.weight": sd["model.norm.weight"],
        "output.weight": embed.clone() if c.tie_word_embeddings else sd["lm_head.weight"],
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                f"layers.{i}.attention.wq.weight": interleave(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
                f"layers.{i}.attention.wk.weight": interleave(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
                f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
                f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
                f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
                f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
                f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
                f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
                f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            }
        )
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    return out


def split_mp(tensors: dict, mp: int, n_kv_heads: int, head_dim: int, embed_dim: int = 0) -> list[dict]:
    """Meta's model-parallel split; with mp > n_kv_heads each kv head goes to mp/n_kv consecutive ranks
    (what llama-models' reshard_mp does for 405B on 16 ranks)."""
    shards = [{} for _ in range(mp)]
    for name, w in tensors.items():
        kind = name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("layers.") else name.split(".")[0]
        if kind in ("attention.wk", "attention.wv") and mp > n_kv_heads:
            assert mp % n_kv_heads == 0
            heads = w.view(n_kv_heads, head_dim, -1)
            pieces = [heads[s // (mp // n_kv_heads)] for s in range(mp)]
        elif kind in COLUMN or kind == "output":
            pieces = w.chunk(mp, 0)
        elif kind == "tok_embeddings":
            pieces = w.chunk(mp, embed_dim)
        elif kind in ROW:
            pieces = w.chunk(mp, 1)
        else:  # norms: replicated
            pieces = [w] * mp
        for s in range(mp):
            shards[s][name] = pieces[s].clone().contiguous()
    return shards


def write_meta(
    model,
    out,
    *,
    mp=1,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    use_scaled_rope=None,
    legacy_vocab=False,
    embed_dim=0,
    dtype=None,
    tokenizer=None,
    params_extra=None,
) -> Path:
    """Write `model` (transformers) as a Meta checkpoint dir with `mp` model-parallel shards."""
    import torch

    c = model.config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hd = c.hidden_size // c.num_attention_heads
    assert meta_ffn(c.hidden_size, multiple_of, ffn_dim_multiplier) == c.intermediate_size
    for s, shard in enumerate(split_mp(meta_tensors(model, dtype), mp, c.num_key_value_heads, hd, embed_dim)):
        torch.save(shard, out / f"consolidated.{s:02d}.pth")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    scaled = rope.get("rope_type") == "llama3" if use_scaled_rope is None else use_scaled_rope
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    params = {
        "dim": c.hidden_size,
        "n_layers": c.num_hidden_layers,
        "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads,
        "vocab_size": -1 if legacy_vocab else c.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": theta,
        "use_scaled_rope": scaled,
        **(params_extra or {}),
    }
    if ffn_dim_multiplier is None:
        params.pop("ffn_dim_multiplier")
    (out / "params.json").write_text(json.dumps(params, indent=2))
    if tokenizer is not None:
        shutil.copy(tokenizer, out / "tokenizer.model")
    return out


# ----------------------------------------------------------------------------- Meta's forward pass
def _apply_scaling(freqs, scale_factor):
    """llama-models' apply_scaling, loop and all."""
    import torch

    low_freq_factor, high_freq_factor, old_context_len = 1, 4, 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def meta_reference_logits(path, ids: np.ndarray, scale_factor: float = 8.0) -> np.ndarray:
    """Logits of a Meta dir computed the way Meta's reference model.py does (f32, torch)."""
    import torch

    path = Path(path)
    p = json.loads((path / "params.json").read_text())
    shards = [torch.load(f, weights_only=True) for f in sorted(path.glob("consolidated.*.pth"))]
    mp, H, D = len(shards), p["n_heads"], p["dim"]
    KV, hd = p.get("n_kv_heads") or H, D // H

    def merged(name):
        kind = name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("layers.") else name.split(".")[0]
        parts = [s[name].float() for s in shards]
        if kind in ("attention.wk", "attention.wv") and mp > KV:
            parts = parts[:: mp // KV]
        if kind in COLUMN or kind in ("output", "tok_embeddings"):
            return torch.cat(parts, 0)
        return torch.cat(parts, 1) if kind in ROW else parts[0]

    def norm(x, w):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + p["norm_eps"])) * w

    freqs = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if p.get("use_scaled_rope"):
        freqs = _apply_scaling(freqs, scale_factor)
    B, T = ids.shape
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs).float())

    def rotary(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    with torch.no_grad():
        h = merged("tok_embeddings.weight")[torch.tensor(ids, dtype=torch.long)]
        for i in range(p["n_layers"]):
            w = lambda n, i=i: merged(f"layers.{i}.{n}.weight")  # noqa: E731
            x = norm(h, w("attention_norm"))
            q = rotary((x @ w("attention.wq").T).view(B, T, H, hd))
            k = rotary((x @ w("attention.wk").T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
            v = (x @ w("attention.wv").T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
            scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + mask
            attn = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v).reshape(B, T, H * hd)
            h = h + attn @ w("attention.wo").T
            x = norm(h, w("ffn_norm"))
            gate = torch.nn.functional.silu(x @ w("feed_forward.w1").T)
            h = h + (gate * (x @ w("feed_forward.w3").T)) @ w("feed_forward.w2").T
        h = norm(h, merged("norm.weight"))
        return (h @ merged("output.weight").T).numpy()
