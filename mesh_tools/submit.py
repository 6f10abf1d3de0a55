"""mesh-submit: check a job's layout, render the sbatch command for slurm/pretrain.sbatch and submit it.

    mesh-submit slurm/jobs/pythia-1.4b-mesh.yaml                       # sizes from the job file
    mesh-submit slurm/jobs/pythia-6.9b-mesh.yaml --chain 4 --partition gpu --account myproj
    mesh-submit --config configs/tiny-mesh.yaml --nodes 2 --gpus-per-node 0 -- --train.train_iters 50
    mesh-submit slurm/jobs/pythia-160m-mesh.yaml --dry-run              # print the sbatch command only

Before anything is queued (each failure is one line with the fix, exit 2, nothing submitted):
  - the run config resolves with the job's overrides and the trainer arguments after `--` (the trainer's own loader:
    a typo fails here, not after hours in the queue);
  - every data prefix (data.paths, valid_paths, test_paths) has its .bin and .idx, relative paths taken from the job's
    working directory (the submit directory, or --sbatch-arg=--chdir=DIR);
  - the python the job runs finds torch, deepspeed, megatron.core and this project. That python is this command's
    own interpreter (sys.executable), passed to the job as MESH_PYTHON, or MESH_PYTHON when it is already set;
  - for GPU jobs, `mesh-plan` says the layout divides and fits; for CPU jobs, that the global batch splits into
    micro-batches over the ranks (the message names the node counts that work);
  - when the run's checkpoint directory already holds a checkpoint (a resubmission), that the trainer will take it:
    the same model and global batch. Another layout (--nodes, TP size, ZeRO stage) is fine: a one-line note says the
    trainer converts it on load (pretrain/universal.py).
--force submits despite a failed data, python or layout check (e.g. data that a job this one depends on creates);
--dry-run reports them and prints the commands.
`--chain K` submits K jobs, each starting after the previous one ends (`--dependency=afterany:<id>`); each
resumes from the latest checkpoint, so a run longer than the partition's time limit continues across jobs.
`--eval "MESH_EVAL_ARGS"` also submits slurm/eval.sbatch (`mesh-eval --watch`, 1 node, 1 GPU for GPU runs) beside
each training job, `--dependency=after:<its id>` (it starts once training runs): every new checkpoint is evaluated
into <run dir>/eval while the run goes on (docs/eval.md, "On Slurm").
Logs: <log-dir>/<job-name>-<jobid>.out (default logs/slurm/), appended across requeues.
Trainer overrides after `--` are passed on (`-- --train.lr 3e-4`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from mesh_megatron.config import ConfigError, ModelConfig
from mesh_tools.plan import (batch_problem, checkpoint_layout, estimate, job_from_args, layout_from_run, load_run_dict,
                             report)

SBATCH_SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "pretrain.sbatch"
EVAL_SCRIPT = SBATCH_SCRIPT.with_name("eval.sbatch")
# What `python -m pretrain` needs in the job's interpreter. Found, not imported: importing them takes seconds.
JOB_MODULES = ("torch", "deepspeed", "megatron.core", "mesh_megatron", "pretrain")
_FIND_MODULES = """
import importlib.util, sys
def found(m):
    try:
        return importlib.util.find_spec(m) is not None
    except ImportError:  # a parent package is missing
        return False
