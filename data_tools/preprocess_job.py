"""mesh-data submit-preprocess: tokenize many input files across the nodes of a Slurm cluster.

Two submissions of slurm/preprocess.sbatch with the same `mesh-data tokenize` arguments:
1. a job array of N tasks (--array=0-(N-1)); task I runs `tokenize ARGS --task-index I --num-tasks N`
   with every core of its node and writes the shards of input files I, I+N, I+2N, ... into
   OUTPUT_PREFIX.work/ (each committed with a .done.json marker);
2. one job with --dependency=afterok:ARRAY running the plain `tokenize ARGS`, which finds every shard
   done and only merges them into OUTPUT_PREFIX.bin/.idx/.meta.json.
After a failed or preempted task, the merge job is cancelled by Slurm (--kill-on-invalid-dep=yes)
instead of pending forever; submitting the same command again redoes only the unfinished files.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .errors import DataToolsError

SCRIPT = Path(__file__).resolve().parent.parent / "slurm" / "preprocess.sbatch"


def _check(tokenize_args: list[str]) -> int:
    """The tokenize arguments parse, the inputs and the tokenizer exist here; returns the number of input files."""
    from .cli import build_parser
    from .readers import expand_inputs

    if any(a.split("=")[0] in ("--task-index", "--num-tasks") for a in tokenize_args):
        raise DataToolsError("submit-preprocess sets --task-index/--num-tasks itself; leave them out of the tokenize arguments")
    args = build_parser().parse_args(["tokenize", *tokenize_args])  # argparse exits 2 with its usage on a bad flag
    if not os.path.isfile(args.tokenizer_model):
        raise DataToolsError(f"tokenizer model {args.tokenizer_model} does not exist (the jobs run in {os.getcwd()})")
    return len(expand_inputs(list(args.inputs)))


def sbatch_commands(tokenize_args: list[str], tasks: int, sbatch_args: list[str], log_dir: str, job_name: str,
                    script: str) -> tuple[list[str], list[str]]:
    """(array command, merge command); the merge command's dependency is completed with the array's job id."""
    # a task uses its whole node unless the user sized it; the merge job mostly copies bytes: one CPU
    node = [] if any(a.startswith(("--cpus-per-task", "-c")) for a in sbatch_args) else ["--exclusive"]
    common = ["sbatch", "--parsable", f"--job-name={job_name}", f"--chdir={os.getcwd()}"]
    array = [*common, f"--array=0-{tasks - 1}", f"--output={log_dir}/%x-%A_%a.out", *node, *sbatch_args, script, *tokenize_args]
    merge = [*common, "--kill-on-invalid-dep=yes", f"--output={log_dir}/%x-merge-%j.out", *sbatch_args, script, *tokenize_args]
    return array, merge


def submit_preprocess(tokenize_args: list[str], tasks: int, sbatch_args: list[str], log_dir: str = "logs/slurm",
                      job_name: str = "mesh-preprocess", script: str | None = None, dry_run: bool = False) -> dict:
    """Check, then submit the array and the merge job. Returns {"array": id, "merge": id, "tasks": n} (ids None on a dry run)."""
    if tokenize_args[:1] == ["--"]:
        tokenize_args = tokenize_args[1:]
    if not tokenize_args:
        raise DataToolsError("give the tokenize arguments after `--`, e.g. -- 'pile/*.jsonl.zst' -o pile_neox --tokenizer-model gpt-neox-20b.json")
    if tasks < 1:
        raise DataToolsError(f"--tasks must be >= 1, got {tasks}")
    script = os.path.abspath(script or SCRIPT)
    if not os.path.isfile(script):
        raise DataToolsError(f"sbatch script {script} does not exist; pass --script")
    n_files = _check(tokenize_args)
    if tasks > n_files:
        print(f"submit-preprocess: {n_files} input files: {tasks} tasks -> {n_files} (one file is the smallest share)", file=sys.stderr)
        tasks = n_files
    array, merge = sbatch_commands(tokenize_args, tasks, sbatch_args, log_dir, job_name, script)
    # the jobs run "$MESH_PYTHON": this interpreter unless the user chose one (sbatch passes the environment on)
    env = {**os.environ, "MESH_PYTHON": os.environ.get("MESH_PYTHON") or sys.executable}
    show = f"MESH_PYTHON={shlex.quote(env['MESH_PYTHON'])} "
    dep = "--dependency=afterok:"
    if dry_run:
        print("would run: " + show + shlex.join(array))
        print("would run: " + show + shlex.join([*merge[:2], dep + "ARRAY_JOB_ID", *merge[2:]]))
        return {"array": None, "merge": None, "tasks": tasks}
    os.makedirs(log_dir, exist_ok=True)  # sbatch does not create it, and the logs would be lost

    def sbatch(cmd: list[str]) -> str:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        except FileNotFoundError:
            raise DataToolsError("sbatch not found on PATH: run this on a Slurm login node") from None
        except subprocess.TimeoutExpired:
            raise DataToolsError("sbatch did not answer in 120 s (is slurmctld up?)") from None
        if res.returncode:
            raise DataToolsError(f"sbatch failed (rc {res.returncode}): {res.stderr.strip()} [{shlex.join(cmd)}]")
        return res.stdout.strip().split(";")[0]

    array_id = sbatch(array)
    try:
        merge_id = sbatch([*merge[:2], dep + array_id, *merge[2:]])
    except DataToolsError as e:
        raise DataToolsError(f"array job {array_id} was submitted, the merge job was not: {e}; submit it by hand with "
                             f"{dep}{array_id}") from None
    print(f"submitted array job {array_id} ({tasks} tasks over {n_files} input files) and merge job {merge_id} "
          f"({dep}{array_id}); logs in {log_dir}/")
    return {"array": array_id, "merge": merge_id, "tasks": tasks}
