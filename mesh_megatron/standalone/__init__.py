"""The model code that runs without megatron-core or the rest of this project: torch (and transformers) only.

    mesh.py                     MeSH: memory buffer, read/write routers (docs/paper.md §2)
    connections.py              the baseline loop connections and the one factory for all of them (§3)
    connection_names.py         their names (no imports: the training config validates against it)
    configuration_mesh_gpt.py   Hugging Face config of an exported recursive / MeSH model
    modeling_mesh_gpt.py        Hugging Face model: the GPT-NeoX block, the loop, the KV cache

The training model (mesh_megatron/model.py) builds its loop connection from here, and mesh-export copies these
files as they are into every recursive / MeSH export (`trust_remote_code=True`), so MeSH and the connections exist
once. The files import each other only relatively (`from .mesh import ...`), which is what makes them work both as
this package and as a flat exported directory; tests/test_layering.py holds them to that.
"""

# The files every recursive / MeSH export ships (mesh_tools/hf/export.py copies them verbatim).
SHIPPED_FILES = ("configuration_mesh_gpt.py", "modeling_mesh_gpt.py", "connections.py", "connection_names.py", "mesh.py")
