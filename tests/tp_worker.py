"""torchrun worker: run every case of tests/tp_cases.py at tensor-parallel size WORLD_SIZE and save each rank's
results (local shards) to OUT_DIR/rank{r}.pt. Launched by tests/test_tensor_parallel.py."""

import sys

import torch
import torch.distributed as dist

from mesh_megatron.config import ConfigError
from pretrain.distributed import initialize_parallel, tp_rank
from tp_cases import CASES, run_case


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    initialize_parallel(tensor_parallel_size=int(__import__("os").environ["WORLD_SIZE"]))
    results = {name: run_case(cfg) for name, cfg in CASES.items()}
    try:  # sequence parallelism at TP=2 on CPU must be refused with a readable reason
        run_case({**CASES["mesh"], "sequence_parallel": True})
        results["seqpar_error"] = ""
    except ConfigError as e:
        results["seqpar_error"] = str(e)
    torch.save(results, f"{out_dir}/rank{tp_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
