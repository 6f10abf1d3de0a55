"""End to end on a REAL Slurm: a 2-node cluster emulated on this machine (slurm/local/up.sh: one slurmd per network
namespace), the project's own slurm/pretrain.sbatch submitted with --nodes=2 on CPU / gloo.

1. the launch smoke trainer (slurm/smoke_train.py): rendezvous across the two nodes, all-reduce, checkpoint;
2. the real trainer (`python -m pretrain`, tiny MeSH config) submitted with mesh-submit --chain 2: job 1 trains and
   checkpoints, gets the time-limit signal (SIGUSR1 to the batch shell, as --signal=B:USR1@300 sends it), saves,
   requeues itself, resumes from its checkpoint and finishes; job 2 (afterany dependency) resumes the finished run;
3. another node count: a 2-node (2-rank, ZeRO-1) run's checkpoint resubmitted with --nodes 1 is converted, resumed
   and finished with the uninterrupted run's losses.

Needs root (daemons, namespaces) and Debian's slurm-wlm + munge; installs them with apt-get if missing. Skips with
the reason where not root, apt is unreachable or namespaces are not permitted. The cluster is always torn down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "slurm" / "local"
NEED = ("slurmctld", "slurmd", "munged", "munge", "sbatch", "scontrol", "ip", "unshare", "nsenter")


def _run(cmd, timeout, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _ensure_slurm() -> None:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux (starts slurmctld/slurmd and creates network namespaces)")
    if all(shutil.which(b) for b in NEED):
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"Slurm not installed and no apt-get to install it (need {', '.join(b for b in NEED if not shutil.which(b))})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        up = _run(["apt-get", "update", "-qq"], 180, env=env)
        inst = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "iproute2"], 400, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("apt-get timed out installing slurm-wlm (no package mirror reachable?)")
    if up.returncode or inst.returncode:
        pytest.skip(f"could not install slurm-wlm with apt-get: {(up.stderr + inst.stderr).strip()[-300:]}")
    missing = [b for b in NEED if not shutil.which(b)]
    if missing:
        pytest.skip(f"still missing after install: {missing}")


@pytest.fixture(scope="module")
def cluster():
    _ensure_slurm()
    probe = _run(["unshare", "--net", "--uts", "--mount", "true"], 10)
    if probe.returncode:
        pytest.skip(f"namespaces not permitted here (need CAP_SYS_ADMIN + CAP_NET_ADMIN): {probe.stderr.strip()}")
    if _run(["ip", "link", "show", "slurmci-br"], 10).returncode == 0:
        pytest.skip("bridge slurmci-br exists: another local cluster is up (slurm/local/down.sh tears it down)")
    d = Path(tempfile.mkdtemp(prefix="slurm-local-test-", dir="/tmp"))
    d.chmod(0o755)  # munged needs a world-executable socket directory
    env = {**os.environ, "SLURM_LOCAL_DIR": str(d / "cluster"), "NNODES": "2", "CPUS": str(os.cpu_count() or 2)}
    try:
        up = _run([str(LOCAL / "up.sh")], 120, env=env)
        assert up.returncode == 0, f"slurm/local/up.sh failed:\n{up.stdout}\n{up.stderr}"
        env["SLURM_CONF"] = str(d / "cluster" / "slurm.conf")
        env.update(OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR", MESH_PYTHON=sys.executable, SBATCH_WAIT_TIMEOUT="400")
        yield {"env": env, "dir": d}
    finally:
        down = _run([str(LOCAL / "down.sh")], 120, env={**env, "SLURM_LOCAL_KEEP": "0"})
        print(down.stdout, down.stderr)
        shutil.rmtree(d, ignore_errors=True)
    # Nothing of ours may survive the teardown.
    assert _run(["ip", "link", "show", "slurmci-br"], 10).returncode != 0, "bridge left behind"
    assert "slurmci-n" not in _run(["ip", "netns", "list"], 10).stdout, "namespaces left behind"


def job_info(env, jid: str) -> dict[str, str]:
    out = _run(["scontrol", "show", "job", "-o", jid], 30, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(env, jid: str, timeout: float) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(env, jid)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
            return info
        time.sleep(0.5)
    _run(["scancel", jid], 30, env=env)
    raise AssertionError(f"job {jid} did not finish in {timeout}s: {job_info(env, jid)}")


def wait_for_text(path: Path, pattern: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and re.search(pattern, path.read_text(errors="replace")):
            return
        time.sleep(0.3)
    raise AssertionError(f"'{pattern}' did not appear in {path} within {timeout}s:\n{path.read_text() if path.exists() else '(no file)'}")


def test_smoke_launch_two_nodes(cluster):
    env, d = dict(cluster["env"]), cluster["dir"]
    env["MESH_ENTRY"] = str(ROOT / "slurm" / "smoke_train.py")
    res = _run([str(LOCAL / "sbatch-wait.sh"), "--nodes=2", f"--output={d}/smoke-%j.out", f"--chdir={ROOT}",
                str(ROOT / "slurm" / "pretrain.sbatch"), "--checkpoint.dir", str(d / "smoke-ckpt"),
                "--train.train_iters", "6", "--smoke.step_seconds", "0.01"], 300, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    # Two ranks, on two different emulated hosts, agreed on the all-reduce and checkpointed.
    assert re.search(r"rank 0/2 on node1 master=node1", res.stdout) and re.search(r"rank 1/2 on node2 master=node1", res.stdout)
    assert "finished step 6: total=18.0 expected=18.0 OK" in res.stdout
    assert (d / "smoke-ckpt" / "step_0000006.pt").exists()


def test_a_pending_job_given_fewer_nodes_starts_one_task_per_node_it_has(cluster):
    """A job submitted for 2 nodes whose request is changed while it pends (as after a requeue: `scontrol update
    NumNodes=1 NumTasks=1`) runs 1 task on its 1 node: not the 2 of its submission's SLURM_NTASKS, both on one node."""
    env, d = dict(cluster["env"]), cluster["dir"]
    env["MESH_ENTRY"] = str(ROOT / "slurm" / "smoke_train.py")
    res = _run(["sbatch", "--parsable", "--hold", "--nodes=2", "--ntasks-per-node=1", f"--output={d}/shrink-%j.out",
                f"--chdir={ROOT}", str(ROOT / "slurm" / "pretrain.sbatch"), "--checkpoint.dir", str(d / "shrink-ckpt"),
                "--train.train_iters", "3", "--smoke.step_seconds", "0.01"], 60, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    jid = res.stdout.strip().split(";")[0]
    for cmd in (["update", f"JobId={jid}", "NumNodes=1", "NumTasks=1"], ["release", jid]):
        assert _run(["scontrol", *cmd], 30, env=env).returncode == 0
    info = wait_job(env, jid, 120)
    text = (d / f"shrink-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert "1 nodes x 1 tasks = 1 tasks (the job was submitted for 2)" in text, text
    assert "rank 0/1 on node1" in text and "/2 on" not in text, text
    assert "finished step 3: total=3.0 expected=3.0 OK" in text, text


def _tiny_corpus(d: Path) -> str:
    """A few hundred documents of the shipped sample, tokenized with the shipped SentencePiece model (seconds)."""
    import io

    import zstandard

    data_tools = pytest.importorskip("data_tools")
    src = ROOT / "data" / "sample" / "sample.jsonl.zst"
    if not src.exists():
        pytest.skip("data/sample/sample.jsonl.zst not in this checkout")
    lines = []
    with zstandard.ZstdDecompressor().stream_reader(src.open("rb")) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            lines.append(line)
            if len(lines) >= 150:
                break
    small = d / "small.jsonl"
    small.write_text("".join(lines))
    prefix = d / "data" / "small_text_document"
    data_tools.tokenize_files([str(small)], str(prefix), tokenizer="sentencepiece",
                              tokenizer_model=str(ROOT / "data" / "tokenizers" / "sample_sp8k.model"), workers=1)
    return str(prefix)


def test_pretrain_trains_checkpoints_requeues_and_resumes(cluster):
    env, d = dict(cluster["env"]), cluster["dir"]
    # stale launcher variables in the submitting shell (as after a torchrun session, or an in-process test of this
    # suite): sbatch exports them to the job, and the script must not let them make each task a world of its own
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    prefix = _tiny_corpus(d)
    run_dir = d / "run"
    logs = d / "logs"
    iters = 24
    sub = _run([sys.executable, "-m", "mesh_tools.submit", "--config", "configs/demo.yaml", "--nodes", "2",
                "--gpus-per-node", "0", "--chain", "2", "--job-name", "e2e", "--log-dir", str(logs), "--time", "00:10:00",
                "--", "--data.paths", f"[{prefix}]", "--logging.dir", str(run_dir), "--train.train_iters", str(iters),
                "--checkpoint.save_interval", "8", "--train.eval_interval", "0", "--train.log_interval", "2",
                "--parallel.zero_stage", "1", "--logging.wandb.mode", "disabled",
                # every split needs documents: megatron-core loops forever on an empty one (150 docs x 949,50,1)
                "--data.split", "80,10,10"], 60, env=env, cwd=ROOT)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    first, second = re.search(r"submitted job\(s\) (\d+) (\d+)", sub.stdout).groups()
    log1 = logs / f"e2e-{first}.out"

    # Job 1 trains and writes a periodic checkpoint; then the time-limit warning arrives (as --signal=B:USR1 does).
    wait_for_text(log1, r"saved checkpoint \S*step_00000008", 240)
    assert _run(["scancel", "--batch", "--signal=USR1", first], 30, env=env).returncode == 0
    info1 = wait_job(env, first, 400)
    text1 = log1.read_text()
    # a str message (not a tuple) so pytest prints the whole job log instead of a truncated repr
    assert info1["JobState"] == "COMPLETED" and info1["ExitCode"] == "0:0", f"{info1}\n{text1}"
    assert info1["Restarts"] == "1", f"job 1 should have requeued itself once: {info1}\n{text1}"
    assert "SIGUSR1" in text1 and "requeueing job" in text1 and "restart=1" in text1
    assert text1.count("world 2 = TP 1 x DP 2") == 2, f"both starts must form one 2-rank world:\n{text1}"
    m = re.search(r"resumed from \S*step_(\d+) at step (\d+)", text1)
    assert m, f"the requeued job did not resume from a checkpoint:\n{text1}"
    resumed_at = int(m.group(2))
    assert 8 <= resumed_at < iters, text1
    assert re.search(rf"step\s+{iters}/{iters}", text1)

    # Job 2 of the chain started only after job 1 (afterany) and resumed the finished run without training more.
    info2 = wait_job(env, second, 300)
    text2 = (logs / f"e2e-{second}.out").read_text()
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", f"{info2}\n{text2}"
    assert f"afterany:{first}" in sub.stdout
    assert re.search(rf"resumed from \S*step_0*{iters} at step {iters}", text2), text2

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts[-1] == f"step_{iters:08d}", ckpts
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == iters


def test_resubmitted_on_one_node_resumes_a_two_node_checkpoint(cluster):
    """A run saved by 2 ranks on 2 nodes (ZeRO-1: the optimizer state is partitioned over both) is resubmitted with
    --nodes 1: mesh-submit says it converts, the 1-rank job converts the checkpoint once into <step>/universal/,
    resumes and finishes, with the losses of the uninterrupted 2-rank run."""
    env, d = dict(cluster["env"]), cluster["dir"]
    prefix = str(d / "data" / "small_text_document")
    if not Path(prefix + ".idx").exists():
        prefix = _tiny_corpus(d)
    logs, iters, save_at = d / "nodes-logs", 6, 3

    def submit(nodes: int, run_dir: Path) -> subprocess.CompletedProcess:
        return _run([sys.executable, "-m", "mesh_tools.submit", "--config", "configs/demo.yaml", "--nodes", str(nodes),
                     "--gpus-per-node", "0", "--job-name", f"nodes{nodes}", "--log-dir", str(logs), "--time", "00:10:00",
                     "--", "--data.paths", f"[{prefix}]", "--logging.dir", str(run_dir), "--train.train_iters", str(iters),
                     "--checkpoint.save_interval", str(save_at), "--checkpoint.keep_last", "0", "--train.eval_interval",
                     "0", "--train.log_interval", "1", "--parallel.zero_stage", "1", "--logging.wandb.mode", "disabled",
                     "--data.split", "80,10,10"], 60, env=env, cwd=ROOT)

    def losses(run_dir: Path) -> dict[int, float]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}

    # the uninterrupted 2-rank run, which saves step 3 on the way
    two = d / "two-nodes"
    sub = submit(2, two)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    jid = re.search(r"submitted job\(s\) (\d+)", sub.stdout).group(1)
    info = wait_job(env, jid, 400)
    text = (logs / f"nodes2-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert "world 2 = TP 1 x DP 2" in text, text

    # its step-3 checkpoint, as a run stopped there would have left it, resubmitted on one node
    one = d / "one-node"
    step = f"step_{save_at:08d}"
    shutil.copytree(two / "checkpoints" / step, one / "checkpoints" / step)
    sub = submit(1, one)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    assert (f"mesh-submit: resuming {step} saved on TP 1 x DP 2 ZeRO-1 as TP 1 x DP 1 ZeRO-1: converted on load"
            in sub.stdout), sub.stdout
    jid = re.search(r"submitted job\(s\) (\d+)", sub.stdout).group(1)
    info = wait_job(env, jid, 400)
    text = (logs / f"nodes1-{jid}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert "world 1 = TP 1 x DP 1" in text and "layout changed (data-parallel size 2 -> 1)" in text, text
    assert re.search(rf"resumed from \S*{step} at step {save_at}\b", text), text
    assert re.search(rf"step\s+{iters}/{iters}", text), text
    assert (one / "checkpoints" / step / "universal" / "zero" / "optimizer_state.pt").is_file()
    print(re.search(r"loaded \S+ into the new layout in [\d.]+s", text).group(0))  # the conversion's cost (docs)
    # the same steps as the uninterrupted run: the global batch is the same, only the summation order changed
    ref, got = losses(two), losses(one)
    assert sorted(got) == list(range(save_at + 1, iters + 1)), got
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got, ref)


def test_scancel_with_wandb_offline_saves_exits_0_and_resumes(cluster):
    """A plain `scancel` (SIGTERM to every process of the job, wandb's service included) with the default wandb
    offline logging: the ranks save the step they stop at and exit 0, and a resubmission resumes from that step.
    (Before, rank 0 died in wandb's dead connection: rc 1, no checkpoint.)"""
    env, d = dict(cluster["env"]), cluster["dir"]
    env.pop("WANDB_SERVICE", None)  # an in-process wandb run of this session must not become the job's service
    prefix = str(d / "data" / "small_text_document")
    if not Path(prefix + ".idx").exists():
        prefix = _tiny_corpus(d)
    run_dir, logs = d / "cancel-run", d / "cancel-logs"
    logs.mkdir(exist_ok=True)

    def submit(*extra: str) -> str:
        res = _run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--job-name=cancel",
                    f"--output={logs}/cancel-%j.out", f"--chdir={ROOT}", str(ROOT / "slurm" / "pretrain.sbatch"),
                    "--config", "configs/demo.yaml", "--data.paths", f"[{prefix}]", "--logging.dir", str(run_dir),
                    "--train.train_iters", "100000", "--checkpoint.save_interval", "4", "--train.eval_interval", "0",
                    "--train.log_interval", "1", "--parallel.zero_stage", "1", "--logging.wandb.mode", "offline",
                    "--data.split", "80,10,10", *extra], 60, env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip().split(";")[0]

    first = submit()
    log1 = logs / f"cancel-{first}.out"
    wait_for_text(log1, r"saved checkpoint \S*step_00000004", 240)
    assert _run(["scancel", first], 30, env=env).returncode == 0
    info1 = wait_job(env, first, 120)
    # the job is CANCELLED at once; its processes are still saving and exiting (within KillWait)
    wait_for_text(log1, r"training step exited with rc=\d+", 120)
    text1 = log1.read_text()
    assert info1["JobState"] == "CANCELLED", f"{info1}\n{text1}"
    assert "SIGTERM: ranks are saving a checkpoint" in text1, text1
    assert "training step exited with rc=0" in text1, f"the ranks did not exit 0 on scancel:\n{text1}"
    assert "Traceback" not in text1, text1
    m = re.search(r"stopping on (?:SIGTERM|a signal to another rank) after step (\d+); checkpoint saved", text1)
    assert m, text1
    stop = int(m.group(1))
    assert stop > 4, text1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stop:08d}"

    second = submit("--train.exit_at_step", str(stop + 2))
    info2 = wait_job(env, second, 300)
    text2 = (logs / f"cancel-{second}.out").read_text()
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", f"{info2}\n{text2}"
    assert re.search(rf"resumed from \S*step_0*{stop} at step {stop}\b", text2), text2
    assert re.search(rf"step\s+{stop + 1}/100000", text2), text2


