"""Single-process model tests (TP=1): MeSH equations, routers, loops, recompute, sharding table."""

import pytest
import torch

from mesh_megatron.config import ConfigError, ModelConfig
from mesh_megatron.tp_shards import merge_tp_state_dicts, split_state_dict, tp_partition_dim

REC = dict(hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=250, make_vocab_size_divisible_by=64,
           prelude_layers=1, core_layers=2, num_loops=2, coda_layers=1, scale_embeddings=True)


def build(seed=0, **kw):
    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import set_seed

    set_seed(seed)
    return MeshGPTModel(ModelConfig.from_dict({**REC, **kw}))


def ids(b=2, s=16, seed=3):
    return torch.randint(0, 250, (b, s + 1), generator=torch.Generator().manual_seed(seed))


def e(*slots, n=5):
    v = torch.zeros(n)
    v[list(slots)] = 1.0
    return v


# Buffer plumbing: with fixed (forced) per-slot weights, MeSH's write/read equations reproduce the fixed heuristics
# bit for bit. Residual stays inside the softmax's reach (one-hot weights); anchor / anchor* need a read weight sum
# of 2 (anchor slot + fresh slot), i.e. they are limits the softmax router can only approach (spec §2.7).
FORCED = {
    "residual": {0: (e(1), e(1)), 1: (e(1), e(1)), 2: (e(1), e(1))},
    "anchor": {0: (e(1), e(1)), 1: (e(2), e(1, 2)), 2: (e(3), e(1, 3))},
    "anchor_star": {0: (e(1), e(1)), 1: (e(2), e(0, 2)), 2: (e(3), e(0, 3))},
}


@pytest.mark.parametrize("heuristic", list(FORCED))
def test_forced_mesh_reproduces_heuristic_exactly(single_process, heuristic):
    ref = build(arch="recursive", connection=heuristic).eval()
    mesh = build(arch="mesh").eval()
    missing, unexpected = mesh.load_state_dict(ref.state_dict(), strict=False)
    assert all(k.startswith("connection.") for k in missing) and not unexpected
    mesh.connection.forced_weights = FORCED[heuristic]
    x = ids()[:, :-1]
    with torch.no_grad():
        assert torch.equal(mesh(x), ref(x))
        # ...and the softmax routers really are a different function.
        mesh.connection.forced_weights = None
        assert not torch.allclose(mesh(x), ref(x))


