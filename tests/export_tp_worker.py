"""torchrun worker for tests/test_export_tp.py: build the export test models at tensor-parallel size WORLD_SIZE and
save each rank's (TP-local) state dicts to OUT_DIR/rank{r}.pt, as a TP-sharded checkpoint holds them."""

import os
import sys

import torch
import torch.distributed as dist

from export_cases import CASES, model_state
from pretrain.distributed import initialize_parallel, tp_rank

TP_CASES = ("vanilla_scaled", "mesh", "dynamic_comb", "static_comb")


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    initialize_parallel(tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    torch.save({name: model_state(CASES[name]) for name in TP_CASES}, f"{out_dir}/rank{tp_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
