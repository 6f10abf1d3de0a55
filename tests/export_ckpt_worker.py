"""torchrun worker for tests/test_export_checkpoint.py: train each run config of SPEC_JSON ({name: run config}) for
a few steps with the real trainer (DeepSpeed ZeRO + megatron-core TP on gloo) and save a checkpoint at the end."""

import gc
import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(spec_path: str) -> None:
    from pretrain.config import build_run_config
    from pretrain.distributed import destroy_parallel
    from pretrain.train import train

    torch.set_num_threads(1)
    for name, d in json.load(open(spec_path)).items():
        res = train(build_run_config(d, source=name))
        res.pop("engine").destroy()
        gc.collect()
        dist.barrier()
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
