"""Cost of checkpoint integrity: hashing at save, verifying at resume, against saving and loading themselves.

    python bench/checkpoint_verify.py                 # ~105M-parameter MeshGPTModel (d=768, 1+2x2+1), ZeRO-1, fp32
    python bench/checkpoint_verify.py --hidden 256    # a quick small run

One process builds the model through the trainer (pretrain.train.Trainer: data check, gloo group, DeepSpeed engine
with AdamW), saves it with pretrain.checkpoint.save (which hashes every file for the manifest), then times, each the
best of --repeats:

- hash at save: manifest.hash_checkpoint over the checkpoint (what save() adds), page cache warm;
- verify (warm): manifest.verify, files in the page cache (right after a save, or a restart on the same node);
- verify (cold): the same after the files are evicted from the page cache (posix_fadvise DONTNEED), i.e. read
  from the disk, as a resume on a fresh node does;
- load (warm / cold): engine.load_checkpoint of the same checkpoint (model + optimizer + scheduler);
- verify, then load (cold): a resume as the trainer does it (the verify leaves the files in the page cache);
- torch.load (warm): every .pt file of the checkpoint unpickled, no engine.

Prints a table and writes bench/results/checkpoint_verify.json (with the machine). With N ranks each verifies
about 1/N of the bytes; this single process does all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain import manifest  # noqa: E402


def make_dataset(prefix: Path, vocab: int) -> str:
    """A small random-token .bin/.idx pair (the model is never trained; the trainer only checks the data)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16 if vocab < 65536 else np.int32)
    for _ in range(50):
        toks = rng.integers(1, vocab, size=int(rng.integers(100, 400)))
        builder.add_document(torch.tensor(np.append(toks, 0), dtype=torch.int64), [len(toks) + 1])
    builder.finalize(f"{prefix}.idx")
    meta = {"tokenizer": {"kind": "synthetic", "vocab_size": vocab, "eod_id": 0}}
    Path(f"{prefix}.meta.json").write_text(json.dumps(meta))
    return str(prefix)


def evict(ckpt_dir: Path) -> None:
    """Drop the checkpoint's pages from the page cache, so the next read comes from the disk."""
    for p in ckpt_dir.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def best(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def parse_args(doc: str, result: str) -> argparse.Namespace:
    """The model-size flags both checkpoint benches take (default: the ~100M-parameter model)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir on /tmp's disk)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / result))
    return ap.parse_args()


def stepped_trainer(args: argparse.Namespace, work: Path):
    """(trainer, run config, parameter count): the bench model built by the trainer in one process and stepped
    once, so the optimizer's moments exist and the checkpoint files have their full size."""
    from mesh_megatron.config import ModelConfig
    from mesh_megatron.params import count_parameters
    from pretrain.config import build_run_config
    from pretrain.train import Trainer

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
    t = Trainer(cfg)
    t.setup()
    t.build()
    t.restore()
    t.load_data()
    t.open_logs()
    t.train_step()
    return t, cfg, count_parameters(ModelConfig.from_dict(model))["total"]


def write_result(path: str, params: int, files: dict, total: int, rows: dict, extra: dict) -> Path:
    """The bench's JSON (machine, sizes, seconds and GiB/s per row, plus `extra`), written atomically."""
    device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_atomic(out, json.dumps({
        "device": device, "parameters": params, "files": len(files), "bytes": total, "hash": manifest.ALGO,
        "seconds": rows, "gib_per_s": {k: total / 2**30 / v for k, v in rows.items()}, **extra,
    }, indent=2) + "\n")
    return out


def main() -> None:
    args = parse_args(__doc__, "checkpoint_verify.json")
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-verify-"))
    t, cfg, params = stepped_trainer(args, work)
    state = t.state
    root = t.root

    save_s = best(lambda: ckpt.save(t.engine, cfg, state, root), 1)
    path = root / ckpt.tag_for(state.step)
    files = manifest.list_files(path)
    total = sum(files.values())
    rows = {
        "save (with hashing)": save_s,
        "hash at save (warm)": best(lambda: manifest.hash_checkpoint(path), args.repeats),
        "verify (warm)": best(lambda: manifest.verify(path), args.repeats),
        "verify (cold)": best(lambda: manifest.verify(path), args.repeats, before=lambda: evict(path)),
        "engine.load_checkpoint (warm)": best(lambda: t.engine.load_checkpoint(str(root), tag=path.name), args.repeats),
        "engine.load_checkpoint (cold)": best(lambda: t.engine.load_checkpoint(str(root), tag=path.name),
                                              args.repeats, before=lambda: evict(path)),
        "verify, then load (cold)": best(lambda: (manifest.verify(path),
                                                  t.engine.load_checkpoint(str(root), tag=path.name)),
                                         args.repeats, before=lambda: evict(path)),
        "torch.load of every .pt (warm)": best(lambda: [torch.load(path / f, weights_only=False) for f in files
                                                        if f.endswith(".pt")], args.repeats),
    }
    assert manifest.verify(path).ok
    load_warm, load_cold = rows["engine.load_checkpoint (warm)"], rows["engine.load_checkpoint (cold)"]
    print(f"\ncheckpoint: {len(files)} files, {total / 2**30:.2f} GiB, model {params / 1e6:.1f}M parameters "
          f"(ZeRO-1, fp32: weights + fp32 master + Adam moments)")
    print(f"{'what':34s} {'seconds':>8s} {'GiB/s':>7s} {'vs load':>8s}")
    for what, s in rows.items():
        ref = load_cold if "cold" in what else load_warm
        vs = "" if what.startswith("save") else f"{s / ref:.0%}"
        print(f"{what:34s} {s:8.2f} {total / 2**30 / s:7.2f} {vs:>8s}")
    print(f"hashing adds {rows['hash at save (warm)'] / save_s:.0%} to the save; a cold resume (verify, then load) "
          f"takes {rows['verify, then load (cold)'] / load_cold - 1:+.0%} vs the load alone; verifying adds "
          f"{rows['verify (warm)'] / load_warm:.0%} to a warm load")
    out = write_result(args.out, params, files, total, rows, {
        "hash_over_save": rows["hash at save (warm)"] / save_s,
        "verify_over_load": {"warm": rows["verify (warm)"] / load_warm, "cold": rows["verify (cold)"] / load_cold},
        "cold_resume_over_load": rows["verify, then load (cold)"] / load_cold,
    })
    print(f"wrote {out}")
    t.metrics.close()
    t.engine.destroy()
    t.release()
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)  # 1.6 GB of checkpoint


if __name__ == "__main__":
    main()
