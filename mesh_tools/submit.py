"""mesh-submit: check a job's layout, render the sbatch command for slurm/pretrain.sbatch and submit it.

    mesh-submit slurm/jobs/pythia-1.4b-mesh.yaml                       # sizes from the job file
    mesh-submit slurm/jobs/pythia-6.9b-mesh.yaml --chain 4 --partition gpu --account myproj
    mesh-submit --config configs/tiny-mesh.yaml --nodes 2 --gpus-per-node 0 -- --train.train_iters 50
    mesh-submit slurm/jobs/pythia-160m-mesh.yaml --dry-run              # print the sbatch command only

Before anything is queued: the overrides are validated against the trainer's run config (a typo fails here, not
after hours in the queue) and, for GPU jobs, `mesh-plan` must say the layout divides and fits (--force skips).
`--chain K` submits K jobs, each starting after the previous one ends (`--dependency=afterany:<id>`); each
resumes from the latest checkpoint, so a run longer than the partition's time limit continues across jobs.
Logs: <log-dir>/<job-name>-<jobid>.out (default logs/slurm/), appended across requeues.
Trainer overrides after `--` are passed on (`-- --train.lr 3e-4`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from mesh_megatron.config import ConfigError, ModelConfig
from mesh_tools.plan import estimate, job_from_args, layout_from_run, load_run_dict, report

SBATCH_SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "pretrain.sbatch"


def validate_overrides(config: str, overrides: dict[str, Any]) -> str:
    """Let the trainer's own config loader check every key and value; '' if OK, else why not."""
    from pretrain.config import load_run_config

    try:
        load_run_config(config, {k: v if isinstance(v, str) else _yaml_scalar(v) for k, v in overrides.items()})
    except ConfigError as e:
        return str(e)
    return ""


def _yaml_scalar(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def trainer_args(job: dict[str, Any], extra: list[str]) -> list[str]:
    args = ["--config", job["config"]]
    for k, v in job["overrides"].items():
        args += [f"--{k}", v if isinstance(v, str) else _yaml_scalar(v)]
    return args + extra


def sbatch_command(job: dict[str, Any], args: argparse.Namespace, extra: list[str], dependency: str | None) -> list[str]:
    g = int(job["gpus_per_node"])
    name = args.job_name or Path(job.get("_path", job["config"])).stem
    cmd = [
        "sbatch", "--parsable", f"--job-name={name}", f"--nodes={job['nodes']}",
        # One task per GPU (see slurm/pretrain.sbatch); a CPU node runs one gloo rank.
        f"--ntasks-per-node={g if g > 0 else 1}",
        f"--output={args.log_dir}/%x-%j.out",
    ]
    if g > 0:
        cmd.append(f"--gpus-per-node={g}")
    if args.cpus_per_task:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.time or job.get("time"):
        cmd.append(f"--time={args.time or job['time']}")
    if args.partition or job.get("partition"):
        cmd.append(f"--partition={args.partition or job['partition']}")
    if args.account:
        cmd.append(f"--account={args.account}")
    if dependency:
        cmd.append(f"--dependency={dependency}")
    cmd += args.sbatch_arg or []
    return cmd + [str(args.script)] + trainer_args(job, extra)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="mesh-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", nargs="?", help="a slurm/jobs/*.yaml file (config, nodes, gpus_per_node, overrides)")
    ap.add_argument("--config", help="a run config instead of a job file (then give --nodes and --gpus-per-node)")
    ap.add_argument("--nodes", type=int, help="number of nodes (overrides the job file)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each; 0 = CPU nodes, one gloo rank each")
    ap.add_argument("--time", help="time limit per job, e.g. 48:00:00 (overrides the job file)")
    ap.add_argument("--partition", help="Slurm partition")
    ap.add_argument("--account", help="Slurm account to charge")
    ap.add_argument("--cpus-per-task", type=int, help="CPU cores per rank (sets OMP_NUM_THREADS in the job)")
    ap.add_argument("--job-name", help="Slurm job name (default: the job file's name)")
    ap.add_argument("--chain", type=int, default=1, help="submit K jobs that run one after another, each resuming (default 1)")
    ap.add_argument("--dependency", help="extra dependency for the first job, e.g. afterok:1234")
    ap.add_argument("--log-dir", default="logs/slurm", help="where the job logs go (created; default logs/slurm)")
    ap.add_argument("--sbatch-arg", action="append", help="extra sbatch option, repeatable (e.g. --sbatch-arg=--exclusive)")
    ap.add_argument("--script", default=str(SBATCH_SCRIPT), help="the sbatch script (default slurm/pretrain.sbatch)")
    ap.add_argument("--force", action="store_true", help="submit even if mesh-plan refuses the layout")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch command(s) and the plan; submit nothing")
    args = ap.parse_args(argv)

    try:
        job = job_from_args(ap, args)
        if args.nodes is not None:
            job["nodes"] = args.nodes
        if args.gpus_per_node is not None:
            job["gpus_per_node"] = args.gpus_per_node
        if args.chain < 1:
            ap.error("--chain must be >= 1")
        problem = validate_overrides(job["config"], job["overrides"])
        if problem:
            print(f"mesh-submit: {problem}", file=sys.stderr)
            return 2
        run = load_run_dict(job["config"], job["overrides"])
        cfg = ModelConfig.from_dict(run["model"], source=job["config"])
        if int(job["gpus_per_node"]) > 0:
            layout = layout_from_run(run, int(job["nodes"]), int(job["gpus_per_node"]), float(job.get("gpu_memory_gb", 80)))
            plan = estimate(cfg, layout)
            print(report(plan, None, 0, 1.0).rsplit("\ntime to train", 1)[0])
            if not plan.fits and not args.force:
                print("\nmesh-submit: not submitted (mesh-plan refused the layout; fix it or pass --force):", file=sys.stderr)
                for p in plan.problems:
                    print(f"  - {p}", file=sys.stderr)
                return 2
    except ConfigError as e:
        print(f"mesh-submit: {e}", file=sys.stderr)
        return 2

    if not args.dry_run:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create it: the log would be lost
    dependency, ids = args.dependency, []
    for i in range(args.chain):
        cmd = sbatch_command(job, args, extra, dependency)
        print(("would run: " if args.dry_run else "") + shlex.join(cmd))
        if args.dry_run:
            dependency = "afterany:<previous job id>"
            continue
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"mesh-submit: sbatch failed (rc {res.returncode}): {res.stderr.strip()}", file=sys.stderr)
            return 1
        jid = res.stdout.strip().split(";")[0]
        ids.append(jid)
        dependency = f"afterany:{jid}"
    if ids:
        name = args.job_name or Path(job.get("_path", job["config"])).stem
        print(f"submitted job(s) {' '.join(ids)}; logs: {os.path.join(args.log_dir, f'{name}-<jobid>.out')}")
        print(f"follow: tail -f {os.path.join(args.log_dir, f'{name}-{ids[0]}.out')}    status: squeue -j {','.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
