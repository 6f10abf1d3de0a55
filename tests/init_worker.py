"""torchrun worker for tests/test_init.py: at TP = WORLD_SIZE, save each case's initial parameters (this rank's
shards) and how often megatron-core built a full master weight on the host, to OUT_DIR/rank{r}.pt."""

import os
import sys

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import layers as mcore_layers

from init_cases import CASES, initial_state
from pretrain.distributed import initialize_parallel, tp_rank


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    initialize_parallel(tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    master_weights = []
    real = mcore_layers._initialize_affine_weight_cpu

    def counting(weight, output_size, input_size, *args, **kwargs):  # calls through: only counts
        master_weights.append((output_size, input_size))
        return real(weight, output_size, input_size, *args, **kwargs)

    mcore_layers._initialize_affine_weight_cpu = counting
    results = {name: initial_state(cfg) for name, cfg in CASES.items()}
    results["master_weights"] = master_weights
    torch.save(results, f"{out_dir}/rank{tp_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
