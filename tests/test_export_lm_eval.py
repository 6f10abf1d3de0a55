"""EleutherAI's lm-evaluation-harness (the real `lm_eval` package, pinned in the dev extras) runs an exported tiny
MeSH model (custom code, SentencePiece tokenizer) on a small local multiple-choice task, fully offline, reports a
number, and its per-choice log-likelihoods equal the training-side model's on the same tokens."""

import json
import math
from pathlib import Path

import pytest
import torch

from mesh_megatron.config import ModelConfig
from mesh_tools.hf.export import export_model
from mesh_tools.hf.tokenizer import TokenizerSource

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny_export(single_process, tmp_path_factory):
    import sentencepiece as spm

    from export_cases import model_state

    root = tmp_path_factory.mktemp("lmeval")
    spm.SentencePieceTrainer.train(input=str(DATA / "export_corpus.txt"), model_prefix=str(root / "sp"), vocab_size=256, minloglevel=2)
    c = dict(arch="mesh", prelude_layers=1, core_layers=1, num_loops=2, coda_layers=1, hidden_size=32, num_attention_heads=2,
             vocab_size=256, make_vocab_size_divisible_by=64, seq_length=128, scale_embeddings=True, name="tiny-mesh-lmeval")
    cfg = ModelConfig.from_dict(c)
    sd = model_state(c)
    export_model(cfg, sd, root / "model", tokenizer=TokenizerSource("sentencepiece", root / "sp.model"))
    return cfg, sd, root


def test_lm_eval_runs_offline_and_matches_training_model(tiny_export, monkeypatch):
    import sentencepiece as spm

    cfg, sd, root = tiny_export
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "datasets_cache"))
    task_dir = root / "tasks"
    task_dir.mkdir()
    yaml_text = (DATA / "lm_eval" / "mesh_tiny_cloze.yaml").read_text()
    yaml_text = yaml_text.replace("test: mesh_tiny_cloze.jsonl", f"test: {DATA / 'lm_eval' / 'mesh_tiny_cloze.jsonl'}")
    (task_dir / "mesh_tiny_cloze.yaml").write_text(yaml_text)

    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={root / 'model'},trust_remote_code=True,dtype=float32",
        tasks=["mesh_tiny_cloze"],
        task_manager=TaskManager(include_path=str(task_dir)),
        device="cpu",
        batch_size=4,
        log_samples=True,
    )
    r = res["results"]["mesh_tiny_cloze"]
    print("lm-eval mesh_tiny_cloze:", json.dumps({k: v for k, v in r.items() if "acc" in k}))
    n_docs = sum(1 for _ in open(DATA / "lm_eval" / "mesh_tiny_cloze.jsonl"))
    assert r["sample_len"] == n_docs == 24
    assert 0.0 <= r["acc,none"] <= 1.0 and 0.0 <= r["acc_norm,none"] <= 1.0

    # The harness scored exactly our model: recompute a few docs' log-likelihoods with the training-side model.
    from mesh_megatron.model import MeshGPTModel

    model = MeshGPTModel(cfg)
    model.load_state_dict(sd, strict=False)
    model.eval()
    sp = spm.SentencePieceProcessor(model_file=str(root / "sp.model"))
    samples = res["samples"]["mesh_tiny_cloze"]
    checked = 0
    for s in samples[:3]:
        for (context, continuation), resp in zip([a for a in s["arguments"]], s["resps"]):
            args = (context, continuation) if isinstance(context, str) else tuple(context)
            ctx, cont = args[0], args[1]
            whole, ctx_ids = sp.encode(ctx + cont), sp.encode(ctx)
            cont_ids = whole[len(ctx_ids):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                loss = model(ids[:, :-1], labels=ids[:, 1:])[0]
            ref = -loss[-len(cont_ids):].sum().item()
            got = resp[0][0]
            assert math.isclose(got, ref, abs_tol=1e-3), (ctx, cont, got, ref)
            checked += 1
    assert checked == 12  # 3 docs x 4 choices
