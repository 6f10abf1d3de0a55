"""Per-token early exit on a small trained model: average loops per token and held-out loss against the threshold.

    python bench/early_exit.py                 # CPU, a few minutes: byte-level MeSH model trained at K=4
    python bench/early_exit.py --steps 600 --arch recursive --connection anchor

Trains a small recursive / MeSH model (fixed K) on the bytes of tests/data/export_corpus.txt (the last 10% held out),
then evaluates the held-out loss with early exit off at K = 1..K, and with early exit on at K for a sweep of
thresholds (docs/architecture.md "Early exit"). The loops-per-token column is what a sparse implementation would
spend; the dense one here spends K on every token. A toy: the numbers show the mechanism's trade-off, not a trained
model's. Prints a table and writes JSON to bench/results/early_exit_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh_megatron.config import ModelConfig  # noqa: E402


def byte_windows(data: torch.Tensor, seq: int, n: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (n,), generator=g)
    return torch.stack([data[s : s + seq + 1] for s in starts.tolist()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mesh", choices=["mesh", "recursive"])
    p.add_argument("--connection", default="base")
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--thresholds", default="0.01,0.02,0.05,0.1,0.2,0.3,0.5")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from mesh_megatron.model import MeshGPTModel
    from pretrain.distributed import initialize_parallel, set_seed

    initialize_parallel(1)
    set_seed(args.seed)
    text = (ROOT / "tests/data/export_corpus.txt").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    cfg = ModelConfig.from_dict(dict(
        arch=args.arch, connection=args.connection, hidden_size=args.hidden, num_attention_heads=4, seq_length=args.seq,
        vocab_size=256, make_vocab_size_divisible_by=64, prelude_layers=1, core_layers=2, coda_layers=1,
        num_loops=args.loops, scale_embeddings=True, params_dtype="float32",
    ))
    model = MeshGPTModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        w = byte_windows(train, args.seq, args.batch, g)
        loss = model(w[:, :-1], w[:, 1:]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - t0
    model.eval()

    eval_batch = byte_windows(held, args.seq, 32, torch.Generator().manual_seed(args.seed + 1))
    x, y = eval_batch[:, :-1], eval_batch[:, 1:]

    def evaluate(k: int, threshold: float | None) -> dict:
        record: list = []
        with torch.no_grad():
            loss = model(x, y, num_loops=k, record=record, exit_threshold=threshold).mean().item()
        rec = dict(record)
        loops = rec["loops_per_token"].float() if "loops_per_token" in rec else torch.full(x.shape, float(k))
        counts = torch.bincount(loops.long().flatten(), minlength=k + 1)[1:].tolist()
        return {"K": k, "threshold": threshold, "loss": loss, "avg_loops": loops.mean().item(), "loops_hist": counts}

    rows = [evaluate(k, None) for k in range(1, args.loops + 1)]
    rows += [evaluate(args.loops, float(t)) for t in args.thresholds.split(",")]

    full = rows[args.loops - 1]["loss"]
    print(f"{args.arch}/{args.connection} K={args.loops}, d={args.hidden}, {args.steps} steps ({train_s:.0f} s); "
          f"held-out {x.numel()} bytes; loss in nats/byte")
    print(f"{'K':>3} {'threshold':>10} {'loss':>8} {'vs full K':>10} {'loops/token':>12}  tokens exiting after 1..K loops")
    for r in rows:
        thr = "off" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"{r['K']:>3} {thr:>10} {r['loss']:>8.4f} {r['loss'] - full:>+10.4f} {r['avg_loops']:>12.2f}  {r['loops_hist']}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = ROOT / "bench/results" / f"early_exit_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "device": platform.processor() or platform.machine(), "torch": torch.__version__,
              "train_seconds": train_s, "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
