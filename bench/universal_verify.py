"""Cost of the universal form's manifest: hashing it at conversion and verifying it on every later use.

    python bench/universal_verify.py                 # ~105M-parameter MeshGPTModel (d=768, 1+2x2+1), ZeRO-1, fp32
    python bench/universal_verify.py --hidden 256    # a quick small run

One process builds the model through the trainer (as bench/checkpoint_verify.py), takes one step, saves, converts
the checkpoint into `<step>/universal/` (pretrain.universal.convert: DeepSpeed's converter + our fix-ups + the
manifest), then times, each the best of --repeats:

- convert: the whole conversion (a fresh one each time), manifest included;
- hash universal/: what writing its manifest costs (manifest.hash_checkpoint over it, page cache warm);
- verify universal/ (warm / cold): universal.damage, what every resume that reuses it pays, with the files in the
  page cache or read from the disk (posix_fadvise DONTNEED first).

Prints a table and writes bench/results/universal_verify.json. With N ranks each verifies about 1/N of the bytes;
this single process does all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from checkpoint_verify import best, evict, make_dataset  # noqa: E402

from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain import manifest, universal  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir on /tmp's disk)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "universal_verify.json"))
    args = ap.parse_args()

    from mesh_megatron.config import ModelConfig
    from mesh_megatron.params import count_parameters
    from pretrain.config import build_run_config
    from pretrain.train import Trainer

    work = Path(args.dir or tempfile.mkdtemp(prefix="universal-verify-"))
    model = {"name": "bench", "arch": "mesh", "prelude_layers": 1, "core_layers": 2, "num_loops": 2, "coda_layers": 1,
             "hidden_size": args.hidden, "num_attention_heads": args.heads, "seq_length": 256,
             "vocab_size": args.vocab, "make_vocab_size_divisible_by": 128}
    cfg = build_run_config({
        "model": model,
        "data": {"paths": [make_dataset(work / "data" / "random", args.vocab)], "split": "98,1,1"},
        "train": {"train_iters": 10, "micro_batch_size": 1, "global_batch_size": 1, "eval_interval": 0},
        "parallel": {"zero_stage": 1},
        "checkpoint": {"save_interval": 0, "keep_last": 0, "save_at_end": False},
        "logging": {"dir": str(work / "run"), "wandb": {"mode": "disabled"}},
    }, source="bench")
    params = count_parameters(ModelConfig.from_dict(model))["total"]
    t = Trainer(cfg)
    t.setup()
    t.build()
    t.restore()
    t.load_data()
    t.open_logs()
    t.train_step()  # the optimizer's moments exist only after a step: the files are full size
    path = ckpt.save(t.engine, cfg, t.state, t.root)
    t.metrics.close()
    t.engine.destroy()
    t.release()

    def fresh_conversion() -> None:
        shutil.rmtree(universal.universal_path(path), ignore_errors=True)
        universal.convert(path)

    uni = universal.universal_path(path)
    rows = {"convert (manifest included)": best(fresh_conversion, args.repeats)}
    files = manifest.list_files(uni)
    total = sum(files.values())
    rows["hash universal/ (warm)"] = best(lambda: manifest.hash_checkpoint(uni, collective=False), args.repeats)
    rows["verify universal/ (warm)"] = best(lambda: universal.damage(path, collective=False), args.repeats)
    rows["verify universal/ (cold)"] = best(lambda: universal.damage(path, collective=False), args.repeats,
                                            before=lambda: evict(uni))
    assert universal.damage(path, collective=False) is None
    convert_s = rows["convert (manifest included)"]
    print(f"\nuniversal/: {len(files)} files, {total / 2**30:.2f} GiB, model {params / 1e6:.1f}M parameters "
          f"(from ZeRO-1 fp32: fp32 weights + Adam moments, one file per parameter and state)")
    print(f"{'what':30s} {'seconds':>8s} {'GiB/s':>7s} {'vs convert':>10s}")
    for what, s in rows.items():
        print(f"{what:30s} {s:8.2f} {total / 2**30 / s:7.2f} {s / convert_s:10.0%}")
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_atomic(out, json.dumps({
        "device": device, "parameters": params, "files": len(files), "bytes": total, "hash": manifest.ALGO,
        "seconds": rows, "gib_per_s": {k: total / 2**30 / v for k, v in rows.items()},
        "hash_over_convert": rows["hash universal/ (warm)"] / convert_s,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
