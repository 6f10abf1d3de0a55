"""torchrun worker: run every case of tests/tp_cases.py at tensor-parallel size WORLD_SIZE and save each rank's
results (local shards) to OUT_DIR/rank{r}.pt. Launched by tests/test_tensor_parallel.py."""

import sys

import torch
import torch.distributed as dist

from mesh_megatron.config import ConfigError
from pretrain.distributed import initialize_parallel, tp_rank
from sp_cpu import all_reduces_in_one_backward, megatron_sequence_parallel_on_cpu, sequence_parallel_dropout_masks
from tp_cases import CASES, SP_CASES, run_case


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    initialize_parallel(tensor_parallel_size=int(__import__("os").environ["WORLD_SIZE"]))
    results = {name: run_case(cfg) for name, cfg in CASES.items()}
    try:  # sequence parallelism at TP=2 on CPU must be refused with a readable reason
        run_case({**CASES["mesh"], "sequence_parallel": True})
        results["seqpar_error"] = ""
    except ConfigError as e:
        results["seqpar_error"] = str(e)
    # Then run it anyway, on the CPU stand-in for the one thing gloo-on-CPU lacks (sp_cpu.py).
    with megatron_sequence_parallel_on_cpu():
        for name in SP_CASES:
            results[f"sp:{name}"] = run_case({**SP_CASES[name], "sequence_parallel": True})
        results["sp_dropout_masks"] = sequence_parallel_dropout_masks()
        results["sp_backward_all_reduces"] = all_reduces_in_one_backward(SP_CASES["mesh"])
    torch.save(results, f"{out_dir}/rank{tp_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
