"""Hugging Face configuration of an exported recursive / MeSH model (shipped inside every such export).

Depends only on `transformers`: an export loads where the training stack (megatron-core, mesh_megatron) is not
installed. Field meanings follow mesh_megatron.config.ModelConfig; names follow GPTNeoXConfig where they exist.

`num_loops` is the number of core iterations run at inference and may be overridden at load time,
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True, num_loops=4)`; `trained_num_loops` (K at
training) fixes how many per-iteration routers / gates the weights hold, and extra iterations reuse the last one's.
`exit_threshold` (None: off) turns on per-token early exit the same way, e.g. `exit_threshold=0.05`
(docs/architecture.md "Early exit").
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from .connection_names import CONNECTIONS


class MeshGPTConfig(PreTrainedConfig):
    model_type = "mesh_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 50304  # padded vocabulary (rows of the embedding / LM head), as Pythia
    hidden_size: int = 768
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    arch: str = "recursive"  # recursive | mesh
    prelude_layers: int = 2
    core_layers: int = 4
    num_loops: int = 2  # K run at inference (overridable at load)
    exit_threshold: float | None = None  # per-token early exit, relative change of the state; None/0 off (overridable at load)
    trained_num_loops: int | None = None  # K at training; default num_loops
    coda_layers: int = 2
    connection: str = "base"  # recursive only
    mesh_slots: int | None = None  # mesh only; default trained_num_loops + 3
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(hidden_size)
    max_position_embeddings: int = 2048  # training sequence length (rotary has no hard limit)
    hidden_act: str = "gelu"  # exact (erf) GELU
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.trained_num_loops is None:
            self.trained_num_loops = self.num_loops
        if self.arch == "mesh" and self.mesh_slots is None:
            self.mesh_slots = self.trained_num_loops + 3
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.arch not in ("recursive", "mesh"):
            raise ValueError(f"MeshGPTConfig.arch must be 'recursive' or 'mesh', got {self.arch!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.arch == "recursive" and self.connection not in CONNECTIONS:
            raise ValueError(f"MeshGPTConfig.connection {self.connection!r} is not one of {CONNECTIONS}")
        if not isinstance(self.num_loops, int) or self.num_loops < 1:
            raise ValueError(f"num_loops must be an integer >= 1, got {self.num_loops!r}")
        if self.exit_threshold is not None and not (isinstance(self.exit_threshold, (int, float)) and self.exit_threshold >= 0):
            raise ValueError(f"exit_threshold must be None (off) or a number >= 0, got {self.exit_threshold!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        """Layers applied per token at the current num_loops: one KV-cache slot each (the core's layers once per loop)."""
        return self.prelude_layers + self.core_layers * self.num_loops + self.coda_layers


__all__ = ["MeshGPTConfig"]
