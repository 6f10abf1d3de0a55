"""Per-token early exit of the loop (docs/architecture.md "Early exit"), in the training model and the HF export.

A token leaves the loop after the first iteration whose relative change ||h^(t+1) - h^(t)|| / ||h^(t)|| is below
`exit_threshold`; its state (and its MeSH buffer slots) is then carried unchanged. Thresholds per case are picked so
that the loop counts are mixed and no change lies within MARGIN of the threshold (checked), so float-order
differences between the two implementations cannot flip a decision."""

import math

import pytest
import torch

from export_cases import CASES, batch, model_state
from mesh_megatron.config import ModelConfig
from mesh_megatron.standalone.connections import EarlyExit, check_exit_threshold

K = 4  # loops run (trained K = 2: the extra ones reuse the last routers / gates)
THRESHOLDS = {"mesh": 0.4, "dynamic_comb": 0.6, "base": 0.6}
MARGIN = 1e-5
TOL = 1e-5


def training_model(case):
    from mesh_megatron.model import MeshGPTModel

    cfg = ModelConfig.from_dict(dict(CASES[case]))
    model = MeshGPTModel(cfg.replace(params_dtype="float32", hidden_dropout=0.0, attention_dropout=0.0))
    missing, unexpected = model.load_state_dict(model_state(CASES[case]), strict=False)
    assert not unexpected and all(m.endswith("_extra_state") for m in missing)
    return model.eval()


def run(model, ids, **kw):
    """-> (full logits, record dict)."""
    record = []
    with torch.no_grad():
        logits = model.gather_logits(model(ids, record=record, **kw))
    return logits, dict(record)


def check_margin(changes: dict, loops: torch.Tensor, threshold: float):
    """Every decision taken (tokens still in the loop at t) is at least MARGIN away from the threshold."""
    for t in range(K):
        live = loops > t
        if f"exit_change.{t}" in changes and live.any():
            assert (changes[f"exit_change.{t}"][live] - threshold).abs().min().item() > MARGIN, t


@pytest.fixture(scope="module")
def exports(single_process, tmp_path_factory):
    from mesh_tools.hf.export import export_model

    root = tmp_path_factory.mktemp("early_exit")
    for case in THRESHOLDS:
        export_model(ModelConfig.from_dict(dict(CASES[case])), model_state(CASES[case]), root / case, tokenizer=None)
    return root


def load(root, case, **kw):
    from mesh_tools.hf.export import load_export

    return load_export(root / case, **kw)


# --- the exit mask ---------------------------------------------------------------------------------------------------


def test_exit_mask_on_known_changes():
    """Synthetic states with known per-token relative changes: each token exits after the first iteration below the
    threshold and stays out (token 2 dips below, then rises: still out), token 3 never converges; exited tokens'
    states are carried unchanged, the others' are updated."""
    change = torch.tensor([  # [iteration, token]: the relative change each token would make
        [0.5, 0.05, 0.5, 0.5],
        [0.05, 0.5, 0.05, 0.5],
        [0.5, 0.5, 0.5, 0.5],
        [0.05, 0.05, 0.5, 0.5],
    ])
    exits = EarlyExit(0.1, torch.ones(4, 3))
    h = torch.randn(4, 3)
    for t in range(4):
        h_new = h * (1 + change[t, :, None])
        was_out = exits.exited.clone()
        out = exits.step(h, h_new)
        torch.testing.assert_close(exits.change, change[t], rtol=1e-5, atol=0)
        assert torch.equal(out[was_out], h[was_out]) and torch.equal(out[~was_out], h_new[~was_out])
        assert (exits.exited >= was_out).all()  # monotone
        h = out
    assert exits.loops.tolist() == [2, 1, 2, 4]
    assert exits.exited.tolist() == [True, True, True, False]


def test_threshold_switch():
    assert check_exit_threshold(None) is None and check_exit_threshold(0) is None and check_exit_threshold(0.0) is None
    assert check_exit_threshold(0.5) == 0.5 and check_exit_threshold(math.inf) == math.inf
    for bad in (-0.1, math.nan):
        with pytest.raises(ValueError, match="exit_threshold"):
            check_exit_threshold(bad)


@pytest.mark.parametrize("case", ["mesh", "base"])
def test_training_model_exit_mask(single_process, case):
    """loops_per_token = 1 + the first iteration whose recorded change is below the threshold (else K), per token;
    an exited token's loop state is carried exactly; the counts are mixed (the test is not vacuous)."""
    model, ids, thr = training_model(case), batch(), THRESHOLDS[case]
    _, rec = run(model, ids, num_loops=K, exit_threshold=thr)
    loops = rec["loops_per_token"]
    assert loops.shape == ids.shape
    check_margin(rec, loops, thr)
    ran = sum(f"exit_change.{t}" in rec for t in range(K))
    assert ran == K  # with a record every iteration runs (the probe reads them); without, it stops once all are out
    expected = torch.full_like(loops, K)
    for t in reversed(range(ran)):  # changes of already-exited tokens are ignored: first crossing wins
        expected = torch.where(rec[f"exit_change.{t}"] < thr, t + 1, expected)
    assert torch.equal(loops, expected)
    assert len(loops.unique()) >= 3
    for t in range(1, ran):
        out = (loops <= t).t()  # [s, b] as the recorded states
        assert torch.equal(rec[f"h_loop.{t + 1}"][out], rec[f"h_loop.{t}"][out])
        if (~out).any():
            assert not torch.equal(rec[f"h_loop.{t + 1}"][~out], rec[f"h_loop.{t}"][~out])
    print(f"{case}: threshold {thr}, average loops per token {loops.float().mean():.2f} of {K}")


