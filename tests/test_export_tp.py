"""A model trained with tensor parallelism 2: its two TP shards are merged (mesh_megatron.tp_shards) into one full
state dict, exported, and the export's logits match the TP=1 training-side model's (fp32 CPU, < 1e-4).

(The full checkpoint path, TP=2 + ZeRO-3 DeepSpeed checkpoints through `mesh-export --checkpoint`, is in
tests/test_export_cli.py.)"""

from pathlib import Path

import pytest
import torch

from export_cases import CASES, batch, model_state
from export_tp_worker import TP_CASES
from mesh_megatron.config import ModelConfig
from mesh_tools.hf.export import export_model, load_export, reference_logits
from mesh_megatron.tp_shards import merge_tp_state_dicts
from conftest import run_torchrun

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tp2_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp2_export")
    run_torchrun("export_tp_worker.py", out, nproc=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("case", TP_CASES)
def test_tp2_checkpoint_exports_with_parity(single_process, tp2_shards, tmp_path, case):
    cfg = ModelConfig.from_dict(dict(CASES[case]))
    shards = [tp2_shards[0][case], tp2_shards[1][case]]
    assert shards[0]["lm_head.weight"].shape[0] == cfg.padded_vocab_size // 2  # really sharded
    full = merge_tp_state_dicts(shards)
    tp1 = model_state(CASES[case])
    assert set(full) == set(tp1) and all(torch.equal(full[k], tp1[k]) for k in full)  # same full weights
    export_model(cfg, full, tmp_path / case, tokenizer=None)
    ids = batch()
    ref = reference_logits(cfg, tp1, ids)
    with torch.no_grad():
        got = load_export(tmp_path / case)(input_ids=ids, use_cache=False).logits
    diff = (got - ref).abs().max().item()
    print(f"{case} (TP=2 shards): max |logits diff| = {diff:.2e}")
    assert diff < 1e-4
