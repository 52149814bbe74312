"""What both sides of bench/gpu.sh share, without importing jax or torch: the model shapes, the
model-FLOP count of one rows step, and the devices' dense bf16 peaks.

Model FLOPs per step (what the step needs: forward plus the activation backward, no weight
gradients, no remat recompute; causal attention counted over the visible half):
    per token and layer   F_lin = 2 (D q + 2 D kv + q D + 3 D F),  q = H hd, kv = KV hd
                          F_att = 2 * 2 * H hd (T + 1) / 2           (QK^T and PV)
    forward               L (F_lin + F_att) + 2 D V                  (the head)
    activation backward   L (F_lin + 2 F_att) + 2 D V               (dX of each matmul; dQ, dK, dV, dP)
    step                  B T (forward + activation backward)
MFU = step FLOPs / step time / peak dense bf16 FLOP/s of the device (PEAK_TFLOPS overrides).
"""

from __future__ import annotations

import os

SHAPES = {
    "1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
    },
    "8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
    },
}
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "gh200": 989.0,
    "a100": 312.0,
    "l40s": 362.0,
    "l4": 121.0,
    "a10": 125.0,
    "rtx 4090": 165.0,
}


def step_flops(c, B: int, T: int) -> float:
    """Model FLOPs of one rows step (the formula above); `c` is any config with Llama's field names."""
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    lin = 2 * (D * q + 2 * D * kv + q * D + 3 * D * F)
    att = 2 * 2 * q * (T + 1) / 2
    forward = L * (lin + att) + 2 * D * V
    backward = L * (lin + 2 * att) + 2 * D * V
    return B * T * (forward + backward)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of the named device in FLOP/s (PEAK_TFLOPS overrides), None when unknown."""
    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    kind = device_kind.lower()
    hits = [v for k, v in PEAK_TFLOPS.items() if k in kind]
    return max(hits) * 1e12 if hits else None


def rates(c, B: int, T: int, step_s: float, device_kind: str) -> dict:
    """One step's figures as gpu.sh tabulates them: step time, tokens/s, model TFLOP/s and MFU (None
    when the device's peak is unknown)."""
    flops = step_flops(c, B, T)
    peak = peak_flops(device_kind)
    return {
        "step_s": round(step_s, 4),
        "tokens_per_s": round(B * T / step_s),
        "tflops_per_s": round(flops / step_s / 1e12, 1),
        "mfu": round(flops / step_s / peak, 3) if peak else None,
    }
