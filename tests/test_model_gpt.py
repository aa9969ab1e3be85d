import math

import pytest
import torch
import torch.nn.functional as F

from softar.config import ModelConfig, SoftConfig
from softar.model import VectorLM
from softar.soft.model import SoftAR

from .conftest import decoding, soft_model


def make(pos_emb="learned", d_embed=0, bias=False, block_size=16, seed=0, **extra) -> SoftAR:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, d_embed=d_embed or 32, block_size=block_size,
                      vocab_size=23, bias=bias, pos_emb=pos_emb, **extra)
    return soft_model(cfg).eval()


def cached_logits(model: SoftAR, ids, cache):
    return model.lm.heads(model.lm.hidden(model.E[ids], cache=cache)).logits


def test_gpt_implements_the_interface():
    assert isinstance(make().lm, VectorLM)


def naive_layers(model: SoftAR, vectors: torch.Tensor) -> list[torch.Tensor]:
    """An independent GPT forward, written out position by position from the model's weights (nanoGPT's math:
    pre-LayerNorm blocks, causal softmax attention, GELU MLP, learned or rotary positions): the residual stream
    after 0 .. n_layer blocks [B, T, d]."""
    c, sd = model.lm.cfg, {k.removeprefix("lm."): v for k, v in model.state_dict().items()}
    B, T, _ = vectors.shape
    H, hd = c.n_head, c.d_model // c.n_head

    def ln(x, name):
        return F.layer_norm(x, (c.d_model,), sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def linear(x, name):
        return x @ sd[f"{name}.weight"].T + sd.get(f"{name}.bias", 0)

    def rotate(x):  # x [B, T, H, hd]: each (even, odd) pair of coordinates turned by position * base^(-2i/hd)
        out = x.clone()
        for t in range(T):
            for i in range(hd // 2):
                a = t * c.rope_base ** (-2 * i / hd)
                u, v = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
                out[:, t, :, 2 * i], out[:, t, :, 2 * i + 1] = u * math.cos(a) - v * math.sin(a), \
                    u * math.sin(a) + v * math.cos(a)
        return out

    h = linear(vectors, "backbone.in_proj") if c.m != c.d_model else vectors
    if c.pos_emb == "learned":
        h = h + sd["backbone.wpe.weight"][:T]
    layers = [h]
    for layer in range(c.n_layer):
        p = f"backbone.blocks.{layer}"
        q, k, v = linear(ln(h, f"{p}.ln1"), f"{p}.attn.qkv").view(B, T, 3, H, hd).unbind(2)
        if c.pos_emb == "rope":
            q, k = rotate(q), rotate(k)
        att = torch.zeros(B, T, H, hd)
        for t in range(T):  # position t attends to 0..t
            w = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1]) / math.sqrt(hd)
            att[:, t] = torch.einsum("bhs,bshd->bhd", w.softmax(-1), v[:, : t + 1])
        h = h + linear(att.reshape(B, T, c.d_model), f"{p}.attn.proj")
        h = h + linear(F.gelu(linear(ln(h, f"{p}.ln2"), f"{p}.mlp.fc")), f"{p}.mlp.proj")
        layers.append(h)
    return layers


def naive_logits(model: SoftAR, vectors: torch.Tensor) -> torch.Tensor:
    sd, c = model.lm.state_dict(), model.lm.cfg
    last = F.layer_norm(naive_layers(model, vectors)[-1], (c.d_model,), sd["backbone.ln_f.weight"],
                        sd.get("backbone.ln_f.bias"))
    h_m = last @ sd["lm_head.out_proj.weight"].T if c.m != c.d_model else last
    return h_m @ model.E.T  # the tied LM head


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("d_embed", [32, 12])
@pytest.mark.parametrize("bias", [False, True])
def test_the_forward_equals_a_naive_gpt_written_out_position_by_position(pos_emb, d_embed, bias):
    model = make(pos_emb, d_embed, bias=bias)
    ids = torch.randint(0, 23, (3, 10))
    with torch.no_grad():
        expected = naive_logits(model, model.E[ids])
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-5)  # ids in: E[ids] is the vector path
        soft = torch.randn(3, 10, d_embed)  # any vectors enter the same way
        torch.testing.assert_close(model.step(soft).logits, naive_logits(model, soft), rtol=1e-4, atol=1e-5)


