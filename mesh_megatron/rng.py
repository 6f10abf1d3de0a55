"""Random streams for dropout under tensor parallelism, on the GPU and on the CPU alike.

Megatron's scheme: every rank draws from the default generator, seeded alike on the ranks of a TP group, for dropout
on activations every TP rank holds in full (the same mask everywhere keeps them identical); work on *split*
activations (attention heads, sequence-parallel slices) forks into a named stream seeded per TP rank, so each shard
gets its own mask. megatron-core keeps those named streams in its `CudaRNGStatesTracker`, whose `fork` swaps the CUDA
generator. `DeviceRNGTracker` is that tracker over the generator of the device the model runs on -- CUDA on a GPU, the
CPU generator without one -- installed as megatron-core's tracker, so the model, megatron-core and the recompute code
see one tracker and the CPU tests exercise the code path the GPU runs.

Activation recompute must replay the masks of the forward pass: `checkpoint` (torch's non-reentrant checkpoint,
which restores the default generators) also puts the tracker's streams back as they were when the forward ran, and
afterwards as they were before the recompute (what megatron-core's own `tensor_parallel.checkpoint` does; that one is
CUDA-only).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from megatron.core.tensor_parallel import random as mcore_random

TP_STREAM = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME  # "model-parallel-rng": differs per TP rank


def _on_cuda() -> bool:
    return torch.cuda.is_available()


def device_type() -> str:
    """The generator the streams live on: "cuda" or "cpu"."""
    return "cuda" if _on_cuda() else "cpu"


def _get_state() -> torch.Tensor:
    return torch.cuda.get_rng_state() if _on_cuda() else torch.get_rng_state()


def _set_state(state: torch.Tensor) -> None:
    if _on_cuda():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class DeviceRNGTracker(mcore_random.CudaRNGStatesTracker):
    """megatron-core's RNG tracker on the model's device generator (CUDA, or the CPU without a GPU)."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} is already used by another stream")
        if name in self.states_:
            raise ValueError(f"RNG stream '{name}' already exists")
        self.seeds_.add(seed)
        saved = _get_state()
        if _on_cuda():
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self.states_[name] = _get_state()
        _set_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = TP_STREAM):
        """Run the block on stream `name` (its state advances), then return to the stream that was current."""
        if name not in self.states_:
            raise KeyError(f"RNG stream '{name}' was never added (call pretrain.distributed.set_seed first)")
        outer_name, outer_state = self._current_state_name, _get_state()
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        _set_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = _get_state()
            _set_state(self.states_[outer_name] if outer_name != "default-rng" else outer_state)
            self._current_state_name = outer_name


def tracker() -> DeviceRNGTracker:
    """The tracker megatron-core and the model use; installed by `seed_streams` (a fresh, empty one before that)."""
    current = mcore_random.get_cuda_rng_tracker()
    if not isinstance(current, DeviceRNGTracker):
        current = _install(DeviceRNGTracker())
    return current


def _install(t: DeviceRNGTracker) -> DeviceRNGTracker:
    # megatron-core reads its tracker from this module global (initialize_rng_tracker has no hook for another class).
    mcore_random._CUDA_RNG_STATE_TRACKER = t
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return t


def seed_streams(seed: int, tp_rank: int) -> None:
    """Seed the default generators with `seed` (the same on every rank) and a fresh tracker's streams by megatron-core's
    own `model_parallel_cuda_manual_seed` (the TP stream: seed + 2718 + tp_rank), on the model's device."""
    torch.manual_seed(seed)  # the CPU generator and, where there is one, every CUDA generator
    _install(DeviceRNGTracker())
    # It adds the streams through our tracker's `add`; no expert parallelism here (ep / etp rank 0). Its own
    # torch.cuda.manual_seed is a queued no-op without a GPU (and repeats torch.manual_seed's with one).
    mcore_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)


def fork_tp_stream():
    """Context for dropout on activations split over TP ranks (heads, sequence slices): a per-rank mask. Without
    seeded streams (a model used outside the trainer, e.g. for export parity) it is a no-op."""
    t = tracker()
    return t.fork(TP_STREAM) if TP_STREAM in t.states_ else contextlib.nullcontext()


def _replay_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """torch.utils.checkpoint context_fn: remember the tracker's streams at the forward; in the recompute, run from
    them and afterwards restore the streams the recompute found (the forward already advanced them)."""
    t = tracker()
    at_forward = dict(t.get_states())

    @contextlib.contextmanager
    def recompute():
        before = dict(t.get_states())
        t.set_states(dict(at_forward))
        try:
            yield
        finally:
            t.set_states(before)

    return contextlib.nullcontext(), recompute()


def checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    """Activation recompute of `fn(*args)` that replays the forward's dropout masks, TP streams included."""
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=_replay_contexts)
