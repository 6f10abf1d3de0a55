"""`mesh-params CONFIG [CONFIG ...]`: parameter counts, effective depth and training FLOPs per token."""

from __future__ import annotations

import argparse
import json
import sys

from mesh_megatron.config import ConfigError, ModelConfig
from mesh_megatron.params import summary


def params_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mesh-params",
        description="Print total and non-embedding parameters, MeSH router parameters, effective (compute) depth and "
        "training FLOPs per token for model configs. Counts follow Pythia's convention (untied, padded embeddings).",
    )
    ap.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML file: a bare model config or a run config with a 'model:' section")
    ap.add_argument("--json", action="store_true", help="print one JSON object per config instead of a table")
    args = ap.parse_args(argv)
    rows = []
    for path in args.configs:
        try:
            rows.append(summary(ModelConfig.from_yaml(path)))
        except ConfigError as e:
            print(f"mesh-params: {e}", file=sys.stderr)
            return 2
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    head = f"{'config':<28} {'arch':<18} {'layout':<10} {'total':>15} {'non-embedding':>15} {'router':>8} {'depth':>5} {'train FLOPs/tok':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['name']:<28} {r['arch']:<18} {r['layout']:<10} {r['total']:>15,} {r['non_embedding']:>15,} "
            f"{r['router']:>8,} {r['effective_depth']:>5} {r['train_flops_per_token']:>16.4g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(params_main())