def test_mesh_equations_by_hand(single_process):
    """Recompute the MeSH forward step by step from the spec's pseudocode and compare."""
    import math

    m = build(arch="mesh").eval()
    x = ids()[:, :-1]
    c = m.connection
    with torch.no_grad():
        h_emb = m.embed(x).transpose(0, 1) * math.sqrt(64)
        from mesh_megatron.layers import rotary_freqs

        fr = rotary_freqs(m.cfg, x.shape[1], x.device)
        mem = [h_emb] + [torch.zeros_like(h_emb) for _ in range(4)]

        def cycle(i, q, v):
            ww = torch.softmax(c.write_routers[i](q), -1)
            wr = torch.softmax(c.read_routers[i](q), -1)
            for b in range(5):
                mem[b] = mem[b] + v * ww[..., b : b + 1]
            return sum(mem[b] * wr[..., b : b + 1] for b in range(5))

        h_pre = m.prelude(h_emb, fr)
        h = cycle(0, h_pre, h_pre)
        for t in range(2):
            h = cycle(t + 1, h, m.core(h, fr))
        logits, _ = m.lm_head(m.final_ln(m.coda(h, fr)))
        torch.testing.assert_close(m(x), logits.transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_every_router_gets_gradient(single_process):
    m = build(arch="mesh")
    x = ids()
    m(x[:, :-1], x[:, 1:]).mean().backward()
    routers = [(n, p) for n, p in m.named_parameters() if "router" in n]
    assert len(routers) == 2 * 3 * 2  # (K+1) write + read routers, weight + bias
    for n, p in routers:
        if n.endswith("weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_core_weights_exist_once(single_process):
    m = build(arch="mesh")
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.startswith("core.") for n in names) == 2 * len([n for n in names if n.startswith("prelude.0.")])
    assert not any("loop" in n for n in m.state_dict())
    # The shared core gathers gradient from every loop: its gradient changes with K.
    x = ids()
    grads = []
    for k in (1, 3):
        m.zero_grad()
        m(x[:, :-1], x[:, 1:], num_loops=k).mean().backward()
        grads.append(m.core[0].attn.qkv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("arch, connection", [("mesh", "base"), ("recursive", "anchor"), ("recursive", "dynamic_comb")])
def test_num_loops_changed_at_inference(single_process, arch, connection):
    m = build(arch=arch, connection=connection).eval()
    x = ids()[:, :-1]
    with torch.no_grad():
        outs = {k: m(x, num_loops=k) for k in (1, 2, 5)}
    for k, o in outs.items():
        assert torch.isfinite(o).all(), k
    assert not torch.allclose(outs[1], outs[2]) and not torch.allclose(outs[2], outs[5])
    with pytest.raises(ValueError, match="num_loops"):
        m(x, num_loops=0)


def test_tiny_model_overfits_one_batch(single_process):
    m = build(arch="mesh")
    x = ids(b=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        loss = m(x[:, :-1], x[:, 1:]).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0 and loss.item() < 0.5, (first, loss.item())


@pytest.mark.parametrize("recompute", ["loop", "layer"])
def test_activation_recompute_is_exact(single_process, recompute):
    x = ids()
    out = {}
    for r in ("none", recompute):
        m = build(arch="mesh", recompute=r)
        loss = m(x[:, :-1], x[:, 1:]).mean()
        loss.backward()
        out[r] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    assert torch.equal(out["none"][0], out[recompute][0])
    for n, g in out["none"][1].items():
        torch.testing.assert_close(out[recompute][1][n], g, atol=0, rtol=0)


def test_sequence_parallel_is_off_at_tp1(single_process):
    # TP=1 turns sequence parallelism off (nothing to split). The TP=2 refusal on CPU is tested in
    # test_tensor_parallel.py::test_sequence_parallel_refused_on_cpu_at_tp2.
    m = build(arch="mesh", sequence_parallel=True)
    assert not m.sequence_parallel


def test_tp_split_table_matches_megatron_attributes(single_process):
    m = build(arch="mesh")
    for name, p in m.named_parameters():
        expected = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert tp_partition_dim(name) == expected, name


def test_split_merge_round_trip(single_process):
    sd = build(arch="mesh").state_dict()
    shards = [split_state_dict(sd, 2, r) for r in range(2)]
    assert shards[0]["embed.weight"].shape[0] == sd["embed.weight"].shape[0] // 2
    full = merge_tp_state_dicts(shards)
    for k, v in full.items():
        assert torch.equal(v, sd[k]), k
    shards[1]["final_ln.weight"] = shards[1]["final_ln.weight"] + 1
    with pytest.raises(ValueError, match="final_ln.weight"):
        merge_tp_state_dicts(shards)


def test_model_build_checks_tp_divisibility(single_process):
    cfg = ModelConfig.from_dict({**REC, "arch": "mesh", "num_attention_heads": 2, "hidden_size": 64})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        cfg.validate_parallel(4)


def test_fused_write_read_equals_plain(single_process):
    """The one-pass write/read (Eq. 6 form) is the plain write-then-read, values and gradients."""
    from mesh_megatron.standalone.mesh import read, write, write_read

    g = torch.Generator().manual_seed(0)
    mem = torch.randn(5, 7, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    val = torch.randn(7, 2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ww = torch.softmax(torch.randn(7, 2, 5, generator=g, dtype=torch.float64), -1).requires_grad_()
    wr = torch.softmax(torch.randn(7, 2, 5, generator=g, dtype=torch.float64), -1).requires_grad_()
    new_plain = write(mem, val, ww)
    h_plain = read(new_plain, wr)
    new_fused, h_fused = write_read(mem, val, ww, wr)
    torch.testing.assert_close(h_fused, h_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_fused, new_plain, rtol=0, atol=0)
    gp = torch.autograd.grad((h_plain.sin().sum() + new_plain.cos().sum()), (mem, val, ww, wr))
    gf = torch.autograd.grad((h_fused.sin().sum() + new_fused.cos().sum()), (mem, val, ww, wr))
    for a, b in zip(gp, gf):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert write_read(mem, val, ww, wr, need_buffer=False)[0] is None


def test_keep_heap_on_cpu_applies_on_linux():
    import sys

    from pretrain.cpu_malloc import keep_heap_on_cpu

    assert keep_heap_on_cpu() is sys.platform.startswith("linux")


def test_build_connection_refuses_unknown_names():
    """The shared factory checks its input (an exported config or a caller may pass any string)."""
    from mesh_megatron.standalone.connections import build_connection

    with pytest.raises(ValueError, match="unknown connection 'anchr'"):
        build_connection("recursive", "anchr", 16, 2)
    with pytest.raises(ValueError, match="needs num_slots"):
        build_connection("mesh", "base", 16, 2)
    with pytest.raises(ValueError, match="arch must be"):
        build_connection("vanilla", "base", 16, 2)
    assert type(build_connection("recursive", "residual+anchor", 16, 2)).__name__ == "SupplementConnection"
