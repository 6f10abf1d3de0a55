import os

import pytest

# Tests run on CPU; keep DeepSpeed from probing for CUDA and torch from oversubscribing the 2 CI cores.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def single_process():
    """A one-process gloo group with megatron-core parallel_state at TP=1, seeded."""
    from pretrain.distributed import initialize_parallel, set_seed

    initialize_parallel(1)
    set_seed(1234)
    yield


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> None:
    """Launch tests/<script> on `nproc` real gloo processes with torchrun; fail with the tail of its output."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(here / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def fresh_job_env(**extra: str) -> dict:
    """Environment for a trainer subprocess that starts a job of its own: none of the launcher variables an
    in-process test left in os.environ (pretrain.launcher.LAUNCHER_ENV), one thread, CPU DeepSpeed, the repo
    importable; `extra` on top (e.g. RANK/WORLD_SIZE for a multi-process job)."""
    from pathlib import Path

    from pretrain.launcher import LAUNCHER_ENV

    repo = Path(__file__).resolve().parents[1]
    # WANDB_SERVICE: an in-process wandb run leaves pytest's own wandb-core address here; a job must start its own
    base = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_ENV, "WANDB_SERVICE")}
    return {**base, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline",
            "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]), **extra}


@pytest.fixture(scope="module", autouse=True)
def _wandb_service_per_module():
    """An in-process wandb run starts a wandb-core service that outlives its test module and is remembered in
    WANDB_SERVICE; a later module that signals this process (the preemption tests) can take it down under the next
    module's runs, which then write no .wandb file. Each module ends with its service torn down."""
    import sys

    yield
    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()
        except Exception:  # noqa: BLE001 - best effort: a service that is already gone is the point
            pass
    os.environ.pop("WANDB_SERVICE", None)
