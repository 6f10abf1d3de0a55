"""Parameter counts equal Pythia's official totals and the MeSH paper's Table 5; the analytic count equals the
number of parameters the built model actually has."""

import pytest

from mesh_megatron.config import ModelConfig
from mesh_megatron.params import count_parameters, flops_per_token

# Pythia totals (EleutherAI's released models) and MeSH Table 5; model sizes: docs/paper.md §4.
PYTHIA_TOTAL = {
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
    "6.9b": 6_857_302_016,
}
PAPER_NON_EMB = {  # config: (vanilla, recursive, router, recursive+mesh)
    "160m": (85_056_000, 56_704_512, 23_070, 56_727_582),
    "410m": (302_311_424, 201_541_632, 30_750, 201_572_382),
    "410m-3loop": (302_311_424, 151_156_736, 49_200, 151_205_936),
    "1b": (805_736_448, 553_945_088, 61_470, 554_006_558),
    "1.4b": (1_208_602_624, 805_736_448, 61_470, 805_797_918),
}


@pytest.mark.parametrize("variant", ["vanilla", "vanilla-pythia"])
@pytest.mark.parametrize("size, total", PYTHIA_TOTAL.items())
def test_vanilla_totals_match_pythia(size, total, variant):
    """Both vanillas (the paper's init / Pythia's init) are Pythia's model: the init changes no parameter."""
    assert count_parameters(ModelConfig.from_yaml(f"configs/pythia-{size}-{variant}.yaml"))["total"] == total


@pytest.mark.parametrize("size", [*PYTHIA_TOTAL, "tiny"])
def test_vanilla_and_vanilla_pythia_differ_only_in_init(size):
    prefix = "tiny" if size == "tiny" else f"pythia-{size}"
    ours = ModelConfig.from_yaml(f"configs/{prefix}-vanilla.yaml")
    pythia = ModelConfig.from_yaml(f"configs/{prefix}-vanilla-pythia.yaml")
    assert count_parameters(ours) == count_parameters(pythia)
    assert (ours.scale_embeddings, ours.output_layer_init) == (True, "scaled")  # the paper's, as the recursive arms
    assert (pythia.scale_embeddings, pythia.output_layer_init) == (False, "wang")  # Pythia's
    assert ours.replace(scale_embeddings=False, output_layer_init="wang", name=pythia.name) == pythia


@pytest.mark.parametrize("size, counts", PAPER_NON_EMB.items())
def test_recursive_and_mesh_match_paper_table5(size, counts):
    vanilla, recursive, router, mesh = counts
    if size != "410m-3loop":
        assert count_parameters(ModelConfig.from_yaml(f"configs/pythia-{size}-vanilla.yaml"))["non_embedding"] == vanilla
    assert count_parameters(ModelConfig.from_yaml(f"configs/pythia-{size}-recursive.yaml"))["non_embedding"] == recursive
    m = count_parameters(ModelConfig.from_yaml(f"configs/pythia-{size}-mesh.yaml"))
    assert (m["router"], m["non_embedding"]) == (router, mesh)


def test_matched_compute_across_variants():
    # Same compute depth => the same FLOPs/token up to the MeSH routers (paper: +0.014%).
    f = {a: flops_per_token(ModelConfig.from_yaml(f"configs/pythia-1.4b-{a}.yaml")) for a in ("vanilla", "recursive", "mesh")}
    assert f["vanilla"] == f["recursive"]
    assert 0 < (f["mesh"] - f["recursive"]) / f["recursive"] < 2e-4


@pytest.mark.parametrize("name", ["tiny-vanilla", "tiny-vanilla-pythia", "tiny-recursive", "tiny-anchor", "tiny-mesh"])
def test_analytic_count_equals_built_model(single_process, name):
    from mesh_megatron.model import MeshGPTModel

    cfg = ModelConfig.from_yaml(f"configs/{name}.yaml")
    model = MeshGPTModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


@pytest.mark.parametrize("connection, extra", [("static_comb", 3), ("dynamic_comb", 2 * (3 * 64 + 3))])
def test_learned_combinations_counted(single_process, connection, extra):
    from mesh_megatron.model import MeshGPTModel

    cfg = ModelConfig.from_yaml("configs/tiny-recursive.yaml").replace(connection=connection)
    model = MeshGPTModel(cfg)
    assert count_parameters(cfg)["router"] == extra
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]


def test_mesh_params_cli(capsys):
    from mesh_tools.params_cli import params_main

    assert params_main(["configs/pythia-160m-vanilla.yaml", "configs/pythia-1.4b-mesh.yaml"]) == 0
    out = capsys.readouterr().out
    assert "162,322,944" in out and "805,797,918" in out and "61,470" in out
