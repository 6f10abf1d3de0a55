"""`mesh-pretrain --config configs/X.yaml [--section.key value ...]` (also `python -m pretrain`)."""

from __future__ import annotations

import argparse
import signal
import sys

from mesh_megatron.config import ConfigError

EPILOG = """\
overrides:
  Any config key can be set on the command line as --section.key value; values are parsed as YAML
  (numbers, true/false, null, [a, b]). Examples:
    --train.lr 3e-4  --train.train_iters 2000  --parallel.zero_stage 3  --parallel.tensor_parallel_size 2
    --data.paths '[runs/demo/data/sample_text_document]'  --logging.wandb.mode online
  Sections: model, data, train, parallel, checkpoint, logging (see the YAML files in configs/ and
  docs/checkpoints.md). An unknown key is an error that names the closest valid key.

launch:
  single process:   mesh-pretrain --config configs/demo.yaml
  one node, 8 GPUs: torchrun --nproc_per_node 8 -m pretrain --config configs/pythia-1b-mesh.yaml
  Slurm:            srun (one task per GPU) reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; see slurm/.

preemption:
  SIGTERM or SIGUSR1 -> the current step finishes, a checkpoint is saved, the process exits 0.
  Restart with --resume auto to continue from the latest complete checkpoint.

errors:
  A mistake in the config, the launch or the run directory (e.g. tensor_parallel_size vs the number of processes,
  a second run on a directory another run holds) is one line on stderr and exit code 2; --debug shows the traceback.
"""

# Errors that are the user's to fix: printed as one line, exit 2 (--debug re-raises them with their traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError,)


def split_overrides(rest: list[str]) -> dict[str, str]:
    """['--train.lr', '3e-4', '--a.b=c'] -> {'train.lr': '3e-4', 'a.b': 'c'}; anything else is an error."""
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"command line: unexpected argument '{arg}'; overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and "." in rest[i + 1][2:]):
                raise ConfigError(f"command line: option '--{key}' needs a value")
            value = rest[i + 1]
            i += 2
        if "." not in key:
            raise ConfigError(f"command line: unknown option '--{key}'; config overrides are dotted, e.g. --train.{key}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mesh-pretrain",
        description="Pretrain a vanilla / recursive / MeSH transformer with DeepSpeed ZeRO and megatron-core tensor "
        "parallelism. Prints the resolved config, logs to console + <run dir>/metrics.jsonl + wandb (offline by "
        "default), saves atomic checkpoints with the resolved config beside them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="run YAML (model, data, train, parallel, checkpoint, logging sections)")
    ap.add_argument("--resume", default=None, metavar="auto|none|PATH",
                    help="shorthand for --checkpoint.resume: 'auto' = latest complete checkpoint in checkpoint.dir if any, "
                    "or a checkpoint directory")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit without training")
    ap.add_argument("--list-options", action="store_true",
                    help="list every --section.key override with its type and default, then exit (--config not needed)")
    ap.add_argument("--debug", action="store_true",
                    help="on a one-line error (exit 2), raise it instead, with its traceback")
    return ap


def main(argv: list[str] | None = None) -> int:
    import warnings

    # megatron-core warns at import that Transformer Engine / Apex are absent (expected: plain torch kernels are used).
    warnings.filterwarnings("ignore", message=".*(Transformer Engine and Apex are not installed|full scope is deprecated).*")
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if args.list_options:
        from pretrain.config import describe_keys

        for key, tp, default in describe_keys():
            print(f"--{key:<38} {tp:<22} default: {default!r}")
        return 0
    if not args.config:
        ap.error("--config is required")
    try:
        from pretrain.config import load_run_config

        overrides = split_overrides(rest)
        if args.resume is not None:
            overrides["checkpoint.resume"] = args.resume
        cfg = load_run_config(args.config, overrides)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"mesh-pretrain: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from pretrain.train import train

    try:
        result = train(cfg)
        # From here the process only tears down: a late or repeated SIGTERM/SIGUSR1 (one rank's copy of a preemption
        # signal can arrive after the others stopped the run) must not turn a checkpointed stop into a kill. Python
        # resets its own handlers to the default action during interpreter shutdown, so ignore them instead.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"mesh-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from pretrain.distributed import destroy_parallel

        destroy_parallel()
    if result["stopped_by"]:
        print(f"[pretrain] stopped ({result['stopped_by']}) at step {result['step']}; resume with --resume auto", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
