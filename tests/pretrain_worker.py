"""torchrun worker for tests/test_pretrain_parallel.py: run several training layouts one after another in the same
processes (imports cost ~6 s per process, so layouts share one launch) and save rank 0's results as JSON.

argv: SPEC_JSON OUT_DIR. SPEC = {"base": <run config dict>, "runs": {name: {dotted.key: value}}}."""

import contextlib
import copy
import gc
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pretrain.config import apply_overrides, build_run_config  # noqa: E402
from pretrain.distributed import assert_replicated_in_sync, tp_rank  # noqa: E402
from pretrain.train import train  # noqa: E402
from sp_cpu import megatron_sequence_parallel_on_cpu  # noqa: E402


def main(spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    spec = json.load(open(spec_path))
    for name, overrides in spec["runs"].items():
        overrides = dict(overrides)
        drift_check = overrides.pop("_drift_check", False)
        d = apply_overrides(copy.deepcopy(spec["base"]), {k: json.dumps(v) for k, v in overrides.items()})
        d.setdefault("logging", {})["dir"] = os.path.join(out_dir, name)
        with megatron_sequence_parallel_on_cpu() if overrides.get("model.sequence_parallel") else contextlib.nullcontext():
            res = train(build_run_config(d, source=name))
        engine = res.pop("engine")
        if overrides.get("parallel.tensor_parallel_size", 1) > 1:
            # which sequences each rank trained on at step 0: TP peers must match, DP ranks must differ
            from megatron.core import parallel_state as ps

            from pretrain.data import build_datasets, train_micro_batches

            cfg = build_run_config(d, source=name)
            train_ds, _, _ = build_datasets(cfg, ps.get_data_parallel_world_size())
            mine = [t.tolist() for b in train_micro_batches(train_ds, 0, cfg, ps.get_data_parallel_rank(),
                                                            ps.get_data_parallel_world_size()) for t in b["tokens"]]
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, {"tp": tp_rank(), "dp": ps.get_data_parallel_rank(), "seqs": mine})
            res["rank_batches"] = every
        if drift_check:
            # The helper must notice a replicated parameter that drifted on one TP rank (here: rank 1's final LN).
            assert_replicated_in_sync(engine.module)
            if tp_rank() == 1:
                with torch.no_grad():
                    engine.module.final_ln.weight.add_(1e-3)
            try:
                assert_replicated_in_sync(engine.module)
                res["drift_detected"] = ""
            except AssertionError as e:
                res["drift_detected"] = str(e)
        engine.destroy()
        del engine
        gc.collect()
        if dist.get_rank() == 0:
            with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
                json.dump(res, f)
        dist.barrier()
    from pretrain.distributed import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