def test_preprocess_array_across_nodes_then_merge_equals_one_machine(cluster):
    """slurm/preprocess.sbatch through `mesh-data submit-preprocess`: a 2-task array over 4 input files (one node each,
    every core of it), then the afterok merge job; the merged dataset is byte for byte a single-machine tokenize."""
    from test_data_helpers import NEOX, sample_records, write_jsonl

    import data_tools

    env, d = dict(cluster["env"]), cluster["dir"] / "preprocess"
    d.mkdir()
    files = [str(write_jsonl(d / f"part{i}.jsonl{'.zst' if i % 2 else ''}", sample_records(10, start=10 * i))) for i in range(4)]
    prefix, logs = d / "out" / "corpus", d / "logs"
    sub = _run([sys.executable, "-m", "data_tools", "submit-preprocess", "--tasks", "2", "--log-dir", str(logs), "--job-name", "prep",
                "--", *files, "-o", str(prefix), "--tokenizer-model", str(NEOX)], 60, env=env, cwd=ROOT)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    array, merge = re.search(r"submitted array job (\d+) .* merge job (\d+) \(--dependency=afterok:\1\)", sub.stdout).groups()

    info = wait_job(env, merge, 120)
    task_logs = {t: (logs / f"prep-{array}_{t}.out").read_text() for t in (0, 1)}
    merge_log = (logs / f"prep-merge-{merge}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{merge_log}\n{task_logs}"
    # each task tokenized its own two files, with the cores of its own node (the two emulated hosts)
    for t, text in task_logs.items():
        assert f"task {t}/2: 2 input files (0 done before)" in text and "rc=0" in text, text
    hosts = {re.search(r"host=(\S+)", text).group(1) for text in task_logs.values()}
    assert hosts == {"node1", "node2"}, task_logs
    assert "files      4 (4 resumed)" in merge_log, merge_log  # the merge job only merged

    local = d / "local"
    data_tools.tokenize_files(files, str(local), "hf", str(NEOX), quiet=True)
    for ext in (".bin", ".idx"):
        assert Path(f"{prefix}{ext}").read_bytes() == Path(f"{local}{ext}").read_bytes(), ext
    assert json.loads(Path(f"{prefix}.meta.json").read_text())["documents"] == 40
    assert not Path(f"{prefix}.work").exists()
