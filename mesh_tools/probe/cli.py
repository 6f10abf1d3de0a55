"""`mesh-probe`: the paper's diagnostics (CKA, spectra / effective rank, computation skew, MeSH routing) for a model.

    mesh-probe run --checkpoint runs/x/checkpoints/step_000300 --data runs/demo/data/sample_text_document --out probe/x
    mesh-probe compare probe/base/probe.json probe/mesh/probe.json --names base mesh --out probe/compare
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EPILOG = """\
output (run): OUT/probe.json (all statistics, mean/std over samples) and OUT/{skew,cka,spectrum,cka_consecutive,
routing}.png. JSON keys: model, source, data, settings, loss, states/state_labels, cka_rbf/cka_linear
({mean,std} state x state matrices), cka_consecutive, spectrum[state] (sigma_i/sigma_0, top-k), effective_rank[state],
skew (prelude, loop t = h^(t) -> f_core(h^(t)), coda), skew_transitions (h^(t) -> h^(t+1)), routing (MeSH: mean
write/read weight per step x slot, mean per-token entropy), or null.

choices: RBF bandwidth sigma^2 = median squared pairwise token distance (distinct pairs); spectra are of the
uncentred [tokens, hidden] matrices; effective rank = entropy effective rank (Roy & Vetterli).
The paper used 500 Pile samples (--num-sequences 500) at the training sequence length.
"""


def _doc_range(s: str) -> tuple[float, float]:
    try:
        a, b = s.split(":")
        return float(a), float(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}': expected START:END fractions, e.g. 0.949:0.999") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mesh-probe", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="compute the diagnostics for one model", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a mesh-pretrain checkpoint directory (any ZeRO stage / TP size)")
    src.add_argument("--config", help="a model YAML (bare or run config); with --state-dict, or alone for a fresh init")
    r.add_argument("--state-dict", help="with --config: a torch.save'd full (TP=1) model state dict")
    r.add_argument("--data", required=True, help="dataset prefix of a .bin/.idx pair (no suffix)")
    r.add_argument("--doc-range", type=_doc_range, default=(0.0, 1.0), metavar="START:END",
                   help="fraction range of the documents to draw from (default 0:1; the trainer's validation "
                   "documents under split 949,50,1 are 0.949:0.999)")
    r.add_argument("--num-sequences", type=int, default=500, help="number of sequences (samples) probed (default 500)")
    r.add_argument("--seq-length", type=int, default=None, help="tokens per sequence (default: the model's seq_length)")
    r.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    r.add_argument("--num-loops", type=int, default=None, help="loop iterations K at probe time (default: trained K)")
    r.add_argument("--exit-threshold", type=float, default=None, metavar="T",
                   help="recursive / MeSH: per-token early exit at relative state change T (default off); probe.json "
                   "then records the average loops per token, and the states after a token's exit are its carried state")
    r.add_argument("--top-k", type=int, default=50, help="singular values kept per spectrum (default 50, as the paper)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    r.add_argument("--seed", type=int, default=0, help="seed for a fresh init (--config without --state-dict)")
    r.add_argument("--name", default=None, help="model name in the figures (default: the config's name)")
    r.add_argument("--out", required=True, help="output directory (probe.json + PNGs)")
    r.add_argument("--no-plots", action="store_true", help="write probe.json only")
    c = sub.add_parser("compare", help="side-by-side figures from several probe.json files (one column per model)")
    c.add_argument("inputs", nargs="+", help="probe.json files (or directories holding one)")
    c.add_argument("--names", nargs="+", default=None, help="column titles (default: the names stored in the JSONs)")
    c.add_argument("--out", required=True, help="output directory for the PNGs")
    return ap


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


def run(args) -> dict:
    import torch

    from mesh_tools.probe import loading
    from mesh_tools.probe.collect import probe
    from mesh_tools.probe.data import load_windows
    from mesh_tools.probe.plots import plot_all

    if args.state_dict and not args.config:
        raise ValueError("--state-dict needs --config (the model config the weights belong to)")
    if args.checkpoint:
        model, cfg, _ = loading.from_checkpoint(args.checkpoint)
        source = {"checkpoint": str(args.checkpoint)}
    else:
        model, cfg, _ = loading.from_state_dict(args.config, args.state_dict, seed=args.seed)
        source = {"config": str(args.config), "state_dict": args.state_dict, "fresh_init_seed": None if args.state_dict else args.seed}
    if args.num_loops is not None and cfg.arch == "vanilla":
        raise ValueError("--num-loops: a vanilla model has no loop")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    seq = args.seq_length or cfg.seq_length
    windows = load_windows(args.data, args.num_sequences, seq, args.doc_range, vocab_size=cfg.padded_vocab_size)
    t0 = time.time()
    if args.exit_threshold is not None and cfg.arch == "vanilla":
        raise ValueError("--exit-threshold: a vanilla model has no loop")
    res = probe(model, windows, batch_size=args.batch_size, num_loops=args.num_loops, top_k=args.top_k, device=device,
                exit_threshold=args.exit_threshold)
    name = args.name or cfg.name or cfg.arch
    out = {
        "version": 1,
        "name": name,
        "model": {"name": cfg.name, "arch": cfg.arch, "connection": getattr(cfg, "connection", None),
                  "layout": cfg.layout, "hidden_size": cfg.hidden_size, "trained_num_loops": getattr(cfg, "num_loops", None)},
        "source": source,
        "data": {"prefix": args.data, "doc_range": list(args.doc_range), "num_sequences": int(windows.shape[0]),
                 "seq_length": seq},
        "settings": {"cka_rbf_bandwidth": "sigma^2 = median squared distance over distinct token pairs",
                     "spectrum": f"top-{args.top_k} singular values of the uncentred state, / sigma_0",
                     "effective_rank": "entropy effective rank (Roy & Vetterli 2007)",
                     "skew": "2||f(h)-h||_F / (||f(h)||_F + ||h||_F), per sample"},
        **res,
        "seconds": round(time.time() - t0, 2),
    }
    out_dir = Path(args.out)
    write_json(out_dir / "probe.json", out)
    print(f"[mesh-probe] {name}: {windows.shape[0]} sequences x {seq} tokens, loss {out['loss']['mean']:.4f} "
          f"(ppl {out['loss']['ppl']:.2f}) -> {out_dir / 'probe.json'}")
    print(summary_line(out))
    if not args.no_plots:
        for p in plot_all([out], [name], out_dir):
            print(f"[mesh-probe] wrote {p}")
    return out


def summary_line(r: dict) -> str:
    cc = ", ".join(f"{'→'.join(c['pair'])} {c['mean']:.3f}" for c in r["cka_consecutive"]["rbf"])
    sk = ", ".join(f"{s['block']} {s['mean']:.3f}" for s in r["skew"])
    er = ", ".join(f"{lab} {r['effective_rank'][s]['mean']:.1f}" for s, lab in zip(r["states"], r["state_labels"]))
    return f"  RBF CKA consecutive: {cc}\n  skew: {sk}\n  effective rank: {er}"


def _read_result(p: str) -> dict:
    path = Path(p)
    if path.is_dir():
        path = path / "probe.json"
    if not path.is_file():
        raise ValueError(f"{p}: no probe.json there; run `mesh-probe run ... --out DIR` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def compare(args) -> list:
    from mesh_tools.probe.plots import plot_all

    results = [_read_result(p) for p in args.inputs]
    names = args.names or [r.get("name", f"model{i}") for i, r in enumerate(results)]
    if len(names) != len(results):
        raise ValueError(f"--names: got {len(names)} names for {len(results)} inputs")
    written = plot_all(results, names, args.out)
    for p in written:
        print(f"[mesh-probe] wrote {p}")
    return written


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex are not installed|full scope is deprecated).*")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = build_parser().parse_args(argv)
    from mesh_megatron.config import ConfigError
    from mesh_tools.probe.data import ProbeDataError

    try:
        run(args) if args.cmd == "run" else compare(args)
    except (ConfigError, ProbeDataError, ValueError) as e:
        print(f"mesh-probe: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
