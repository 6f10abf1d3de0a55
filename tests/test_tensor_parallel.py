"""Tensor parallel 2 (two gloo processes) vs 1 (this process): same logits, per-token loss and gradients at the
first step and the same losses over 3 AdamW steps, for every architecture; replicated parameters (LayerNorms, routers) stay bit-identical across TP ranks.

Tolerance (fp32): TP changes only the summation order of the split matmuls and of the all-reduce, so logits and
losses agree to 1e-5 absolute and gradients to 1e-4 relative to their largest entry.
"""

from pathlib import Path

import pytest
import torch

from mesh_megatron.tp_shards import merge_tp_state_dicts
from tp_cases import CASES, SP_CASES, run_case
from conftest import run_torchrun

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2")
    run_torchrun("tp_worker.py", out, nproc=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def assert_tp2_matches(ref: dict, r0: dict, r1: dict) -> None:
    """Both TP ranks' logits, per-token losses and step losses match TP=1, and their merged gradients too."""
    for r in (r0, r1):
        torch.testing.assert_close(r["logits"], ref["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(r["token_loss"], ref["token_loss"], atol=1e-5, rtol=0)
        assert r["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    grads = merge_tp_state_dicts([r0["grads"], r1["grads"]])
    assert set(grads) == set(ref["grads"])
    for name, g in ref["grads"].items():
        scale = g.abs().max().clamp_min(1e-12)
        assert (grads[name] - g).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(single_process, tp2_results, case):
    ref = run_case(CASES[case])
    r0, r1 = tp2_results[0][case], tp2_results[1][case]
    assert_tp2_matches(ref, r0, r1)
    # The losses must actually move, or the comparison above proves little.
    assert ref["losses"][-1] < ref["losses"][0]


@pytest.mark.parametrize("case", ["mesh", "dynamic_comb", "static_comb"])
def test_replicated_params_identical_across_tp_ranks(tp2_results, case):
    a, b = tp2_results[0][case]["replicated"], tp2_results[1][case]["replicated"]
    assert any(n.startswith("connection.") for n in a)  # the routers / gates are among them
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_sequence_parallel_refused_on_cpu_at_tp2(tp2_results):
    """Without a GPU megatron-core cannot allocate its sequence-parallel buffers: a readable refusal."""
    assert "model.sequence_parallel" in tp2_results[0]["seqpar_error"] and "CUDA" in tp2_results[0]["seqpar_error"]


# --- sequence parallelism (run on CPU through tests/sp_cpu.py: megatron-core's own collectives on gloo) ----------------


@pytest.mark.parametrize("case", list(SP_CASES))
def test_tp2_sequence_parallel_matches_tp1(single_process, tp2_results, case):
    """TP=2 with the sequence split over the ranks computes the TP=1 model: logits, per-token loss, every gradient
    (the replicated parameters' summed over the ranks' sequence slices) and 3 AdamW steps; replicated parameters stay
    bit-identical across the ranks."""
    ref = run_case(SP_CASES[case])
    r0, r1 = tp2_results[0][f"sp:{case}"], tp2_results[1][f"sp:{case}"]
    assert_tp2_matches(ref, r0, r1)
    for n in r0["replicated"]:
        assert torch.equal(r0["replicated"][n], r1["replicated"][n]), n


def test_sequence_parallel_hidden_dropout_masks_differ_per_rank(tp2_results):
    """Replicated activations get one mask on every TP rank; sequence slices get one mask per rank (the TP stream)."""
    masks = tp2_results[0]["sp_dropout_masks"]
    rep, sp = masks["replicated"], masks["sequence_parallel"]
    assert set(rep.unique().tolist()) == {0.0, 2.0, 4.0}  # x + drop(1) + drop(1), p = 0.5: the masks are visible
    assert torch.equal(rep[0], rep[1])
    assert not torch.equal(sp[0], sp[1])


def test_sequence_parallel_sums_replicated_grads_in_one_all_reduce(tp2_results):
    """One flat all-reduce per backward for all replicated parameters (LayerNorms, routers, row-parallel biases), not
    one per parameter."""
    assert tp2_results[0]["sp_backward_all_reduces"] == 1
