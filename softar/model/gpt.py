"""A GPT over vectors: pre-LayerNorm transformer blocks that read slot vectors [B, T, m] plus positions.

The hard-token model is a thin wrapper: ids -> E[ids] -> backbone -> tied LM head. Soft tokens and summary slots
enter through `GPT.hidden`, which takes any vectors in R^m.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from softar.collapse import add_noise, soft_token
from softar.config import ContextConfig, LossConfig, ModelConfig
from softar.context import Layout, SlotEncoder, summary_slots
from softar.model.embedding import TokenEmbedding, frozen_random_table
from softar.model.heads import CollapseHead, LMHead, VectorHead


class KVCache:
    """Preallocated keys and values for all layers: kv [n_layer, 2, B, H, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        hd = cfg.d_model // cfg.n_head
        self.kv = torch.zeros(cfg.n_layer, 2, batch_size, cfg.n_head, max_len, hd, device=device, dtype=dtype)
        self.len = 0  # filled positions
        self.max_len = max_len

    def reset(self) -> None:
        self.len = 0


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

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: KVCache | None) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
        if rope is not None:
            qkv = torch.cat((apply_rope(qkv[:2], *rope), qkv[2:]))
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p, is_causal=True)
        else:
            start, end = cache.len, cache.len + T
            kv = cache.kv[self.layer]  # [2, B, H, max_len, hd]
            kv[:, :, :, start:end] = qkv[1:]
            mask = None
            if T > 1:  # new queries see the whole cache plus the new keys up to themselves
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(qkv[0], kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask,
                                               dropout_p=p)
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

    def forward(self, x: torch.Tensor, rope: tuple | None, cache: KVCache | None) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        T = x.shape[1]
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
        for block in self.blocks:
            h = block(h, rope, cache)
        if cache is not None:
            cache.len += T
        return self.ln_f(h)


class GPT(nn.Module):
    """Embedding space E [V, m] + backbone + tied LM head, optional vector and collapse heads, the context layout
    (summary and soft slots, `softar.context`) and the training objective (`forward` with targets)."""

    def __init__(self, cfg: ModelConfig, loss: LossConfig | None = None, context: ContextConfig | None = None):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be resolved from the data before building a model")
        self.cfg, self.loss_cfg = cfg, loss or LossConfig()
        context = context or ContextConfig()
        self.layout = Layout.from_config(context, cfg.block_size)
        self.embed = TokenEmbedding(cfg.vocab_size, cfg.m)
        self.backbone = Backbone(cfg)
        self.lm_head = LMHead(cfg.d_model, cfg.m)
        self.vector_head = VectorHead(cfg.d_model, cfg.m) if cfg.vector_head else None
        self.collapse_head = CollapseHead(cfg.d_model, cfg.m) if cfg.collapse_head else None
        self.slots = None if self.layout.plain else SlotEncoder(self.layout, cfg.m, context.kind_embeddings,
                                                                context.project)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.embedding != "learned":  # frozen: random rows now, or another run's E loaded by the trainer
            with torch.no_grad():
                self.embed.weight.copy_(frozen_random_table(cfg.vocab_size, cfg.m, seed=0))
            self.embed.weight.requires_grad_(False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden(self, x: torch.Tensor, positions: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """The vector path: slot vectors [B, T, m] -> hidden states [B, T, d]."""
        return self.backbone(x, positions, cache)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h, self.embed.weight)  # [B, T, V]

    def heads(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the model emits at each position: logits [B, T, V]; h_m, the hidden state mapped to R^m;
        y (vector head) and c (collapse head) in R^m when the model has them."""
        h_m = self.lm_head.out_proj(h)
        out = {"logits": F.linear(h_m, self.embed.weight), "h_m": h_m}
        if self.vector_head is not None:
            out["y"] = self.vector_head(h)
        if self.collapse_head is not None:
            out["c"] = self.collapse_head(h)
        return out

    def fill_window(self, tokens: torch.Tensor, history: tuple[torch.Tensor, torch.Tensor] | None = None,
                    soft_fraction: float = 0.0) -> torch.Tensor:
        """The training-time context builder: token vectors [B, n, m] (n = the layout's hard + soft slots; any n for
        a plain model) and their history (ids [B, h] right-aligned, lengths [B]) -> the window [B, A+S+n, m].

        Soft slots get the model's own soft tokens in two passes (parallel scheduled sampling): a first pass without
        gradients gives each position's soft token; the second reads it in the soft region, and at a random
        `soft_fraction` of the other positions (never the first)."""
        lay, E = self.layout, self.embed.weight
        summary = None
        if lay.n_summary:
            if history is None:  # no history: empty summary slots
                history = (tokens.new_zeros(tokens.shape[0], 0, dtype=torch.long),
                           tokens.new_zeros(tokens.shape[0], dtype=torch.long))
            summary = summary_slots(E, *history, lay).to(tokens.dtype)
        n_soft = min(lay.soft, tokens.shape[1]) if self.slots is not None else 0

        def window(v: torch.Tensor) -> torch.Tensor:
            return v if self.slots is None else self.slots(summary, v, n_soft)

        if n_soft or soft_fraction > 0:
            lc = self.loss_cfg
            with torch.no_grad():
                first = self.heads(self.hidden(window(tokens))[:, lay.n_summary :])
                soft = soft_token(lc.soft_kind, E, first["logits"], first.get("y"), first["h_m"], lc.soft_top_k)
                if self.training:
                    soft = add_noise(lc.noise, lc.noise_scale, soft, E, first["logits"])
            guess = torch.cat([tokens[:, :1], soft[:, :-1].to(tokens.dtype)], dim=1)  # position t: guessed at t-1
            pick = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            if soft_fraction > 0:
                pick = torch.rand(tokens.shape[:2], device=tokens.device) < soft_fraction
                pick[:, 0] = False
            if n_soft:
                pick[:, tokens.shape[1] - n_soft :] = True
            tokens = torch.where(pick.unsqueeze(-1), guess, tokens)
        return window(tokens)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                targets: torch.Tensor | None = None, history: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: token ids [B, T] (the hard path: E[ids]) or token vectors [B, T, m]; with a layout, also the history
        before them (ids [B, h], lengths [B]). Without targets: logits of the token slots [B, T, V]. With targets
        [B, T]: (loss, parts) of the training objective."""
        vectors = x if x.is_floating_point() else self.embed(x)
        if targets is not None:
            from softar.losses import training_objective

            return training_objective(self, vectors, targets, self.loss_cfg, history)
        if self.layout.plain:
            return self.logits(self.hidden(vectors, positions, cache))
        return self.logits(self.hidden(self.fill_window(vectors, history))[:, self.layout.n_summary :])

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel() + (self.backbone.wpe.weight.numel() if self.backbone.wpe else 0)
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per predicted token, as nanoGPT and PaLM count them: 6N for the matmuls (position
        embeddings excluded, the tied LM head included) plus 12 * L * d * T for attention over a full window; with a
        layout, a window's T slots predict only its hard + soft tokens, and a soft region or soft inputs add a first
        forward pass without gradients (a third of a training pass)."""
        c, lay = self.cfg, self.layout
        n = self.num_params() - (self.backbone.wpe.weight.numel() if self.backbone.wpe else 0)
        per_slot = 6 * n + 12 * c.n_layer * c.d_model * c.block_size
        two_pass = 4 / 3 if lay.soft or self.loss_cfg.soft_inputs > 0 else 1.0  # + a forward without gradients
        return per_slot * c.block_size / lay.tokens * two_pass  # per predicted token
