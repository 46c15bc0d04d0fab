"""The attention side of Mixtral: embedding, attention, norms, router gates and lm_head.

Shapes: T tokens, D hidden, H heads, KVH kv heads, Dh head dim, V vocab, E experts.

One decoder layer, split as the shards split it:

    h  = x + Attention(RMSNorm_1(x))          here (the KV cache lives here)
    y  = RMSNorm_2(h)                         here
    ids, w = top-k(y @ gate.T)                router/gating.py, gate weights held here
    m  = sum_k w_k * Expert_{ids_k}(y)        expert shards (expert_service/experts.py)
    x' = h + m                                here

This module only holds weights and does math; the per-layer loop that calls the expert
shards in between is attention_service/model_runner.py.
"""

import torch
import torch.nn.functional as F

from attention_service.attention import AttentionMetadata, paged_attention

# The matmul helpers the expert math uses too: fp32 weights on CPU go to oneDNN (see pack_linear).
from mixtral.linear import linear, pack_linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32 whatever the model dtype, as Mixtral was trained."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(positions: torch.Tensor, dim_head: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, Dh] (the two halves repeat: rotate-half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim_head, 2, dtype=torch.float32, device=positions.device) / dim_head)
    freqs = positions.float()[:, None] * inv_freq[None, :]           # [T, Dh/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh]; cos, sin [T, Dh] -> x * cos + rotate_half(x) * sin, a new tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    # Computed in cos's dtype (fp32) and rounded once at the end, whatever x's dtype; for fp32
    # x the .to is free. In place on the fresh `rotated`: two passes instead of three, and no
    # new tensors.
    rotated = torch.cat([-x2, x1], dim=-1).to(cos.dtype)
    return rotated.mul_(sin[:, None, :]).addcmul_(x, cos[:, None, :]).to(x.dtype)


class AttentionLayer:
    """One layer's attention-side weights, from the checkpoint's names."""

    def __init__(self, w: dict[str, torch.Tensor], prefix: str):
        self.input_norm = w[f"{prefix}.input_layernorm.weight"]                # [D]
        self.post_norm = w[f"{prefix}.post_attention_layernorm.weight"]        # [D]
        # q, k and v stacked: one matmul over the step's tokens instead of three.
        self.qkv = pack_linear(torch.cat([w[f"{prefix}.self_attn.{n}_proj.weight"] for n in "qkv"]))  # [(H+2KVH)*Dh, D]
        self.o = pack_linear(w[f"{prefix}.self_attn.o_proj.weight"])          # [D, H*Dh]
        self.gate = w[f"{prefix}.block_sparse_moe.gate.weight"]                 # [E, D]


class AttentionModel:
    """Everything of Mixtral but the experts.

    cfg: any object with ModelConfig's fields (the math does not import the config module).
    weights: tensor name -> tensor, as in the Hugging Face checkpoint.
    """

    def __init__(self, cfg, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.dim_head = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        self.eps, self.top_k = cfg.rms_norm_eps, cfg.num_experts_per_tok
        self.embed_tokens = weights["model.embed_tokens.weight"]                 # [V, D]
        self.layers = [AttentionLayer(weights, f"model.layers.{l}") for l in range(cfg.num_hidden_layers)]
        self.norm = weights["model.norm.weight"]                                  # [D]
        self.lm_head = pack_linear(weights.get("lm_head.weight", self.embed_tokens))   # [V, D]
        self.dtype, self.device = self.embed_tokens.dtype, self.embed_tokens.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> x [T, D]."""
        return F.embedding(tokens, self.embed_tokens)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(positions, self.dim_head, self.cfg.rope_theta)

    def attention(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, D] -> h [T, D] = x + Attention(RMSNorm_1(x)), reading and extending the paged cache."""
        w = self.layers[layer]
        T = x.shape[0]
        a = rms_norm(x, w.input_norm, self.eps)
        H, KVH, Dh = self.n_heads, self.n_kv_heads, self.dim_head
        qkv = linear(a, w.qkv)                                               # [T, (H + 2KVH) * Dh]
        # q and k rotated together: one pass of each op over both.
        qk = apply_rope(qkv[:, :(H + KVH) * Dh].view(T, H + KVH, Dh), cos, sin)
        v = qkv[:, (H + KVH) * Dh:].view(T, KVH, Dh)
        o = paged_attention(qk[:, :H], qk[:, H:], v, k_cache, v_cache, meta)   # [T, H, Dh]
        return x + linear(o.reshape(T, -1), w.o)

    def moe_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] -> y [T, D] = RMSNorm_2(h), what the router and experts see."""
        return rms_norm(h, self.layers[layer].post_norm, self.eps)

    def gate(self, layer: int) -> torch.Tensor:
        return self.layers[layer].gate

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] (last positions) -> logits [B, V] in fp32."""
        return linear(rms_norm(x, self.norm, self.eps), self.lm_head).float()
