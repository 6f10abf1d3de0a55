import os

import pytest

# Tests run on CPU; keep DeepSpeed from probing for CUDA and torch from oversubscribing the 2 CI cores.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def single_process():
    """A one-process gloo group with megatron-core parallel_state at TP=1, seeded."""
    from mesh_megatron.parallel import initialize_parallel, set_seed

    initialize_parallel(1)
    set_seed(1234)
    yield
