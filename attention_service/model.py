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

from attention_service.attention import AttentionMetadata, attend, paged_attention
from mixtral.greedy import greedy_tokens

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
        # The fused CPU ops (torch.ops.moe_serve: rms_norm, qkv_rope_cache) where the runner
        # found them to apply (fp32 on CPU); None: the torch code below.
        self.fused = None
        # The lm_head's int8/bf16 screen (mixtral/greedy.py) where the runner built one: greedy
        # steps take their tokens from `greedy` without every fp32 logit. None: `logits` only.
        self.greedy_head = None
        self._cos = self._sin = None    # rope tables [P, Dh] for positions 0 .. P - 1, grown on demand

    def norm_(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused.rms_norm(x, weight, self.eps)
        return rms_norm(x, weight, self.eps)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> x [T, D]."""
        return F.embedding(tokens, self.embed_tokens)

    def rope(self, positions: torch.Tensor, upto: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, Dh]. upto (> every position, known on the host): looked
        up in tables kept from step to step, the same values without computing them each step."""
        if upto is None:
            return rope(positions, self.dim_head, self.cfg.rope_theta)
        if self._cos is None or self._cos.shape[0] < upto:
            n = min(max(upto, 2 * (0 if self._cos is None else self._cos.shape[0]), 1024),
                    max(upto, self.cfg.max_position_embeddings))
            self._cos, self._sin = rope(torch.arange(n, device=self.device), self.dim_head, self.cfg.rope_theta)
        return self._cos[positions], self._sin[positions]

    def attention(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """x [T, D] -> h [T, D] = x + Attention(RMSNorm_1(x)), reading and extending the paged cache."""
        w = self.layers[layer]
        T = x.shape[0]
        a = self.norm_(x, w.input_norm)
        H, KVH, Dh = self.n_heads, self.n_kv_heads, self.dim_head
        qkv = linear(a, w.qkv)                                               # [T, (H + 2KVH) * Dh]
        if self.fused is not None and meta.kernels_only:
            # One pass: q and k rotated, k and v written to the cache; the kernels read them there.
            q = self.fused.qkv_rope_cache(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, H)
            return x + linear(attend(q, k_cache, v_cache, meta).view(T, -1), w.o)
        # q and k rotated together: one pass of each op over both.
        qk = apply_rope(qkv[:, :(H + KVH) * Dh].view(T, H + KVH, Dh), cos, sin)
        v = qkv[:, (H + KVH) * Dh:].view(T, KVH, Dh)
        o = paged_attention(qk[:, :H], qk[:, H:], v, k_cache, v_cache, meta)   # [T, H, Dh]
        return x + linear(o.reshape(T, -1), w.o)

    def moe_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [T, D] -> y [T, D] = RMSNorm_2(h), what the router and experts see."""
        return self.norm_(h, self.layers[layer].post_norm)

    def gate(self, layer: int) -> torch.Tensor:
        return self.layers[layer].gate

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] (last positions) -> logits [B, V] in fp32."""
        return linear(self.norm_(x, self.norm), self.lm_head).float()

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, D] (last positions) -> tokens [B] int64: logits(x).argmax(-1) (first of equal
        maxima), the same tokens, from the screen; every fp32 logit only for a row it gives back."""
        a = self.norm_(x, self.norm)
        tokens = greedy_tokens(a, self.greedy_head)
        back = (tokens < 0).nonzero().flatten()
        if back.numel():
            tokens[back] = linear(a[back], self.lm_head).float().argmax(-1)
        return tokens
