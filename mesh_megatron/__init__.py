"""mesh-megatron: recursive transformers with MeSH (Memory-as-State-Highways) on megatron-core."""

from mesh_megatron.config import ConfigError, ModelConfig

__all__ = ["ModelConfig", "ConfigError"]
__version__ = "0.1.0"
