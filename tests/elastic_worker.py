"""torchrun worker for tests/test_checkpoint_elastic.py: one training run in some layout, optionally resumed from a
checkpoint of another layout. Rank 0 writes OUT_DIR/<name>.json (losses, step) and, with the LR and step, the
full fp32 master weights and both Adam moments of every parameter, gathered over ZeRO partitions and TP ranks,
in OUT_DIR/<name>.saved.pt right after the checkpoint of step DUMP_AT was saved and in OUT_DIR/<name>.loaded.pt right
after the resume loaded its checkpoint.

argv: RUN_CONFIG_JSON OUT_DIR NAME DUMP_AT"""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mesh_megatron.tp_shards import merge_tp_state_dicts  # noqa: E402
from pretrain.config import build_run_config  # noqa: E402
from pretrain.train import Trainer  # noqa: E402


def gathered_state(engine) -> dict[str, dict[str, torch.Tensor]] | None:
    """Collective. {"fp32"|"exp_avg"|"exp_avg_sq": full state dict} on rank 0 (None elsewhere), whatever the layout:
    DeepSpeed's safe_get_full_* assemble the ZeRO partitions, the TP shards are merged like the export merges them."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from megatron.core import parallel_state as ps

    opt = engine.optimizer
    if getattr(opt, "_hp_optimizer_states_linked", None):
        # DeepSpeed 0.19.8 links the moments of every param group after the first group's first step, before the
        # other groups have state (their fragments stay empty): link again now that all have it.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    local = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # fp32 ZeRO-0: the module weights are the master weights, the torch optimizer holds the moments
            local["fp32"][name] = p.detach().float().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                local[key][name] = opt.state[p][key].detach().clone()
        else:
            local["fp32"][name] = full.detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                local[key][name] = safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
    shards = [None] * ps.get_tensor_model_parallel_world_size()
    dist.all_gather_object(shards, local, group=ps.get_tensor_model_parallel_group())
    if dist.get_rank() != 0:
        return None
    return {key: merge_tp_state_dicts([s[key] for s in shards]) for key in local}


class DumpingTrainer(Trainer):
    def __init__(self, cfg, out: str, name: str, dump_at: int) -> None:
        super().__init__(cfg)
        self.out, self.name, self.dump_at = out, name, dump_at

    def _dump(self, what: str) -> None:
        st = gathered_state(self.engine)
        if st is not None:
            st["lr"] = self.optimizer.param_groups[0]["lr"]
            st["step"] = self.state.step
            torch.save(st, os.path.join(self.out, f"{self.name}.{what}.pt"))

    def save(self, *args, **kwargs) -> None:
        super().save(*args, **kwargs)
        if self.state.step == self.dump_at:
            self._dump("saved")

    def restore(self) -> None:
        super().restore()
        if self.resume_from is not None:
            self._dump("loaded")


def main(cfg_path: str, out: str, name: str, dump_at: str) -> None:
    torch.set_num_threads(1)
    cfg = build_run_config(json.load(open(cfg_path)), source=name)
    res = DumpingTrainer(cfg, out, name, int(dump_at)).run()
    res.pop("engine").destroy()
    if dist.get_rank() == 0:
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump({k: res[k] for k in ("losses", "step", "checkpoint")}, f)
    from pretrain.distributed import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:5])
