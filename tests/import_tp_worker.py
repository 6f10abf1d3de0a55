"""torchrun worker for tests/test_import_hf.py: load an imported checkpoint into a TP=WORLD_SIZE ZeRO-1 training
model the way a resume does (the layout change goes through the universal checkpoint) and save rank 0's full logits
for fixed token ids.

argv: RUN_CONFIG_YAML CHECKPOINT RUN_DIR IDS_PT OUT_PT"""

import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pretrain.config import load_run_config  # noqa: E402
from pretrain.train import Trainer  # noqa: E402


def main(config: str, ckpt: str, run_dir: str, ids_path: str, out: str) -> None:
    torch.set_num_threads(1)
    tp = os.environ["WORLD_SIZE"]
    cfg = load_run_config(config, {"parallel.tensor_parallel_size": tp, "parallel.zero_stage": "1",
                                   "checkpoint.resume": ckpt, "logging.dir": run_dir})
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        trainer.build()
        trainer.restore()
        model = trainer.engine.module.eval()
        with torch.no_grad():
            logits = model.gather_logits(model(torch.load(ids_path)))
        if dist.get_rank() == 0:
            torch.save(logits, out)
        trainer.engine.destroy()
    finally:
        trainer.release()
    from pretrain.distributed import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:6])
