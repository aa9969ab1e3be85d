"""Training losses: pure functions of tensors, and the one objective that weighs them."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits [B, T, V] against targets [B, T] (-1: not scored), computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction, ignore_index=-1)


def regression_losses(y: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE (mean over positions of the squared L2 distance / m) and cosine loss (1 - cos) of y [B, T, m] against
    target embeddings [B, T, m]. The caller passes a stop-gradient or frozen target: never a live E row."""
    return {"mse": (y - target).pow(2).mean(), "cosine": (1 - F.cosine_similarity(y, target, dim=-1)).mean()}


def info_nce(y: torch.Tensor, E: torch.Tensor, targets: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Contrastive loss over the whole vocabulary: cross-entropy of cos(y, e_i) / T against the target id."""
    sims = F.normalize(y, dim=-1) @ F.normalize(E, dim=-1).T / temperature  # [B, T, V]
    return F.cross_entropy(sims.flatten(0, 1).float(), targets.flatten())


def log_bessel_iv(v: float, x: torch.Tensor) -> torch.Tensor:
    """log I_v(x) for x > 0 from its power series, summed in log space in float64 (differentiable):
    I_v(x) = sum_k (x/2)^(2k+v) / (k! Gamma(k+v+1)). The terms peak near k = x/2, so x + 100 terms suffice."""
    x = x.double()
    k = torch.arange(int(x.max().item()) + 100, dtype=torch.float64, device=x.device)
    log_terms = (2 * k + v) * torch.log(x.unsqueeze(-1) / 2) - torch.lgamma(k + 1) - torch.lgamma(k + v + 1)
    return torch.logsumexp(log_terms, dim=-1)


def vmf_nll(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """von Mises-Fisher negative log-likelihood (Kumar & Tsvetkov 2019) of the unit target direction under
    vMF(mean direction y / |y|, concentration |y|): -log C_m(|y|) - y . target_unit, with
    log C_m(k) = (m/2 - 1) log k - (m/2) log 2pi - log I_{m/2-1}(k)."""
    m = y.shape[-1]
    kappa = y.norm(dim=-1).clamp_min(1e-6)
    v = m / 2 - 1
    log_c = v * torch.log(kappa.double()) - (m / 2) * math.log(2 * math.pi) - log_bessel_iv(v, kappa)
    return (-log_c.to(y.dtype) - (y * F.normalize(target, dim=-1)).sum(-1)).mean()


def part_names(lc) -> list[str]:
    """The losses `objective` computes for a `LossConfig`, in the order it returns them."""
    names = ["ce"] if lc.ce else []
    names += ["mse", "cosine"] if lc.mse or lc.cosine else []
    return names + [name for name in ("infonce", "vmf", "collapse") if getattr(lc, name)]


def objective(out, targets: torch.Tensor, E: torch.Tensor, lc) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the configured losses (`LossConfig` weights; 0 switches one off) of a model's outputs
    at its token slots (`softar.model.Outputs`, [B, T, ...]) against next-token targets [B, T]. Returns (loss,
    parts), every part unweighted, in `part_names` order. Regression targets are stop-gradient: regression never
    pulls E towards itself."""
    target_emb = E[targets].detach()
    parts: dict[str, torch.Tensor] = {}
    if lc.ce:
        parts["ce"] = lm_loss(out.logits, targets)
    if lc.mse or lc.cosine:
        parts.update(regression_losses(out.y, target_emb))
    if lc.infonce:
        parts["infonce"] = info_nce(out.y, E, targets, lc.infonce_temperature)
    if lc.vmf:
        parts["vmf"] = vmf_nll(out.y, target_emb)
    if lc.collapse:
        parts["collapse"] = (out.c - target_emb).pow(2).mean()
    loss = sum(getattr(lc, name) * value for name, value in parts.items())
    return loss, parts


@torch.no_grad()
def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, lo: float = 1e-4, hi: float = 1e4,
                    iters: int = 60) -> float:
    """The temperature tau minimising the cross-entropy of softmax(logits / tau) on targets: logits [N, V], targets
    [N]. The loss is unimodal in log tau, so a golden-section search over [lo, hi] finds it without gradients; an
    optimum beyond the range returns its end (`at_bound` tells)."""
    logits, targets = logits.float(), targets.long()

    def loss(log_tau: float) -> float:
        return torch.nn.functional.cross_entropy(logits / float(np.exp(log_tau)), targets).item()

    a, b = np.log(lo), np.log(hi)
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2))
