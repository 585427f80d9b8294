"""The Llama architecture in one file (Llama 1/2/3/3.1/3.2, SmolLM2, TinyLlama differ only by config).

Parameter names follow Hugging Face `LlamaForCausalLM` so HF safetensors load without renaming:
  model.embed_tokens, model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
  mlp.{gate,up,down}_proj}, model.norm, lm_head.
Shapes: B batch, T new tokens, S keys attended (cache span), H query heads, K kv heads, D head dim, C hidden.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .kv_cache import KVCache
from .rope import apply_rope, inv_frequencies, rope_cos_sin

# Prompt attention runs in query blocks aligned to multiples of this many absolute positions. CPU attention
# kernels round differently for different numbers of queries and keys, so without a fixed grid a position's
# output would depend on how a prompt was chunked (and so on what else the server was doing). Engines align
# their prefill chunks and prefix reuse to it (generate/engine.py) to get batch-invariant results.
ATTENTION_BLOCK = 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # fused; same numbers in float32
        # Normalise in float32 whatever the activation dtype (as HF and Meta do), scale in the input dtype.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Step(NamedTuple):
    """What every layer of one forward call shares.

    positions [B, T]; mask [B, 1, T, S] bool or None (None: attend to all S keys, causally when T > 1 without a
    cache); span: S, keys attended; start: one first position for all rows as an int, which lets the cache write
    a slice instead of scattering (None when rows have their own positions).
    row_keys: for one new token per row at per-row positions (a batched decode step, eager), each row's own key
    count: attention then runs row by row over exactly those keys, the same call a row decoding alone makes,
    so a row's numbers do not depend on the other rows of the batch. blocked: prompt attention by
    ATTENTION_BLOCK-aligned query blocks (a cached prefill at one start position).
    """
    cos: torch.Tensor
    sin: torch.Tensor
    cache: KVCache | None
    rows: torch.Tensor | None
    positions: torch.Tensor
    mask: torch.Tensor | None
    span: int
    start: int | None
    row_keys: tuple[int, ...] | None = None
    blocked: bool = False


def _blocked_attention(q, k, v, start: int, gqa: bool) -> torch.Tensor:
    """Causal attention of T queries at positions start..start+T-1 over keys 0..start+T-1, one SDPA call per
    ATTENTION_BLOCK-aligned block of query positions. A block's call sees the same shapes however the prompt
    was chunked around it, so its output is bit-identical for every chunking."""
    T = q.shape[2]
    out, i = [], 0
    while i < T:
        a = start + i
        b = min(T, (a // ATTENTION_BLOCK + 1) * ATTENTION_BLOCK - start)  # end of a's block, relative
        end = start + b                                                   # keys 0..end-1
        if a == 0:
            o = F.scaled_dot_product_attention(q[:, :, :b], k[:, :, :end], v[:, :, :end], is_causal=True,
                                               enable_gqa=gqa)
        else:
            pos = torch.arange(a, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= pos[:, None]  # [Tq, S]
            o = F.scaled_dot_product_attention(q[:, :, i:b], k[:, :, :end], v[:, :, :end], attn_mask=mask,
                                               enable_gqa=gqa)
        out.append(o)
        i = b
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=b)
        self.qkv_proj = None  # q/k/v fused into one matmul by model.quant at inference time

    def forward(self, x, step: Step):
        B, T, _ = x.shape
        cos, sin, cache, mask = step.cos, step.sin, step.cache, step.mask
        if self.qkv_proj is None:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
            k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # [B, K, T, D]
            v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # [B, K, T, D]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            qkv = self.qkv_proj(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(1, 2)
            qk = apply_rope(qkv[:, :self.n_heads + self.n_kv], cos, sin)  # one rotation for q and k together
            q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv:]
        if cache is not None:
            k, v = cache.update(self.layer_idx, step.rows, step.positions, k, v, span=step.span,
                                start=step.start)  # [B, K, S, D]
            k, v = k.to(q.dtype), v.to(q.dtype)
        gqa = self.n_kv != self.n_heads
        if step.row_keys is not None:  # [B, H, 1, D] row by row, each over its own keys (batch-invariant)
            out = torch.cat([F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                                            enable_gqa=gqa) for b, n in enumerate(step.row_keys)])
        elif step.blocked:
            out = _blocked_attention(q, k, v, step.start, gqa)
        elif mask is None:  # causal over T new tokens that are all the keys; a single new token sees every key
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [B, H, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, I, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, I, bias=b)
        self.up_proj = nn.Linear(C, I, bias=b)
        self.down_proj = nn.Linear(I, C, bias=b)
        self.gate_up_proj = None  # gate/up fused into one matmul by model.quant at inference time

    def forward(self, x):
        if self.gate_up_proj is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # may come back in the kernels' narrower dtype
        return self.down_proj(F.silu(gate.to(x.dtype)) * up)  # SiLU in the activations' dtype


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, step: Step):
        x = x + self.self_attn(self.input_layernorm(x), step)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """Causal LM. `forward(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a parameter or buffer: it is derived from the config and must survive meta-device construction.
        self._inv_freq = None
        self.gradient_checkpointing = False
        self.kv_dtype = None  # cache dtype when it differs from the activations' (model.quant: bfloat16)
        # Batch-invariant attention with a KV cache (see ATTENTION_BLOCK, Step.row_keys); False: one SDPA call per
        # layer whatever the batch (the previous behaviour; bench/determinism.py measures the difference).
        self.batch_invariant = True

    def tie_weights(self) -> None:
        """Re-tie after `load_state_dict(assign=True)` replaced one side of a tied pair."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def inv_freq(self, device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != torch.device(device):
            self._inv_freq = inv_frequencies(self.config).to(device)
        return self._inv_freq

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None, dtype=None,
                  static: bool = False) -> KVCache:
        p = self.model.norm.weight  # a plain parameter in every weight format (quantized embeddings have none)
        return KVCache(self.config, batch_size, max_seq_len or self.config.max_position_embeddings,
                       dtype=dtype or self.kv_dtype or _activation_dtype(p), device=p.device, static=static)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      input_pos: int | torch.Tensor | None = None, rows: torch.Tensor | None = None,
                      span: int | None = None, *, position_ids: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None):
        """Final-norm hidden states [B, T, C].

        input_pos: absolute position of input_ids[:, 0]; an int for all rows or a LongTensor [B] per row.
        rows: which cache rows the batch rows map to (default 0..B-1).
        span: with per-row positions, how many cache positions to attend (default: the furthest position + 1,
            read back from the tensor).
        position_ids [B, T] and attn_mask [B, 1, T, T] (bool, True = may attend), without a cache: packed
            training rows, whose positions restart per document and whose attention is block-diagonal.
        """
        if (position_ids is not None or attn_mask is not None) and cache is not None:
            raise ValueError("position_ids/attn_mask are for cache-free (training) forwards")
        B, T = input_ids.shape
        dev = input_ids.device
        x = self.model.embed_tokens(input_ids)  # [B, T, C]
        ar = torch.arange(T, device=dev)
        start = 0 if input_pos is None else input_pos if isinstance(input_pos, (int, torch.SymInt)) else None
        positions = (ar + start).expand(B, T) if start is not None else input_pos.to(dev)[:, None] + ar  # [B, T]
        mask, keys = None, T
        if cache is not None:
            if getattr(cache, "static", False):
                keys = cache.max_seq_len  # fixed shapes, no sync; the mask hides the unused slots
            elif start is not None:
                keys = start + T
            else:  # per-row positions: keys up to the furthest one (a traced caller passes it, no read-back)
                keys = span if span is not None else int(positions.max()) + 1
            if isinstance(keys, int) and keys > cache.max_seq_len:  # (a traced size is checked by the tracer)
                raise ValueError(f"position {keys - 1} is beyond the cache length {cache.max_seq_len}")
            # A key at position j is visible to a query at position p iff j <= p (stale slots are masked out).
            # One new token at a position shared by all rows sees every key up to it: no mask needed.
            # Likewise a prompt written from position 0: plain causal attention over its own T keys.
            if getattr(cache, "static", False) or start is None or (T > 1 and start != 0):
                mask = (torch.arange(keys, device=dev)[None, None, :] <= positions[:, :, None])[:, None]  # [B,1,T,S]
        if position_ids is not None:
            positions = position_ids.to(dev)
        if attn_mask is not None:
            mask = attn_mask.to(dev)
        row_keys, blocked = None, False
        if self.batch_invariant and cache is not None and not getattr(cache, "static", False) and not _tracing():
            if T == 1 and start is None:
                row_keys = tuple(int(p) + 1 for p in positions[:, 0].tolist())
            blocked = T > 1 and start is not None
        cos, sin = rope_cos_sin(self.inv_freq(dev), positions, x.dtype)
        step = Step(cos, sin, cache, rows, positions, mask, keys, start, row_keys, blocked)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, step, use_reentrant=False)
            else:
                x = layer(x, step)
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                input_pos: int | torch.Tensor | None = None, rows: torch.Tensor | None = None,
                last_only: bool = False, span: int | None = None, *, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden_states(input_ids, cache, input_pos, rows, span, position_ids=position_ids,
                               attn_mask=attn_mask)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)


def _tracing() -> bool:
    """Inside torch.compile / torch.export, where shapes are symbolic and Python loops over rows cannot run."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _activation_dtype(p: torch.Tensor) -> torch.dtype:
    return p.dtype if p.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
