"""Exported models reproduce the training-side MeshGPTModel's logits (fp32, CPU), for every architecture, at the
trained loop count and with num_loops overridden at load time (fewer and more loops than trained).

Tolerance: 1e-4 max abs difference on the logits (measured: ~1e-6; the two sides run the same fp32 math, only the
summation order inside matmuls / SDPA kernels can differ)."""

import ast
import json

import pytest
import torch

from export_cases import CASES, batch, model_state
from mesh_megatron.config import ModelConfig
from mesh_tools.hf.export import PARITY_TOL, export_model, load_export, reference_logits

TOL = 1e-4
assert TOL == PARITY_TOL


@pytest.fixture(scope="module")
def exports(single_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, c in CASES.items():
        cfg = ModelConfig.from_dict(dict(c))
        sd = model_state(c)
        # --verify (the export-time parity check) on two cases; the tests below check every case themselves.
        summary = export_model(cfg, sd, root / name, tokenizer=None, check=name in ("vanilla_scaled", "mesh"))
        out[name] = (cfg, sd, root / name, summary)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_training_model(exports, case):
    cfg, sd, path, summary = exports[case]
    ids = batch()
    ref = reference_logits(cfg, sd, ids)
    with torch.no_grad():
        got = load_export(path)(input_ids=ids, use_cache=False).logits
    assert got.shape == ref.shape == (2, 16, cfg.padded_vocab_size)
    diff = (got - ref).abs().max().item()
    print(f"{case}: max |logits diff| = {diff:.2e}")
    assert diff < TOL
    if summary["parity"] is not None:  # the export-time check (--verify) ran and recorded its number in the card
        assert summary["parity"]["max_abs_diff"] < TOL
        assert "max abs diff" in (path / "README.md").read_text()


@pytest.mark.parametrize("case", ["mesh", "dynamic_comb", "static_comb", "residual+anchor+anchor_star"])
@pytest.mark.parametrize("loops", [1, 4])
def test_num_loops_override_at_load(exports, case, loops):
    """K=1 and K=4 (trained K=2): extra loops reuse the last trained routers / gates, exactly as the training side."""
    cfg, sd, path, _ = exports[case]
    ids = batch()
    ref = reference_logits(cfg, sd, ids, num_loops=loops)
    model = load_export(path, num_loops=loops)
    assert model.config.num_loops == loops and model.config.trained_num_loops == cfg.num_loops
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits
    assert (got - ref).abs().max().item() < TOL
    # and really a different function from the trained K
    assert (got - reference_logits(cfg, sd, ids)).abs().max().item() > 1e-3


def test_vanilla_is_native_gpt_neox(exports):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM

    cfg, _, path, _ = exports["vanilla_scaled"]
    conf = json.loads((path / "config.json").read_text())
    assert conf["model_type"] == "gpt_neox" and "auto_map" not in conf
    assert conf["use_parallel_residual"] is True and conf["tie_word_embeddings"] is False and conf["hidden_act"] == "gelu"
    assert conf["vocab_size"] == cfg.padded_vocab_size == 256  # padded rows stay, as Pythia
    assert conf["rope_parameters"]["partial_rotary_factor"] == cfg.rotary_pct and conf["rotary_pct"] == cfg.rotary_pct
    assert not any(p.name.endswith(".py") for p in path.iterdir())  # no custom code shipped
    model = AutoModelForCausalLM.from_pretrained(path)  # plain: no trust_remote_code
    assert type(model) is GPTNeoXForCausalLM


def test_recursive_ships_its_code(exports):
    _, _, path, _ = exports["mesh"]
    conf = json.loads((path / "config.json").read_text())
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_mesh_gpt.MeshGPTForCausalLM"
    assert (path / "modeling_mesh_gpt.py").is_file() and (path / "configuration_mesh_gpt.py").is_file()
    # The shipped code imports only the standard library, torch and transformers (and itself, relatively).
    for f in ("modeling_mesh_gpt.py", "configuration_mesh_gpt.py"):
        tree = ast.parse((path / f).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots <= {"__future__", "dataclasses", "math", "torch", "transformers"}, (f, roots)
    card = (path / "README.md").read_text()
    for word in ("Loops (K)", "Tokens seen", "Parameters (total)", "## Training config", "arch: mesh"):
        assert word in card


@pytest.mark.parametrize("case", ["vanilla", "mesh", "dynamic_comb"])
def test_kv_cache_decoding_matches_full_forward(exports, case):
    from transformers import DynamicCache

    cfg, _, path, _ = exports[case]
    loops = [None] if cfg.arch == "vanilla" else [None, 3]
    for k in loops:
        model = load_export(path, **({} if k is None else {"num_loops": k}))
        ids = batch(seq=12)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits
            out = model(input_ids=ids[:, :8], past_key_values=DynamicCache(), use_cache=True)
            steps = [out.logits]
            for i in range(8, 12):
                out = model(input_ids=ids[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
        assert (torch.cat(steps, 1) - full).abs().max().item() < TOL
        if cfg.arch != "vanilla":
            # one cache slot per applied layer of the unrolled graph, not per shared layer object
            assert len(out.past_key_values.layers) == cfg.prelude_layers + cfg.core_layers * (k or cfg.num_loops) + cfg.coda_layers


@pytest.mark.parametrize("case", ["vanilla", "mesh", "dynamic_comb"])
def test_generate_with_cache_and_left_padding(exports, case):
    _, _, path, _ = exports[case]
    model = load_export(path)
    ids = batch(seq=6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(ids, use_cache=True, **kw)
    without = model.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (2, 14) and torch.equal(with_cache, without)
    # A left-padded batch generates what each prompt generates alone.
    short = ids[1:, :3]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    both = model.generate(torch.cat([ids[:1], padded]), attention_mask=mask, **kw)
    assert torch.equal(both[0], with_cache[0])
    assert torch.equal(both[1, 3:], model.generate(short, **kw)[0])


def test_num_loops_per_call_in_generate(exports):
    """`num_loops` also works per call (forward and generate), the same as overriding it at load time."""
    _, _, path, _ = exports["mesh"]
    ids = batch(seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    per_call = load_export(path).generate(ids, num_loops=3, **kw)
    at_load = load_export(path, num_loops=3).generate(ids, **kw)
    assert torch.equal(per_call, at_load)


def test_export_ships_the_training_models_own_mesh_code(exports):
    """One implementation: the export's MeSH / connection files are the training model's, byte for byte."""
    from pathlib import Path

    import mesh_megatron.model
    from mesh_megatron import standalone
    from mesh_megatron.standalone.connections import build_connection

    here = Path(standalone.__file__).parent
    _, _, path, _ = exports["mesh"]
    for name in standalone.SHIPPED_FILES:
        assert (path / name).read_bytes() == (here / name).read_bytes(), name
    assert mesh_megatron.model.build_connection is build_connection
