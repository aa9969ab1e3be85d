"""A GPT over vectors: pre-LayerNorm transformer blocks that read slot vectors [B, T, m] plus positions.

It implements `softar.model.interface.VectorLM` and knows nothing of soft tokens, layouts or losses. The hard-token
model is ids -> E[ids] -> hidden -> tied LM head; soft tokens and summary slots enter `hidden` as any vectors in R^m.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from softar.config import ModelConfig
from softar.model.embedding import TokenEmbedding, frozen_random_table
from softar.model.heads import CollapseHead, LMHead, VectorHead
from softar.model.interface import Hidden, Outputs


def init_normal(module: nn.Module) -> None:
    """N(0, 0.02) weights and zero biases for a Linear or an Embedding (applied module by module)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class KVCache:
    """Keys and values appended in order for every layer: k[l], v[l] [B, H, len, hd]. Appending concatenates
    instead of writing into a buffer, so a forward through the cache keeps its autograd graph: continuous thoughts
    train through it (`softar.soft.thoughts`), as Coconut's do through Hugging Face's cache."""

    def __init__(self, n_layer: int):
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.len = 0  # filled positions
        self._mask: torch.Tensor | None = None

    def prepare(self, T: int) -> None:
        """Before a forward of T new slots: their queries see the whole cache plus the new keys up to themselves."""
        device = self.k[0].device if self.len else None
        self._mask = None if T == 1 or self.len == 0 else \
            torch.ones(T, self.len + T, dtype=torch.bool, device=device).tril(diagonal=self.len)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v [B, H, T, hd] after what the cache holds and attend q to everything so far."""
        if self.len == 0:  # an empty cache: the very computation of the uncached forward
            self.k[layer], self.v[layer] = k, v
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        k = self.k[layer] = torch.cat((self.k[layer], k), dim=2)
        v = self.v[layer] = torch.cat((self.v[layer], v), dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask)

    def advance(self, T: int) -> None:
        self.len += T


class RingCache:
    """The decode-time cache: `size` key/value slots per sequence used as a ring. A step writes every sequence's new
    slot at the same index `slot` and attends to the slots its row of `valid` [B, size] allows. A key already holds
    its position, so where it sits does not matter, and no shape ever changes: the cache allocates nothing per step,
    as a CUDA-graph capture would need. Whole windows come in through `write_rows` (see `softar.decode`)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, size: int, device=None, dtype=torch.float32):
        hd = cfg.d_model // cfg.n_head
        self.kv = torch.zeros(cfg.n_layer, 2, batch_size, cfg.n_head, size, hd, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, size, dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next step writes
        self.size = size
        self._bias = torch.zeros(batch_size, 1, 1, size, device=device, dtype=dtype)  # 0 or -inf per slot

    def prepare(self, T: int) -> None:
        if T != 1:
            raise ValueError("a ring cache takes one slot per step; prefill whole windows with write_rows")
        self.valid.index_fill_(1, self.slot, True)
        # once per step rather than per layer: an additive mask is also faster in attention than a boolean one
        self._bias.fill_(float("-inf")).masked_fill_(self.valid[:, None, None, :], 0.0)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = self.kv[layer]
        kv[0].index_copy_(2, self.slot, k)
        kv[1].index_copy_(2, self.slot, v)
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=self._bias)

    def advance(self, T: int) -> None:
        self.slot.add_(1).remainder_(self.size)

    def write_rows(self, rows: torch.Tensor, window: KVCache) -> None:
        """Replace rows [R] of the ring with the L-slot windows a `KVCache` (k, v [R, H, L, hd] per layer) holds, in
        the L slots just before `slot`; every other slot of those rows becomes invalid."""
        L = window.len
        slots = (self.slot - L + torch.arange(L, device=self.slot.device)).remainder(self.size)  # [L]
        r, s = rows[:, None], slots[None, :]
        kv = torch.stack([torch.stack(kv) for kv in zip(window.k, window.v, strict=True)])  # [n_layer, 2, R, H, L, hd]
        self.kv[:, :, r, :, s] = kv.permute(2, 4, 0, 1, 3, 5)  # [R, L, n_layer, 2, H, hd]
        self.valid[rows] = False
        self.valid[r, s] = True

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows, ascending (finished sequences stop costing compute)."""
        self.kv, self.valid = compact(self.kv, rows, 2), compact(self.valid, rows)
        self._bias = compact(self._bias, rows)


def compact(t: torch.Tensor, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """t with only the entries `rows` (ascending) of dimension `dim`, moved to its front in place -> a view of the same
    memory. A batch that sheds finished rows this way writes into memory it already has: on a CPU, taking fresh memory
    (first touch) costs ten times the copy."""
    kept = rows.tolist()
    if any(b <= a for a, b in zip(kept, kept[1:], strict=False)):
        raise ValueError("compact: rows must be ascending")
    for i, r in enumerate(kept):  # r >= i: a row moves only to a place already emptied or its own
        if r != i:
            t.select(dim, i).copy_(t.select(dim, r))
    return t.narrow(dim, 0, len(kept))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] or [B, T] -> cos, sin broadcastable to [B, H, T, head_dim // 2]."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [..., T, hd/2]
    if angles.dim() == 3:
        angles = angles[:, None]  # [B, 1, T, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]  # rotate each (even, odd) pair by its angle
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.layer = cfg.n_head, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: KVCache | RingCache | None) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        if rope is not None:
            qkv = torch.cat((apply_rope(qkv[:2], *rope), qkv[2:]))
        if cache is None:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p, is_causal=True)
        else:
            y = cache.attend(self.layer, qkv[0], qkv[1], qkv[2])
        y = self.proj(y.transpose(1, 2).reshape(B, T, d))
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(F.gelu(self.fc(x)))
        return F.dropout(y, self.dropout, self.training) if self.dropout else y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: KVCache | RingCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope, cache)
        return x + self.mlp(self.ln2(x))


class Backbone(nn.Module):
    """Transformer over vectors: [B, T, m] + positions -> hidden [B, T, d]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.m, cfg.d_model, bias=False) if cfg.m != cfg.d_model else nn.Identity()
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.dropout = cfg.dropout
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.checkpointing = False  # train.checkpointing

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | RingCache | None = None,
                keep_layers: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (the last layer after the final LayerNorm [B, T, d], the residual stream after 0..L blocks if
        keep_layers else []). Positions [T] or [B, T] default to those after what a `KVCache` holds (a `RingCache`
        needs them given)."""
        T = x.shape[1]
        if cache is not None:
            cache.prepare(T)
        if positions is None:
            start = cache.len if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device)  # [T]
        h = self.in_proj(x)
        rope = None
        if self.wpe is not None:
            h = h + self.wpe(positions)
        else:
            rope = rope_cos_sin(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_base)
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        layers = [h] if keep_layers else []
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()  # a cache is written: not twice
        for block in self.blocks:
            h = checkpoint(block, h, rope, None, use_reentrant=False) if recompute else block(h, rope, cache)
            if keep_layers:
                layers.append(h)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(h), layers


class GPT(nn.Module):
    """Embedding space E [V, m] + backbone + tied LM head, with optional vector and collapse heads. The collapse head
    reads the last layer, one chosen layer (`model.collapse_layer`) or a learned mix of all (`model.collapse_mix`):
    the seed's "layer in which all of the context has been mixed"."""

    def __init__(self, cfg: ModelConfig, init: bool = True):
        """`init=False` leaves nanoGPT's initialisation to a later `init_weights` call that can take modules built
        after this one (softAR's window builder), so that they draw their initial weights in one fixed order."""
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved from the data before building a model")
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.m)
        self.backbone = Backbone(cfg)
        self.lm_head = LMHead(cfg.d_model, cfg.m)
        self.vector_head = VectorHead(cfg.d_model, cfg.m) if cfg.vector_head else None
        self.collapse_head = CollapseHead(cfg.d_model, cfg.m) if cfg.collapse_head else None
        if init:
            self.init_weights()
        # created after the init above, so models without it draw the same initial weights as before it existed
        self.layer_mix = nn.Parameter(torch.zeros(cfg.n_layer + 1)) if cfg.collapse_head and cfg.collapse_mix \
            else None
        if cfg.embedding != "learned":  # frozen: random rows now, or another run's E loaded by the trainer
            with torch.no_grad():
                self.embed.weight.copy_(frozen_random_table(cfg.vocab_size, cfg.m, seed=0))
            self.embed.weight.requires_grad_(False)

    def init_weights(self, *after: nn.Module) -> None:
        """nanoGPT's initialisation: N(0, 0.02) for every Linear and Embedding, here and then in `after`; then
        GPT-2's scaled init of the residual projections."""
        for module in (self, *after):
            module.apply(init_normal)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.cfg.n_layer))

    @property
    def E(self) -> torch.Tensor:
        return self.embed.weight  # [V, m]

    @property
    def _reads_layers(self) -> bool:
        return self.collapse_head is not None and (self.layer_mix is not None or self.cfg.collapse_layer >= 0)

    def hidden(self, vectors: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | RingCache | None = None) -> Hidden:
        """Slot vectors [B, T, m] -> hidden states [B, T, d] (and the collapse head's layer, if not the last)."""
        last, layers = self.backbone(vectors, positions, cache, keep_layers=self._reads_layers)
        if not layers:
            return Hidden(last)
        if self.layer_mix is not None:
            mix = torch.einsum("l,lbtd->btd", self.layer_mix.softmax(0), torch.stack(layers))
        else:
            mix = layers[self.cfg.collapse_layer]
        return Hidden(last, mix)

    def heads(self, h: Hidden) -> Outputs:
        h_m = self.lm_head.out_proj(h.last)  # [B, T, m]
        return Outputs(logits=F.linear(h_m, self.E), h_m=h_m,  # logits [B, T, V]
                       y=self.vector_head(h.last) if self.vector_head is not None else None,
                       c=self.collapse_head(h.last if h.mix is None else h.mix) if self.collapse_head is not None
                       else None, hidden=h.last)

    @property
    def width(self) -> int:
        return self.cfg.d_model

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.cfg.n_layer)  # it grows as it fills: no size to fix

    def new_ring_cache(self, batch_size: int, size: int) -> RingCache:
        return RingCache(self.cfg, batch_size, size, self.E.device, self.E.dtype)

    def shard_units(self) -> list[nn.Module]:
        return list(self.backbone.blocks)

    def checkpoint_activations(self) -> None:
        self.backbone.checkpointing = True

    def describe(self) -> dict:
        return {"n_layer": self.cfg.n_layer, "n_head": self.cfg.n_head, "d_model": self.cfg.d_model}

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + (self.backbone.wpe.weight.numel() if self.backbone.wpe else 0)
        return n

    def flops_per_position(self, context: int) -> float:
        """As nanoGPT and PaLM count them: 6N for the matmuls (position embeddings excluded, the tied LM head
        included) plus 12 * L * d * T for attention over a `context`-slot window."""
        c = self.cfg
        n = self.num_params() - (self.backbone.wpe.weight.numel() if self.backbone.wpe else 0)
        return 6 * n + 12 * c.n_layer * c.d_model * context
