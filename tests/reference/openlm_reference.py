"""An independent fp32 implementation of the DCLM/OpenLM decoder forward pass: the parity oracle.

Written from the architecture description alone (REFERENCE.md section 3), in plain torch, so it
shares no code with the megatron-core model it checks. It reads a state dict with the OpenLM key
names (``tok_embeddings.weight``, ``layers.N.attention.in_proj.weight``, ...; ``module.``,
``_orig_mod.`` and ``model.`` prefixes are stripped) and computes logits for a batch of token ids:

    x = tok_embeddings[tokens]
    per layer:
        h = LN(x; attention_norm)
        q, k, v = split(h @ in_proj^T)            rows [Q; K; V], head h at rows h*hd:(h+1)*hd
        q, k = LN(q; q_norm), LN(k; k_norm)       over the full width d, before the head split
        q, k = rope(q), rope(k)                   NeoX rotate-half over the head dim, base 10000
        x = x + causal_attention(q, k, v) @ out_proj^T
        h = LN(x; ffn_norm)
        gate, up = split(h @ w12^T)               gate is the first half
        x = x + (silu(gate) * up) @ w3^T
    logits = LN(x; norm) @ output^T

LN is a gain-only LayerNorm (no bias), eps 1e-5, biased variance. Every step runs in the
requested dtype (fp32 by default), rotary tables included.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

PREFIXES = ("module.", "_orig_mod.", "model.")


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the wrapper prefixes that training wrappers and HF layouts add."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def gain_layer_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * gain over the last dimension, var with 1/n."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gain


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] with x1, x2 the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary_tables(seq_len: int, head_dim: int, base: float, dtype: torch.dtype):
    """cos and sin tables [seq, head_dim]: angle(p, i) = p * base^(-2i/head_dim), the frequency
    table repeated for both halves (NeoX layout)."""
    exponents = torch.arange(0, head_dim, 2, dtype=dtype) / head_dim
    inv_freq = 1.0 / (base ** exponents)
    positions = torch.arange(seq_len, dtype=dtype)
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, heads, head_dim] rotated position by position."""
    return x * cos[None, :, None, :] + rotate_half(x) * sin[None, :, None, :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with a causal mask; q, k, v [b, s, heads, head_dim] -> [b, s, heads*hd]."""
    b, s, heads, hd = q.shape
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [b, heads, s, hd]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    future = torch.ones(s, s, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.permute(0, 2, 1, 3).reshape(b, s, heads * hd)


def num_layers(state_dict: Mapping[str, torch.Tensor]) -> int:
    indices = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
    return max(indices) + 1 if indices else 0


@torch.no_grad()
def openlm_logits(state_dict: Mapping[str, torch.Tensor], tokens: torch.Tensor, num_heads: int,
                  eps: float = 1e-5, rotary_base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [b, s, vocab] of the OpenLM decoder in ``state_dict`` for ``tokens`` [b, s]."""
    sd = {k: v.to(dtype) for k, v in strip_prefixes(state_dict).items()}
    embedding = sd["tok_embeddings.weight"]
    d = embedding.shape[1]
    head_dim = d // num_heads
    b, s = tokens.shape
    cos, sin = rotary_tables(s, head_dim, rotary_base, dtype)
    x = embedding[tokens]
    for i in range(num_layers(sd)):
        p = f"layers.{i}."
        h = gain_layer_norm(x, sd[p + "attention_norm.weight"], eps)
        qkv = h @ sd[p + "attention.in_proj.weight"].T
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        if p + "attention.q_norm.weight" in sd:
            q = gain_layer_norm(q, sd[p + "attention.q_norm.weight"], eps)
            k = gain_layer_norm(k, sd[p + "attention.k_norm.weight"], eps)
        q, k, v = (t.reshape(b, s, num_heads, head_dim) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        x = x + causal_attention(q, k, v) @ sd[p + "attention.out_proj.weight"].T
        h = gain_layer_norm(x, sd[p + "ffn_norm.weight"], eps)
        w12 = h @ sd[p + "feed_forward.w12.weight"].T
        hidden = w12.shape[-1] // 2
        gate, up = w12[..., :hidden], w12[..., hidden:]
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "feed_forward.w3.weight"].T
    x = gain_layer_norm(x, sd["norm.weight"], eps)
    return x @ sd["output.weight"].T


def random_openlm_state_dict(num_layers: int, hidden: int, vocab: int, ffn_hidden: int,
                             num_heads: int, qk_norm: bool = True, seed: int = 0,
                             rotary_base: float = 10000.0) -> dict[str, torch.Tensor]:
    """Random weights in the OpenLM layout (gains away from one so a misplaced gain shows),
    with the rotary ``inv_freq`` buffer of each layer as OpenLM stores it."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape, std=0.05):
        return torch.randn(*shape, generator=gen) * std

    def gain(n):
        return 1.0 + 0.3 * torch.randn(n, generator=gen)

    head_dim = hidden // num_heads
    inv_freq = 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    sd = {"tok_embeddings.weight": normal(vocab, hidden, std=1.0)}
    for i in range(num_layers):
        p = f"layers.{i}."
        sd[p + "attention.in_proj.weight"] = normal(3 * hidden, hidden, std=hidden ** -0.5)
        sd[p + "attention.out_proj.weight"] = normal(hidden, hidden, std=hidden ** -0.5)
        if qk_norm:
            sd[p + "attention.q_norm.weight"] = gain(hidden)
            sd[p + "attention.k_norm.weight"] = gain(hidden)
        sd[p + "attention.pos_embed.inv_freq"] = inv_freq.clone()
        sd[p + "feed_forward.w12.weight"] = normal(2 * ffn_hidden, hidden, std=hidden ** -0.5)
        sd[p + "feed_forward.w3.weight"] = normal(hidden, ffn_hidden, std=ffn_hidden ** -0.5)
        sd[p + "attention_norm.weight"] = gain(hidden)
        sd[p + "ffn_norm.weight"] = gain(hidden)
    sd["norm.weight"] = gain(hidden)
    sd["output.weight"] = normal(vocab, hidden, std=hidden ** -0.5)
    return sd
