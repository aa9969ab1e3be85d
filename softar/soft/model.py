"""`SoftAR`: a `VectorLM` with the context layout and the window builder. It is what training, generation and
evaluation hold; the network inside (`.lm`) may be softAR's GPT or a Hugging Face model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softar.config import Config, ConfigError, ContextConfig, LossConfig, SoftConfig
from softar.data.dataset import random_windows
from softar.losses import fit_temperature, objective
from softar.model import GPT, Outputs
from softar.model.gpt import init_normal
from softar.soft.feeds import SoftFeed, thought_policies
from softar.soft.gate import GATE, ThoughtGate
from softar.soft.memory import MEMORIES, Memory, memory_problem
from softar.soft.thoughts import fill_slots, forward_thoughts, task_loss
from softar.soft.tokens import add_noise, heads_of, make_soft_token, spec_problem
from softar.soft.window import SOFT, Layout, WindowBuilder, summary_slots
from softar.tasks.data import task_tokenizer

READOUT_WINDOWS = 64  # teacher-forced train windows the cosine readout's temperature is fitted on
History = tuple[torch.Tensor, torch.Tensor]  # ids [B, h] right-aligned (the newest last), lengths [B]


class SoftAR(nn.Module):
    def __init__(self, lm: nn.Module, window_slots: int, context: ContextConfig | None = None,
                 soft: SoftConfig | None = None, loss: LossConfig | None = None):
        super().__init__()
        self.lm = lm  # a VectorLM
        self.context_cfg, self.soft_spec, self.loss_cfg = context or ContextConfig(), soft or SoftConfig(), \
            loss or LossConfig()
        self.window_slots = window_slots
        self.layout = Layout.from_config(self.context_cfg, window_slots)
        self.slots = WindowBuilder(self.layout, lm.E.shape[1], self.context_cfg.kind_embeddings,
                                   self.context_cfg.project)
        # the retention study's controls (context.memory): what the summary slots hold besides pure arithmetic
        kind = MEMORIES[self.context_cfg.memory]  # None: pure arithmetic
        self.memory: Memory | None = None if kind is None else \
            kind(self.layout, lm.width, lm.E.shape[1], self.context_cfg.segment_len)
        # a reasoning task's <thought> token, whose slots the model fills with its own continuous thoughts
        # (softar.soft.thoughts); None for a language model
        self.thought_id: int | None = None
        # a regression-only model (ce weight 0) never trains its LM head: evaluation reads its distribution as
        # softmax(cos(y, E) / tau) instead, with tau fitted on train (`fit_cosine_readout`)
        self.cosine_readout: float | None = None

    @property
    def regression_only(self) -> bool:
        return self.loss_cfg.ce == 0 and self.lm.vector_head is not None

    @property
    def E(self) -> torch.Tensor:
        return self.lm.E  # [V, m]

    def step(self, vectors: torch.Tensor, cache=None, positions: torch.Tensor | None = None,
             at: slice | None = None) -> Outputs:
        """The one forward step of softAR's algorithm, for training and inference alike: slot vectors [B, T, m] at
        `positions` ([T] or [B, T]; default: after what `cache` holds, which keeps their keys and values) -> what the
        model emits at the positions `at` of the T (default all) [B, t, ...], the logits through the cosine readout
        when one is set."""
        h = self.lm.hidden(vectors, positions, cache)
        out = self.lm.heads(h if at is None else h[:, at])
        if self.cosine_readout is None:
            return out
        cos = F.normalize(out.y.float(), dim=-1) @ F.normalize(self.E.float(), dim=-1).T  # [..., V]
        return replace(out, logits=cos / self.cosine_readout)

    def read(self, window: torch.Tensor, last: bool = False) -> Outputs:
        """The outputs at a window's [B, T, m] token slots [B, n, ...] (last: at its last slot only [B, 1, ...])."""
        return self.step(window, at=slice(-1, None) if last else slice(self.layout.n_summary, None))

    def new_cache(self, batch_size: int, max_len: int):
        """A growing KV cache for `step` (autograd runs through it)."""
        return self.lm.new_cache(batch_size, max_len)

    @torch.no_grad()
    def fit_cosine_readout(self, train_data: np.ndarray, windows: int = READOUT_WINDOWS, seed: int = 0) -> float:
        """A regression-only model (ce weight 0) never trained its LM head, so it is read as softmax(cos(y, E) / tau),
        tau fitted on teacher-forced train windows (never on a split that is evaluated), and collapsed by nearest
        neighbour (the argmax of that cosine). Sets and returns `cosine_readout`."""
        was_training = self.training
        self.eval()
        self.cosine_readout = 1.0
        ids = random_windows(train_data, self.window_slots + 1, windows, seed + 1, self.E.device)
        logits = self.step(self.E[ids[:, :-1]]).logits
        self.cosine_readout = fit_temperature(logits.flatten(0, 1), ids[:, 1:].flatten())
        self.train(was_training)
        return self.cosine_readout

    def summary(self, history: History | None, tokens: torch.Tensor) -> torch.Tensor | None:
        """The summary slots [B, A+S, m] of the windows of token vectors [B, n, m] after `history` (None without
        summary slots, or without history for pure arithmetic: `WindowBuilder` then leaves them empty)."""
        if not self.layout.n_summary:
            return None
        if self.memory is not None:
            slots = self.memory.summary(self, history, tokens.shape[0])
        else:
            slots = summary_slots(self.E, *history, self.layout) if history is not None else None
        return None if slots is None else slots.to(tokens.dtype)

    def window(self, tokens: torch.Tensor, history: History | None = None, n_soft: int = 0) -> torch.Tensor:
        """The window for token vectors [B, n, m], the last n_soft of them soft, after `history`: its summary
        slots, then `WindowBuilder` -> [B, A+S+n, m]."""
        return self.slots(self.summary(history, tokens), tokens, n_soft)

    def rollout_soft(self, summary: torch.Tensor | None, hard: torch.Tensor, n_soft: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The soft region as generation fills it in its first n_soft steps after a prompt (later in a generation,
        older tokens have left the soft region collapsed; noise only in training): after the window
        [summary][hard tokens [B, h, m]], each of n_soft steps feeds back the model's own soft token as a soft slot
        (`fill_slots`) -> the soft vectors [B, n_soft, m]."""
        window = self.slots(summary, hard, 0)
        feed = SoftFeed(self.soft_spec, noisy=self.training, collapse=None)  # a soft slot shows no token
        slots = torch.cat([window, window.new_zeros(window.shape[0], n_soft, window.shape[2])], dim=1)
        _, soft = fill_slots(self, slots, window.shape[1], n_soft, feed.filler(self, generator, hard.dtype),
                             last=True, encode=lambda v: self.slots.slot(v, SOFT), read_last_fill=False)
        return soft

    def fill_window(self, tokens: torch.Tensor, history: History | None = None, soft_fraction: float = 0.0,
                    soft_fill: str = "one_step") -> torch.Tensor:
        """The window for true token vectors [B, n, m] (n = the layout's token slots, or fewer; any n for a plain
        model) and their history -> [B, A+S+n, m], its soft slots filled with the model's own soft tokens.

        `soft_fill="rollout"` fills the soft region step by step, as generation does after a prompt (`rollout_soft`);
        `"one_step"` guesses every soft slot at once from the true tokens before it. Either way a first pass without
        gradients makes the soft tokens, and with `soft_fraction` > 0 it also puts one-step guesses at that random
        fraction of the other positions (never the first): parallel scheduled sampling."""
        n = tokens.shape[1]
        n_soft = min(self.layout.soft, n - 1)  # the first token is always given
        summary = self.summary(history, tokens)  # once for both passes
        if n_soft or soft_fraction > 0:
            pick = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            with torch.no_grad():
                guess = tokens
                if soft_fill == "one_step" and n_soft or soft_fraction > 0:
                    first = self.read(self.slots(summary, tokens, n_soft))
                    soft = make_soft_token(first, self.E, self.soft_spec)
                    if self.training:
                        soft = add_noise(self.soft_spec, soft, self.E, first.logits)
                    guess = torch.cat([tokens[:, :1], soft[:, :-1].to(tokens.dtype)], dim=1)  # t: guessed at t-1
                if soft_fraction > 0:
                    pick = torch.rand(tokens.shape[:2], device=tokens.device) < soft_fraction
                    pick[:, 0] = False
                if n_soft and soft_fill == "rollout":
                    rolled = self.rollout_soft(summary, tokens[:, : n - n_soft], n_soft)
                    guess = torch.cat([guess[:, : n - n_soft], rolled], dim=1)
            pick[:, n - n_soft :] = True
            tokens = torch.where(pick.unsqueeze(-1), guess, tokens)
        return self.slots(summary, tokens, n_soft)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, history: History | None = None,
                soft_fill: str = "rollout"):
        """x: token ids [B, n] (or token vectors [B, n, m]) and, with a layout, their history. Without targets:
        the logits of the token slots [B, n, V], the soft region filled by `soft_fill` (a real rollout unless told
        otherwise). With targets [B, n]: (loss, parts) of the training objective at the token slots, the soft region
        filled as `context.soft_fill` says; with `context.fill_draw` a batch may see a partly full hard region."""
        if self.thought_id is not None:  # a reasoning task: its targets are -1 up to <eot>
            return forward_thoughts(self, x)[0] if targets is None else task_loss(self, x, targets)
        if targets is not None:
            soft_fill = self.context_cfg.soft_fill
            if self.context_cfg.fill_draw and torch.rand(()) < self.context_cfg.fill_draw:
                hard = int(torch.randint(1, self.layout.hard, ()))  # tokens in the hard region, no history yet
                x, targets, history = x[:, -(hard + self.layout.soft) :], targets[:, -(hard + self.layout.soft) :], None
        vectors = x if x.is_floating_point() else F.embedding(x, self.E)  # its backward sums as nanoGPT's does
        soft_fraction = self.loss_cfg.soft_inputs if targets is not None else 0.0
        out = self.read(self.fill_window(vectors, history, soft_fraction, soft_fill))
        if targets is None:
            return out.logits
        return objective(out, targets, self.E, self.loss_cfg)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per predicted token: the network's per-position FLOPs over a full window (plus the slot
        encoder's matmuls), times window slots per token slot; a soft region or soft inputs add a first forward pass
        without gradients (a third of a training pass)."""
        lay, T = self.layout, self.window_slots
        per_slot = self.lm.flops_per_position(T) + 6 * sum(p.numel() for p in self.slots.parameters())
        two_pass = 4 / 3 if lay.soft or self.loss_cfg.soft_inputs > 0 else 1.0
        memory = self.memory.extra_passes(lay, self.context_cfg.segment_len) if self.memory is not None else 0.0
        return per_slot * T / lay.token_slots * (two_pass + memory)


def check_names(cfg: Config, heads: set[str] | None = None) -> None:
    """A ConfigError naming the key if a config names what no registry holds, or what cannot run on a model with
    these optional heads (default: those the config asks for; `softar.soft.tokens.heads_of`): the soft token and its
    noise (`soft.*`), the summary slots' memory (`context.memory`), the RL thought policy (`rl.policy`). The
    checks of every other key are `softar.config.validate`'s."""
    problem = spec_problem(cfg.soft, heads_of(cfg.model) if heads is None else heads) or \
        memory_problem(cfg.context, cfg.model.pos_emb, cfg.model.block_size)
    if problem is None and cfg.rl.policy not in thought_policies():
        problem = "rl.policy", f"expected one of {', '.join(map(repr, thought_policies()))}, got {cfg.rl.policy!r}"
    if problem:
        raise ConfigError(f"{problem[0]}: {problem[1]}")


def build_model(cfg: Config, lm: nn.Module | None = None) -> SoftAR:
    """The one place a model is built from a resolved config: softAR's GPT with fresh weights (checkpoints load
    into it), or the given VectorLM (a pretrained Hugging Face model, say) with a fresh window builder. The GPT and
    its window builder draw their initial weights in one fixed order, the one softAR has always used. With
    `model.hf` the network is that folder's pretrained model."""
    tokens = task_tokenizer(cfg) if cfg.task.name else None  # a task's ids of its markers (<thought>, ...)
    if lm is None and cfg.model.hf:
        from softar.model.hf import HFVectorLM

        lm = HFVectorLM.from_pretrained(cfg.model.hf, "model.hf", getattr(torch, cfg.model.dtype))
        if tokens is not None:  # the task's markers join its vocabulary
            lm.add_tokens(tokens, cfg.model.vocab_size)
        if cfg.model.lora_rank:
            lm.add_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
    if getattr(lm, "max_positions", cfg.model.block_size) < cfg.model.block_size:
        raise ConfigError(f"model.block_size: {cfg.model.block_size} is more than the {lm.max_positions} "
                          f"positions of the model in {cfg.model.hf}")
    if lm is None:
        check_names(cfg)
        model = SoftAR(GPT(cfg.model, init=False), cfg.model.block_size, cfg.context, cfg.soft, cfg.loss)
        model.lm.init_weights(model.slots)
    else:
        check_names(cfg, heads_of(lm))
        if MEMORIES[cfg.context.memory] is not None:  # a learned memory reads the GPT's own hidden states
            raise ConfigError(f"context.memory: {cfg.context.memory!r} is built for softAR's GPT, not a Hugging Face "
                              "model")
        model = SoftAR(lm, cfg.model.block_size, cfg.context, cfg.soft, cfg.loss)
        model.slots.apply(init_normal)
    if tokens is not None:
        model.thought_id = tokens.stoi["<thought>"]
    if cfg.rl.init_from and cfg.rl.policy == "gated":  # an RL run of HRPO's policy: its learned gate
        model.add_module(GATE, ThoughtGate(model.E.shape[1]).to(model.E.device))
    return model


def upgrade_param_name(name: str) -> str:
    """The key map for checkpoints written before SoftAR wrapped the network (the GPT at the top, e.g.
    'embed.weight'): the network's parameters move under 'lm.', the window builder's stay under 'slots.'."""
    return name if name.startswith(("lm.", "slots.", "memory.", GATE + ".")) else "lm." + name
