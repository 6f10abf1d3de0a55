"""Model configuration: one validated dataclass, loaded from and saved to YAML.

Every architecture in the paper is one `ModelConfig`:

- ``arch: vanilla``   -- Pythia / GPT-NeoX, ``num_layers`` unshared layers.
- ``arch: recursive`` -- Prelude -> Core x K -> Coda with a fixed hand-off ``connection``
  between loops (``base``, ``residual``, ``anchor``, ``anchor_star``, their sums, or the learned
  ``static_comb`` / ``dynamic_comb`` of the paper's Table 4).
- ``arch: mesh``      -- the same layout with the MeSH memory buffer and per-step routers.

Errors are raised as `ConfigError` with the offending field named, so a typo in a YAML file
gives one readable line instead of a traceback from deep inside the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from mesh_megatron.standalone.connection_names import CONNECTIONS

ARCHS = ("vanilla", "recursive", "mesh")
INIT_METHODS = ("small_init", "normal")
OUTPUT_INITS = ("wang", "scaled")
RECOMPUTE = ("none", "loop", "layer")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent. The message names the field."""


def closest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for a mistyped key or value, or ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _load_yaml(path: Path, label: str, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: is a directory, not a {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: not valid YAML: {' '.join(str(e).split())}") from None


def _shown(path: Path) -> str:
    """A path for messages: relative to the working directory when it is below it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def merge_config(base: Any, child: Any) -> Any:
    """`child` deep-merged over `base`: mappings merge key by key (recursively); anything else in `child` (a list, a
    scalar, null) replaces what `base` has. Neither argument is modified."""
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for key, value in child.items():
            out[key] = merge_config(base[key], value) if key in base else value
        return out
    return child


def _resolve_bases(path: Path, label: str, what: str, chain: tuple[Path, ...]) -> Any:
    """The file at `path` (`label` in messages) over its bases; `chain` = the files whose bases are being read."""
    data = _load_yaml(path, label, what)
    if not isinstance(data, dict) or "base" not in data:
        return data
    here = path.resolve()
    chain = (*chain, here)
    data = dict(data)
    bases = data.pop("base")
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{label}: 'base' must be a file path or a list of file paths (relative to this file), got {bases!r}")
    merged: dict[str, Any] = {}
    for name in bases:
        target = (here.parent / name).resolve()
        if target in chain:
            cycle = " -> ".join(_shown(p) for p in (*chain[chain.index(target):], target))
            raise ConfigError(f"{label}: base cycle {cycle}")
        if not target.is_file():
            raise ConfigError(f"{label}: base '{name}' not found (looked for {target})")
        parent = _resolve_bases(target, _shown(target), what, chain)
        if not isinstance(parent, dict):
            raise ConfigError(f"{_shown(target)}: a base file must be a mapping, got {type(parent).__name__} (base of {label})")
        merged = merge_config(merged, parent)
    return merge_config(merged, data)


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """yaml.safe_load of a file with its bases resolved; a missing file, bad YAML or bad base is a ConfigError naming
    the file.

    Every config reader goes through here (the trainer's `load_run_config`, `ModelConfig.from_yaml` / mesh-params,
    mesh-plan's `load_run_dict` and job files), so inheritance works the same everywhere: a top-level ``base:`` key
    names a file (a path relative to the file that contains it), or a list of files applied left to right; each base
    is read the same way (it may have bases of its own), then this file is deep-merged over them (`merge_config`:
    mappings merge key by key, lists and scalars replace). The result has no ``base`` key. A cycle or a missing base
    is refused. See docs/configs.md.
    """
    return _resolve_bases(Path(path), str(path), what, ())


@dataclass
class ModelConfig:
    # --- shape -------------------------------------------------------------------------------
    arch: str
    hidden_size: int
    num_attention_heads: int
    num_layers: int = 0  # vanilla only: number of unshared layers
    prelude_layers: int = 0  # recursive / mesh: Lpre
    core_layers: int = 0  # recursive / mesh: Lcore (shared, looped)
    num_loops: int = 0  # recursive / mesh: K
    coda_layers: int = 0  # recursive / mesh: Lcoda
    connection: str = "base"  # recursive only: hand-off between loops
    mesh_slots: int | None = None  # mesh only: buffer size B; default K + 3 (paper, Table 3)
    ffn_hidden_size: int | None = None  # default 4 * hidden_size (Pythia)
    # --- vocabulary / positions --------------------------------------------------------------
    vocab_size: int = 50277  # GPT-NeoX-20B tokenizer
    make_vocab_size_divisible_by: int = 128  # Pythia pads to a multiple of 128 (x TP for 6.9B: 256)
    seq_length: int = 2048
    rotary_pct: float = 0.25
    rotary_base: int = 10000
    # --- numerics / init ---------------------------------------------------------------------
    layernorm_epsilon: float = 1e-5
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(hidden) (paper: yes; Pythia: no)
    init_method: str = "small_init"  # small_init: std = sqrt(2 / (5 d)); normal: std = init_std
    init_std: float = 0.02
    output_layer_init: str = "wang"  # wang: 2 / (N sqrt(d)); scaled: base_std / sqrt(2 N); N = effective depth
    router_init_std: float | None = None  # default sqrt(2 / (5 d)), truncated at 3 sigma, zero bias
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    params_dtype: str = "float32"
    # --- parallelism / memory ----------------------------------------------------------------
    sequence_parallel: bool = False
    recompute: str = "none"  # activation checkpointing: none | loop (per core iteration) | layer
    compile: bool = False  # torch.compile each transformer layer in place (runtime knob; docs/configs.md)
    name: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"model.{fld}: {msg}")

        need(self.arch in ARCHS, "arch", f"unknown architecture '{self.arch}'; choose one of {ARCHS}{closest(str(self.arch), ARCHS)}")
        for f in ("hidden_size", "num_attention_heads", "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, f"must be a positive integer, got {v!r}")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
        )
        need(0.0 <= self.rotary_pct <= 1.0, "rotary_pct", f"must be in [0, 1], got {self.rotary_pct}")
        rot = int(self.head_dim * self.rotary_pct)
        need(rot % 2 == 0, "rotary_pct", f"rotary dims ({rot} of head_dim {self.head_dim}) must be even")
        need(self.init_method in INIT_METHODS, "init_method", f"'{self.init_method}' not in {INIT_METHODS}{closest(str(self.init_method), INIT_METHODS)}")
        need(self.output_layer_init in OUTPUT_INITS, "output_layer_init", f"'{self.output_layer_init}' not in {OUTPUT_INITS}")
        need(self.recompute in RECOMPUTE, "recompute", f"'{self.recompute}' not in {RECOMPUTE}{closest(str(self.recompute), RECOMPUTE)}")
        need(self.params_dtype in DTYPES, "params_dtype", f"'{self.params_dtype}' not in {DTYPES}")
        need(isinstance(self.compile, bool), "compile", f"must be true or false, got {self.compile!r}")
        need(0.0 <= self.hidden_dropout < 1 and 0.0 <= self.attention_dropout < 1, "hidden_dropout", "dropout must be in [0, 1)")
        if self.arch == "vanilla":
            need(self.num_layers >= 1, "num_layers", f"vanilla needs num_layers >= 1, got {self.num_layers}")
            for f in ("prelude_layers", "core_layers", "num_loops", "coda_layers"):
                need(getattr(self, f) == 0, f, "is only for arch recursive / mesh; remove it for vanilla")
            need(self.recompute != "loop", "recompute", "'loop' needs a looped core; use 'layer' for vanilla")
        else:
            need(self.num_layers == 0, "num_layers", f"is only for vanilla; {self.arch} uses prelude_layers/core_layers/num_loops/coda_layers")
            need(self.core_layers >= 1, "core_layers", f"must be >= 1, got {self.core_layers}")
            need(self.num_loops >= 1, "num_loops", f"K must be >= 1, got {self.num_loops}")
            need(self.prelude_layers >= 0 and self.coda_layers >= 0, "prelude_layers", "layer counts must be >= 0")
        if self.arch == "recursive":
            need(self.connection in CONNECTIONS, "connection", f"unknown connection '{self.connection}'; choose one of {CONNECTIONS}{closest(str(self.connection), CONNECTIONS)}")
        else:
            need(self.connection == "base", "connection", f"is only for arch recursive (got arch {self.arch})")
        if self.arch == "mesh":
            need(self.num_slots >= 2, "mesh_slots", f"MeSH needs at least 2 slots, got {self.num_slots}")
        else:
            need(self.mesh_slots is None, "mesh_slots", "is only for arch mesh")

    def validate_parallel(self, tensor_parallel_size: int) -> None:
        """Checks that need the TP size (known only when the model is built)."""
        tp = tensor_parallel_size
        if self.num_attention_heads % tp:
            raise ConfigError(f"model.num_attention_heads: {self.num_attention_heads} heads are not divisible by tensor parallel size {tp}")
        if self.ffn_size % tp:
            raise ConfigError(f"model.ffn_hidden_size: {self.ffn_size} is not divisible by tensor parallel size {tp}")
        if self.padded_vocab_size % tp:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by: padded vocab {self.padded_vocab_size} is not divisible by tensor "
                f"parallel size {tp}; set make_vocab_size_divisible_by to a multiple of {tp * 64}"
            )

    # --- derived --------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def num_slots(self) -> int:
        return self.mesh_slots if self.mesh_slots is not None else self.num_loops + 3

    @property
    def unique_layers(self) -> int:
        if self.arch == "vanilla":
            return self.num_layers
        return self.prelude_layers + self.core_layers + self.coda_layers

    def effective_depth(self, num_loops: int | None = None) -> int:
        """Layers applied per token in the unrolled graph (compute depth)."""
        if self.arch == "vanilla":
            return self.num_layers
        k = self.num_loops if num_loops is None else num_loops
        return self.prelude_layers + self.core_layers * k + self.coda_layers

    @property
    def layout(self) -> str:
        """The paper's notation, e.g. '4+8R2+4'."""
        if self.arch == "vanilla":
            return f"{self.num_layers}"
        return f"{self.prelude_layers}+{self.core_layers}R{self.num_loops}+{self.coda_layers}"

    # --- (de)serialisation --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: 'model' must be a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"{source}: unknown key 'model.{key}'{closest(key, names)}")
        required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        for key in required:
            if key not in d:
                raise ConfigError(f"{source}: missing required field 'model.{key}'")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """Reads a model config, either bare or as the `model:` section of a run config."""
        data = read_yaml(path)
        if isinstance(data, dict) and "model" in data:
            data = data["model"]
        return cls.from_dict(data or {}, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


__all__ = ["ModelConfig", "ConfigError", "ARCHS", "CONNECTIONS", "closest", "merge_config", "read_yaml"]