def test_causality():
    model = make()
    ids = torch.randint(0, 23, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 23
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_param_count_and_flops_match_nanogpt_formula():
    model = make(bias=True)
    c = model.lm.cfg
    d, L, V, T = c.d_model, c.n_layer, c.vocab_size, c.block_size
    per_block = (4 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = V * d + T * d + L * per_block + 2 * d
    assert model.num_params() == model.lm.num_params() == expected
    assert model.flops_per_token() == 6 * (expected - T * d) + 12 * L * d * T


def test_rope_attention_depends_on_relative_positions_only():
    model = make("rope")
    x = model.E[torch.randint(0, 23, (1, 8))]
    a = model.lm.hidden(x, torch.arange(8)).last
    b = model.lm.hidden(x, torch.arange(100, 108)).last
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_kv_cache_matches_full_forward(pos_emb):
    model = make(pos_emb)
    ids = torch.randint(0, 23, (2, 14))
    full = model(ids)
    cache = model.lm.new_cache(2, 16)
    parts = [cached_logits(model, ids[:, :5], cache)]  # a prefill, then one token at a time, then a chunk
    parts += [cached_logits(model, ids[:, t : t + 1], cache) for t in range(5, 10)]
    parts.append(cached_logits(model, ids[:, 10:], cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.len == 14


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_greedy_generation_with_cache_equals_without(pos_emb):
    torch.manual_seed(0)
    model = make(pos_emb, block_size=8)
    with torch.no_grad():  # sharpen the random model so greedy choices are far from ties
        model.E.mul_(40)
    prompt = torch.randint(0, 23, (2, 3))
    dec = decoding(temperature=0, max_new_tokens=40)  # 40 > block_size: the window slides
    cached = dec.run(model, prompt, use_cache=True).full()
    plain = dec.run(model, prompt, use_cache=False).full()
    assert torch.equal(cached, plain)
    assert cached.shape == (2, 43) and torch.equal(cached[:, :3], prompt)


def test_sampling_is_seeded_and_top_k_restricts():
    model = make()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    run = lambda seed, k: decoding(top_k=k, max_new_tokens=30).run(model, prompt, seed=seed).full()  # noqa: E731
    assert torch.equal(run(1, 0), run(1, 0))
    assert not torch.equal(run(1, 0), run(2, 0))
    with torch.no_grad():
        top1 = model(prompt)[0, -1].argmax()
    assert run(3, 1)[0, 1] == top1  # top-k 1 is greedy


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = make().train()
    ids = torch.randint(0, 23, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("soft_kind, collapse_kind", [("expected", "nn_l2"), ("gated", "lm_sample"),
                                                      ("hidden", "sample_sim"), ("regress", "head"),
                                                      ("moi", "lm_sample")])
def test_soft_generation_is_seeded_and_cache_exact(soft_kind, collapse_kind):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, d_embed=12, block_size=8, vocab_size=23, vector_head=True,
                      collapse_head=True)
    model = soft_model(cfg).eval()
    with torch.no_grad():
        model.E.mul_(40)
    dec = decoding(mode="soft", temperature=1.0, collapse=collapse_kind, max_new_tokens=20,
                   soft=SoftConfig(kind=soft_kind, noise="gaussian" if soft_kind == "gated" else "none",
                                   noise_scale=0.1))
    prompt = torch.randint(0, 23, (2, 3))

    def run(seed, cached):
        return dec.run(model, prompt, seed=seed, use_cache=cached, return_vectors=True)

    g = run(5, True)
    a = g.full()
    assert torch.equal(a, run(5, True).full()) and a.shape == (2, 23) and g.vectors.shape == (2, 20, 12)
    if soft_kind in ("expected", "hidden", "regress") and collapse_kind in ("nn_l2", "head"):
        assert torch.equal(a, run(5, False).full())  # deterministic choices: the cache changes nothing


@pytest.mark.parametrize("layer, mix", [(-1, False), (0, False), (1, False), (2, False), (-1, True)])
def test_collapse_head_reads_the_chosen_layer_or_a_learned_mix(layer, mix):
    """The collapse head's output against the naive forward's residual stream: the chosen layer (the last one after
    the final LayerNorm for -1), or the softmax-weighted mix of all of them, through the head's MLP written out."""
    model = make(collapse_head=True, collapse_layer=layer, collapse_mix=mix)
    sd, c = model.lm.state_dict(), model.lm.cfg
    x = model.E[torch.randint(0, 23, (2, 6))]
    out = model.step(x)
    layers = naive_layers(model, x)  # the residual stream after 0, 1, 2 blocks
    if mix:
        read = sum(w * h for w, h in zip(sd["layer_mix"].softmax(0), layers, strict=True))
    elif layer == -1:
        read = F.layer_norm(layers[-1], (c.d_model,), sd["backbone.ln_f.weight"], sd.get("backbone.ln_f.bias"))
    else:
        read = layers[layer]
    net = "collapse_head.net"
    hidden = F.gelu(F.layer_norm(read, (c.d_model,), sd[f"{net}.0.weight"], sd[f"{net}.0.bias"])
                    @ sd[f"{net}.1.weight"].T + sd[f"{net}.1.bias"])
    torch.testing.assert_close(out.c, hidden @ sd[f"{net}.3.weight"].T + sd[f"{net}.3.bias"], rtol=1e-4, atol=1e-5)
    if mix:  # the mix is learned
        out.c.sum().backward()
        assert model.lm.layer_mix.grad is not None and model.lm.layer_mix.grad.abs().sum() > 0
