"""The loop connections a recursive model can use (docs/paper.md §3), by name: the fixed heuristics of the paper's
Eq. 1 (supplements, summed) and its two learned combinations. MeSH is `arch: mesh`, not a connection name.

No imports, so the training config (mesh_megatron/config.py) validates against the same list as the exported
Hugging Face config without loading torch; shipped in every recursive / MeSH export.
"""

CONNECTIONS = (
    "base",
    "residual",
    "anchor",
    "anchor_star",
    "residual+anchor",
    "anchor+anchor_star",
    "residual+anchor+anchor_star",
    "static_comb",
    "dynamic_comb",
)
