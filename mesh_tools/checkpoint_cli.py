"""`mesh-checkpoint`: look at, verify and convert training checkpoints without starting a run.

    mesh-checkpoint info    runs/x/checkpoints              every complete checkpoint: step, layout, tokens, manifest
    mesh-checkpoint verify  runs/x/checkpoints/step_00000300  check every file against the manifest (exit 1 if damaged)
    mesh-checkpoint convert runs/x/checkpoints/step_00000300  make its universal form now (what a resume in another
                                                            layout does on rank 0), e.g. before a large job starts

Errors are one line naming the path and the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mesh_megatron.config import ConfigError


def _checkpoints(path: Path) -> list[Path]:
    from pretrain import checkpoint as ckpt

    if ckpt.is_complete(path):
        return [path]
    found = ckpt.complete_checkpoints(path)
    if not found:
        raise ConfigError(f"{path}: not a complete checkpoint (step_* with COMPLETE) and holds none; give a "
                          "checkpoint directory or a checkpoint root (e.g. runs/<name>/checkpoints)")
    return found


def _info(path: Path) -> int:
    from pretrain import checkpoint as ckpt
    from pretrain import manifest, universal

    found = _checkpoints(path)
    print(f"{'checkpoint':<16} {'step':>8} {'tokens':>14} {'layout':<22} {'precision':<9} {'manifest':<9} universal")
    for c in found:
        state, _ = ckpt.read_state(c)
        try:
            has_manifest = "yes" if manifest.read_manifest(c) is not None else "old"
        except (manifest.ManifestError, OSError):
            has_manifest = "DAMAGED"
        layout = f"TP{state.tensor_parallel_size} x DP{state.data_parallel_size} ZeRO-{state.zero_stage}"
        print(f"{c.name:<16} {state.step:>8} {state.tokens_seen:>14,} {layout:<22} {state.precision:<9} "
              f"{has_manifest:<9} {'yes' if universal.is_converted(c) else '-'}")
    return 0


def _verify(path: Path) -> int:
    from pretrain import manifest, universal

    bad = 0
    for c in _checkpoints(path):
        v = manifest.verify(c, collective=False)
        if not v.manifest:
            print(f"{c.name}: no manifest (written before integrity checks); not verified")
        elif v.ok:
            print(f"{c.name}: ok ({v.files} files, {v.bytes / 2**30:.2f} GiB in {v.seconds:.1f}s)")
        else:
            bad += 1
            print(f"{c.name}: DAMAGED: " + "; ".join(f"{rel}: {why}" for rel, why in v.problems))
        if universal.universal_path(c).exists():  # derived data: a damaged one is made again, the checkpoint is fine
            why = universal.damage(c, collective=False)
            print(f"{c.name}/{universal.UNIVERSAL_DIR}: " + ("ok" if why is None else
                                                             f"{why}; the next resume in another layout makes it again"))
    return 1 if bad else 0


def _convert(path: Path, workers: int) -> int:
    from pretrain import universal

    for c in _checkpoints(path)[-1:]:
        checked = (universal.damage(c, collective=False),) if universal.universal_path(c).exists() else None
        if checked is not None and checked[0] is None:
            print(f"{c.name}: already converted ({universal.universal_path(c)}, verified)")
            continue
        t0 = time.time()
        out = universal.convert(c, workers, checked)  # a damaged universal form is made again
        print(f"{c.name}: universal form written to {out} in {time.time() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mesh-checkpoint",
        description="Inspect, verify and convert mesh-pretrain checkpoints (docs/checkpoints.md). PATH is a "
        "checkpoint (.../step_00000300) or a checkpoint root (.../checkpoints: every complete checkpoint in it, "
        "for convert the newest).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="step, tokens seen, layout (TP x DP, ZeRO), precision, manifest and universal "
                                    "form of each complete checkpoint")
    p.add_argument("path", type=Path, metavar="PATH")
    p = sub.add_parser("verify", help="check every file against the checkpoint's manifest (size and hash); exit 1 "
                                      "if any checkpoint is damaged")
    p.add_argument("path", type=Path, metavar="PATH")
    p = sub.add_parser("convert", help="write the checkpoint's universal form (<step>/universal/) now, so a resume "
                                       "in another TP / DP / ZeRO layout does not spend job time converting")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes DeepSpeed's converter uses to extract and merge the shards (default: min(8, CPUs))")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no device is needed to read or convert a checkpoint
    try:
        if args.cmd == "info":
            return _info(args.path)
        if args.cmd == "verify":
            return _verify(args.path)
        return _convert(args.path, max(1, args.workers))
    except ConfigError as e:
        print(f"mesh-checkpoint: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. convert on a checkpoint this user cannot write to (the universal form goes inside it)
        print(f"mesh-checkpoint: error: {e.filename or args.path}: {e.strerror or e}; run it where (or as a user "
              "who) can write that directory, or on a copy of the checkpoint", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