print(" ".join(m for m in sys.argv[1:] if not found(m)))
"""


def resolve_run_config(config: str, overrides: dict[str, Any], extra: list[str]):
    """The run config the job will train with: the trainer's own loader, with the job's overrides and the trainer
    arguments after `--` (`--section.key value`, `--resume`). Raises ConfigError naming the key and the fix."""
    from pretrain.cli import build_parser, split_overrides
    from pretrain.config import load_run_config

    merged = {k: v if isinstance(v, str) else _yaml_scalar(v) for k, v in overrides.items()}
    targs, rest = build_parser().parse_known_args(extra)
    merged.update(split_overrides(rest))
    if targs.resume is not None:
        merged["checkpoint.resume"] = targs.resume
    return load_run_config(targs.config or config, merged)


def job_workdir(sbatch_args: list[str] | None) -> Path:
    """Where the job runs: the submit directory (sbatch's default; slurm/pretrain.sbatch does not cd), or --chdir."""
    wd = Path.cwd()
    for a in sbatch_args or []:
        if a.startswith("--chdir="):
            wd = wd / a.split("=", 1)[1]
        elif a.startswith("-D") and len(a) > 2:
            wd = wd / a[2:].lstrip("=")
    return wd


def job_python() -> tuple[str, bool]:
    """(the python the job will run, whether the user chose it with MESH_PYTHON)."""
    explicit = os.environ.get("MESH_PYTHON", "")
    return (explicit, True) if explicit else (sys.executable, False)


def data_problems(run, workdir: Path) -> list[str]:
    """One line per dataset prefix whose .bin or .idx the job would not find (relative paths from its workdir)."""
    if not run.data.paths:
        return [f"{run.source}: data.paths is empty; give the tokenized prefix (-- --data.paths '[PREFIX]', or the job's "
                "overrides), made with `mesh-data tokenize CORPUS -o PREFIX`"]
    out = []
    for field in ("paths", "valid_paths", "test_paths"):
        for prefix in getattr(run.data, field) or []:
            where = workdir / prefix  # an absolute prefix stays as it is
            missing = [ext for ext in (".bin", ".idx") if not Path(f"{where}{ext}").is_file()]
            if not missing:
                continue
            rel = "" if Path(prefix).is_absolute() else f" (relative to the job's working directory {workdir})"
            hint = "; give the prefix without .bin/.idx" if prefix.endswith((".bin", ".idx")) else ""
            out.append(f"data.{field}: no {', '.join(f'{where}{e}' for e in missing)}{rel}{hint}; fix the path, or make "
                       f"it with `mesh-data tokenize CORPUS -o {prefix}` (--force if a job this one depends on makes it)")
    return out


def python_problem(python: str, explicit: bool, workdir: Path) -> str:
    """'' if `python` (run from the job's workdir, as the job runs it) finds every module of JOB_MODULES."""
    who = f"MESH_PYTHON={python}" if explicit else f"this interpreter {python} (passed to the job as MESH_PYTHON)"
    fix = ("set MESH_PYTHON to the python of the environment where mesh-megatron is installed "
           "(e.g. /path/to/.venv/bin/python), or install it there with `pip install -e .`")
    exe = shutil.which(python) if os.sep not in python else str(workdir / python)
    if not python or not exe or not os.access(exe, os.X_OK):
        return f"{who}: not an executable python; {fix}"
    try:
        res = subprocess.run([exe, "-c", _FIND_MODULES, *JOB_MODULES], cwd=workdir, capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{who}: could not run it ({e}); {fix}"
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{who}: failed to start ({last}); {fix}"
    missing = res.stdout.split()
    return f"{who}: cannot import {', '.join(missing)} (run from {workdir}); {fix}" if missing else ""


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


def eval_job_args(spec: str, run_cfg, gpus: int) -> list[str]:
    """The arguments of slurm/eval.sbatch (`mesh-eval --watch`) for `--eval SPEC`: the run's checkpoint root, OUT
    <run dir>/eval unless SPEC names one, `--device cuda` on GPU runs unless SPEC says. SPEC is parsed by mesh-eval's
    own parser now, so a typo fails before anything is queued (ConfigError)."""
    from mesh_tools.eval.cli import build_parser

    try:
        extra = shlex.split(spec)
    except ValueError as e:
        raise ConfigError(f"--eval {spec!r}: {e}; quote it as one argument, e.g. --eval \"--tasks piqa --num-loops 1 2\"") from None
    for own in ("--checkpoint", "--watch"):
        if own in extra:
            raise ConfigError(f"--eval: leave out {own} (the watch job follows this run's checkpoint directory)")
    args = ["--checkpoint", str(run_cfg.checkpoint_dir)]
    if "--out" not in extra:
        args += ["--out", str(run_cfg.run_dir / "eval")]
    if gpus > 0 and "--device" not in extra:
        args += ["--device", "cuda"]
    args += extra

    def refuse(message: str):
        raise ConfigError(f"--eval {spec!r}: {message}; `mesh-eval --help` lists the flags")

    parser = build_parser()
    parser.error = refuse  # one line and exit 2, not argparse's usage text
    parsed = parser.parse_args(args)
    if not parsed.tasks and not parsed.ppl:
        refuse("nothing to evaluate (give --tasks and/or --ppl PREFIX)")
    return args


def eval_sbatch_command(job: dict[str, Any], args: argparse.Namespace, eval_args: list[str], train_id: str) -> list[str]:
    """sbatch for slurm/eval.sbatch: one task on one node (one GPU for GPU runs), after the training job started."""
    g = int(job["gpus_per_node"])
    name = (args.job_name or Path(job.get("_path", job["config"])).stem) + "-eval"
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks=1", f"--output={args.log_dir}/%x-%j.out"]
    if g > 0:
        cmd.append("--gpus-per-node=1")
    if args.cpus_per_task:
        cmd.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.eval_time or args.time or job.get("time"):
        cmd.append(f"--time={args.eval_time or args.time or job['time']}")
    if args.partition or job.get("partition"):
        cmd.append(f"--partition={args.partition or job['partition']}")
    if args.account:
        cmd.append(f"--account={args.account}")
    cmd.append(f"--dependency=after:{train_id}")
    # the watch job must run where the training job runs (relative checkpoint paths)
    cmd += [a for a in args.sbatch_arg or [] if a.startswith(("--chdir=", "-D"))]
    return cmd + [str(EVAL_SCRIPT), *eval_args]


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
    ap.add_argument("--eval", metavar="MESH_EVAL_ARGS", help="also submit a watch job (slurm/eval.sbatch: mesh-eval "
                    "--watch on 1 node / 1 GPU) beside each training job, e.g. --eval \"--tasks piqa --num-loops 1 2\"; "
                    "results in <run dir>/eval")
    ap.add_argument("--eval-time", help="time limit of each watch job (default: the training job's)")
    ap.add_argument("--force", action="store_true", help="submit even if mesh-plan refuses the layout, a data prefix "
                    "is missing or the job's python lacks a module")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the sbatch command(s), the plan and any failed check; submit nothing")
    args = ap.parse_args(argv)
    workdir = job_workdir(args.sbatch_arg)
    python, explicit = job_python()

    def at_workdir(path: str) -> str:  # the job opens relative paths from its working directory
        return path if workdir == Path.cwd() else str(workdir / path)

    try:
        job = job_from_args(ap, args)
        if args.nodes is not None:
            job["nodes"] = args.nodes
        if args.gpus_per_node is not None:
            job["gpus_per_node"] = args.gpus_per_node
        if args.chain < 1:
            ap.error("--chain must be >= 1")
        run_cfg = resolve_run_config(at_workdir(job["config"]), job["overrides"], extra)
        run = load_run_dict(at_workdir(job["config"]), job["overrides"])
        cfg = ModelConfig.from_dict(run["model"], source=job["config"])
        resolved = run_cfg.to_dict()  # the layout with the trainer arguments after `--` too (e.g. --parallel.zero_stage)
        if int(job["gpus_per_node"]) > 0:
            layout = layout_from_run(resolved, int(job["nodes"]), int(job["gpus_per_node"]), float(job.get("gpu_memory_gb", 80)))
            plan = estimate(cfg, layout)
            print(report(plan, None, 0, 1.0).rsplit("\ntime to train", 1)[0])
            if not plan.fits and not args.force:
                print("\nmesh-submit: not submitted (mesh-plan refused the layout; fix it or pass --force):", file=sys.stderr)
                for p in plan.problems:
                    print(f"  - {p}", file=sys.stderr)
                return 2
        else:  # CPU nodes, one gloo rank each: no memory plan, but the batch must still split over the ranks
            layout = layout_from_run(resolved, int(job["nodes"]), 1, 0)
            if (batch := batch_problem(layout)) and not args.force:
                print(f"mesh-submit: not submitted: {batch}", file=sys.stderr)
                return 2
        # A resubmission (or a chain) into a run directory with a checkpoint: the trainer resumes it, converting it
        # when this layout (nodes, TP, ZeRO) differs; one of another model or global batch it would refuse.
        note = checkpoint_layout(run_cfg, at_workdir(str(run_cfg.checkpoint_dir)), layout)
        if note:
            print(f"mesh-submit: {note}")
        problems = data_problems(run_cfg, workdir)
        eval_args = eval_job_args(args.eval, run_cfg, int(job["gpus_per_node"])) if args.eval else None
    except ConfigError as e:
        print(f"mesh-submit: {e}", file=sys.stderr)
        return 2
    problems += [p for p in [python_problem(python, explicit, workdir)] if p]
    if problems:
        tag = "would not submit: " if args.dry_run else "warning (--force): " if args.force else ""
        for p in problems:
            print(f"mesh-submit: {tag}{p}", file=sys.stderr)
        if not (args.dry_run or args.force):
            print("mesh-submit: nothing submitted (fix the above, or --force to submit anyway)", file=sys.stderr)
            return 2
    # The job runs "$MESH_PYTHON" (plain `python` without it: whatever is first on the node's PATH); sbatch copies
    # this environment into the job, so this is the interpreter just checked.
    job_env = {"MESH_PYTHON": python}
    shown = f"MESH_PYTHON={shlex.quote(python)} "

    if not args.dry_run:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create it: the log would be lost
    dependency, ids = args.dependency, []
    for i in range(args.chain):
        cmd = sbatch_command(job, args, extra, dependency)
        print(("would run: " if args.dry_run else "") + shown + shlex.join(cmd))
        if args.dry_run:
            dependency = "afterany:<previous job id>"
            if eval_args is not None:
                ecmd = eval_sbatch_command(job, args, eval_args, f"<id of training job {i + 1}>")
                print("would run: " + shown + shlex.join(ecmd))
            continue
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **job_env})
        if res.returncode != 0:
            print(f"mesh-submit: sbatch failed (rc {res.returncode}): {res.stderr.strip()}", file=sys.stderr)
            return 1
        jid = res.stdout.strip().split(";")[0]
        ids.append(jid)
        dependency = f"afterany:{jid}"
        if eval_args is not None:
            ecmd = eval_sbatch_command(job, args, eval_args, jid)
            print(shown + shlex.join(ecmd))
            res = subprocess.run(ecmd, capture_output=True, text=True, env={**os.environ, **job_env})
            if res.returncode != 0:
                print(f"mesh-submit: sbatch of the eval job failed (rc {res.returncode}): {res.stderr.strip()}; the "
                      f"training job {jid} is queued", file=sys.stderr)
                return 1
            ids.append(res.stdout.strip().split(";")[0])
    if ids:
        name = args.job_name or Path(job.get("_path", job["config"])).stem
        print(f"submitted job(s) {' '.join(ids)}; logs: {os.path.join(args.log_dir, f'{name}-<jobid>.out')}")
        print(f"follow: tail -f {os.path.join(args.log_dir, f'{name}-{ids[0]}.out')}    status: squeue -j {','.join(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
