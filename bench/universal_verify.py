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

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from checkpoint_verify import best, evict, parse_args, stepped_trainer, write_result  # noqa: E402

from pretrain import checkpoint as ckpt  # noqa: E402
from pretrain import manifest, universal  # noqa: E402


def main() -> None:
    args = parse_args(__doc__, "universal_verify.json")
    work = Path(args.dir or tempfile.mkdtemp(prefix="universal-verify-"))
    t, cfg, params = stepped_trainer(args, work)
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
    out = write_result(args.out, params, files, total, rows,
                       {"hash_over_convert": rows["hash universal/ (warm)"] / convert_s})
    print(f"wrote {out}")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