@pytest.mark.parametrize("case", ["mesh", "dynamic_comb"])
def test_off_and_never_exiting_equal_todays_outputs(single_process, case):
    """None and 0 are off: today's logits exactly. A tiny threshold runs the dense early-exit path without any exit:
    still exactly today's logits (the carried-state selection is exact), every token K loops."""
    model, ids = training_model(case), batch()
    today, _ = run(model, ids, num_loops=K)
    for thr in (None, 0):
        assert torch.equal(run(model, ids, num_loops=K, exit_threshold=thr)[0], today)
    never, rec = run(model, ids, num_loops=K, exit_threshold=1e-30)
    assert torch.equal(never, today) and (rec["loops_per_token"] == K).all()


@pytest.mark.parametrize("case", ["mesh", "dynamic_comb"])
def test_infinite_threshold_is_one_loop(single_process, exports, case):
    """inf: every token exits after the first iteration, so K=4 gives the K=1 model's logits (training model: the
    loop stops; HF model with a cache: the later iterations still run on the carried states, changing nothing)."""
    model, ids = training_model(case), batch()
    one, _ = run(model, ids, num_loops=1)
    got, rec = run(model, ids, num_loops=K, exit_threshold=math.inf)
    assert torch.equal(got, one) and (rec["loops_per_token"] == 1).all()
    hf = load(exports, case, num_loops=K, exit_threshold=math.inf)
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
    assert (out.logits - one).abs().max().item() < TOL and (out.loops_per_token == 1).all()
    assert len(out.past_key_values.layers) == hf.config.prelude_layers + hf.config.core_layers * K + hf.config.coda_layers


# --- the exported model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mesh", "dynamic_comb", "base"])
def test_export_parity_with_early_exit_off_and_on(single_process, exports, case):
    """Same per-token loop counts and logits within 1e-5, training model vs HF export, early exit off and on; the
    threshold given at load time and per call are the same."""
    model, ids, thr = training_model(case), batch(), THRESHOLDS[case]
    hf = load(exports, case, num_loops=K)
    for threshold in (None, thr):
        ref, rec = run(model, ids, num_loops=K, exit_threshold=threshold)
        with torch.no_grad():
            out = hf(input_ids=ids, use_cache=False, exit_threshold=threshold)
        diff = (out.logits - ref).abs().max().item()
        print(f"{case} threshold {threshold}: max |logits diff| {diff:.2e}")
        assert diff < TOL
        if threshold is None:
            assert (out.loops_per_token == K).all()
        else:
            check_margin(rec, rec["loops_per_token"], thr)
            assert torch.equal(out.loops_per_token, rec["loops_per_token"])
            assert len(out.loops_per_token.unique()) >= 2
    hf_at_load = load(exports, case, num_loops=K, exit_threshold=thr)
    assert hf_at_load.config.exit_threshold == thr
    with torch.no_grad():
        assert torch.equal(hf_at_load(input_ids=ids, use_cache=False).logits, out.logits)
        # 0 per call turns it off for that call
        assert (hf_at_load(input_ids=ids, use_cache=False, exit_threshold=0).loops_per_token == K).all()


@pytest.mark.parametrize("case", ["mesh", "dynamic_comb"])
def test_kv_cache_decoding_equals_full_forward_with_early_exit(exports, case):
    """Prefill then token-by-token decoding with the cache gives the full forward's logits and loop counts: the
    cache holds, in every applied layer's slot, the K/V of each token's carried state."""
    from transformers import DynamicCache

    model = load(exports, case, num_loops=K, exit_threshold=THRESHOLDS[case])
    ids = batch(seq=16)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False)
        out = model(input_ids=ids[:, :8], past_key_values=DynamicCache(), use_cache=True)
        logits, loops = [out.logits], [out.loops_per_token]
        for i in range(8, 16):
            out = model(input_ids=ids[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
            loops.append(out.loops_per_token)
    assert torch.equal(torch.cat(loops, 1), full.loops_per_token)
    assert len(full.loops_per_token[:, 8:].unique()) >= 2  # decoded tokens exit at different depths
    assert (torch.cat(logits, 1) - full.logits).abs().max().item() < TOL


def test_generate_reports_average_loops(exports):
    """generate() with early exit: with and without the cache agree, per call == at load, and the model reports the
    average loops per (non-padding) token over the generation."""
    ids = batch(seq=6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = load(exports, "mesh", num_loops=K, exit_threshold=THRESHOLDS["mesh"])
    model.model.reset_exit_stats()
    with_cache = model.generate(ids, use_cache=True, **kw)
    avg = model.model.average_loops_per_token
    # prefill 2x6 tokens, then 5 decoding steps of 2 tokens (the 6th new token is never fed back)
    assert int(model.model.exit_stats["tokens"]) == 2 * 6 + 2 * 5
    assert 1 <= avg < K
    assert torch.equal(with_cache, model.generate(ids, use_cache=False, **kw))
    per_call = load(exports, "mesh", num_loops=K).generate(ids, exit_threshold=THRESHOLDS["mesh"], **kw)
    assert torch.equal(per_call, with_cache)
    print(f"mesh generate: average loops per token {avg:.2f} of {K}")


def test_hf_rejects_bad_threshold(exports):
    from mesh_megatron.standalone.configuration_mesh_gpt import MeshGPTConfig

    with pytest.raises(ValueError, match="exit_threshold"):
        MeshGPTConfig(exit_threshold=-1.0)
    model = load(exports, "mesh", exit_threshold=-1.0)  # a load-time override is checked when it is used
    with pytest.raises(ValueError, match="exit_threshold"), torch.no_grad():
        model(input_ids=batch(seq=4))
