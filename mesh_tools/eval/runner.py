"""Evaluate training checkpoints at one or several loop counts K: lm-evaluation-harness tasks (as a library, on the
Hugging Face model built in memory by the export's own conversion) and perplexity on `.bin/.idx` prefixes.

Context length: lm-eval is given `max_length` = the checkpoint's training sequence length unless --max-length says
otherwise, so a context longer than that is truncated from the left (lm-eval's own rule) and the model never sees
positions it was not trained on; only a continuation longer than max_length cannot be scored (a one-line error).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mesh_megatron.config import ConfigError, ModelConfig
from mesh_tools.eval import cache
from mesh_tools.eval.cache import EvalSettings
from mesh_tools.hf.export import ExportError, build_hf_model, check_writable, load_checkpoint, tokenizer_from_run_config
from mesh_tools.hf.tokenizer import TokenizerExportError, TokenizerSource, export_tokenizer
from pretrain.checkpoint import TAG_RE, complete_checkpoints, is_complete, read_state


class EvalError(ConfigError):
    """A user-facing mesh-eval failure; the message names the path or flag and the fix."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    tokens_seen: int | None
    model: ModelConfig
    run_config: dict


# --- inputs ---------------------------------------------------------------------------------------------------------


def find_checkpoints(path: str | Path) -> list[Path]:
    """A single complete `step_*` checkpoint, or every complete checkpoint of a run's checkpoint root, oldest first."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"--checkpoint {p}: no such directory")
    if is_complete(p):
        return [p]
    if TAG_RE.match(p.name):
        raise EvalError(f"--checkpoint {p}: incomplete checkpoint (no COMPLETE marker); pass a complete one or the run's checkpoint root")
    found = complete_checkpoints(p)
    if not found:
        raise EvalError(f"--checkpoint {p}: holds no complete step_* checkpoint; pass a checkpoint or a run's checkpoint root")
    return found


def describe(path: Path) -> Checkpoint:
    """Step, tokens seen and model config of a checkpoint, from its small state files (no weights read)."""
    try:
        state, run_cfg = read_state(path)
        model = ModelConfig.from_dict(dict(run_cfg["model"]), source=f"{path} (run config)")
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise EvalError(f"--checkpoint {path}: cannot read its trainer state / run config ({type(e).__name__}: {e})") from None
    return Checkpoint(path, int(state.step), state.tokens_seen, model, run_cfg)


def check_ppl_prefix(prefix: str) -> None:
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise EvalError(f"--ppl {prefix}: {prefix}{ext} not found; pass a dataset prefix (PREFIX.bin + PREFIX.idx, as mesh-data writes)")


def task_manager(settings: EvalSettings):
    """lm-eval's TaskManager (with --include-path), after checking every requested task name exists."""
    if not settings.tasks:
        return None
    from lm_eval.tasks import TaskManager

    if settings.include_path and not Path(settings.include_path).exists():
        raise EvalError(f"--include-path {settings.include_path}: no such file or directory")
    tm = TaskManager(include_path=settings.include_path)
    unknown = [t for t in settings.tasks if t not in tm.all_tasks]
    if unknown:
        hint = " (or add their YAML with --include-path DIR)"
        raise EvalError(f"--tasks: unknown lm-eval task(s) {unknown}{hint}; `lm_eval ls tasks` lists the known ones")
    return tm


def loop_counts(cfg: ModelConfig, requested: list[int] | None) -> list[int | None]:
    """The K to evaluate: as requested (default: as trained); a vanilla model has no loops (None)."""
    if cfg.arch == "vanilla":
        return [None]
    return list(dict.fromkeys(requested or [cfg.num_loops]))


# --- measuring ------------------------------------------------------------------------------------------------------


def flatten_lm_eval(results: dict) -> dict[str, float]:
    """{task/metric: value} from lm-eval's results, without stderr and bookkeeping entries ("acc,none" -> "acc")."""
    out = {}
    for task, r in results.items():
        for name, v in r.items():
            if "stderr" in name or not isinstance(v, (int, float)) or isinstance(v, bool) or name == "sample_len":
                continue
            metric, _, filt = name.partition(",")
            out[f"{task}/{metric}" + ("" if filt in ("", "none") else f"_{filt}")] = float(v)
    return out


def run_lm_eval(model, tokenizer, tm, settings: EvalSettings, max_length: int, batch_size: int, num_loops) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(settings.tasks), task_manager=tm, num_fewshot=settings.num_fewshot,
                                      limit=settings.limit, log_samples=False, verbosity="WARNING")
    except AssertionError as e:  # lm-eval's sanity checks; a continuation longer than max_length is the one users hit
        raise EvalError(f"lm-eval stopped at K={num_loops} ({e or 'assertion'}): most likely a continuation longer than "
                        f"--max-length {max_length}; pass a larger --max-length (positions past the training length are extrapolated)") from None
    return {"results": res["results"], "versions": res.get("versions"), "n-shot": res.get("n-shot")}


def perplexity(model, prefix: str, seq_length: int, max_tokens: int, batch_size: int, vocab_size: int) -> dict:
    """Mean next-token loss and perplexity on the first `max_tokens` predicted tokens of a `.bin/.idx` dataset, in
    non-overlapping windows of `seq_length` predictions (documents concatenated, as in training)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    n_windows = max(1, max_tokens // seq_length)
    need = n_windows * seq_length + 1
    parts, have = [], 0
    for i in range(len(ds)):
        doc = ds[i]
        parts.append(torch.from_numpy(doc.astype("int64")))
        have += len(doc)
        if have >= need:
            break
    stream = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    n_windows = min(n_windows, (len(stream) - 1) // seq_length)
    if n_windows < 1:
        raise EvalError(f"--ppl {prefix}: only {len(stream)} tokens, fewer than one window of {seq_length + 1}")
    if int(stream.max()) >= vocab_size:
        raise EvalError(f"--ppl {prefix}: token id {int(stream.max())} >= the model's vocabulary ({vocab_size}); "
                        "the dataset was tokenized with another tokenizer")
    windows = torch.stack([stream[w * seq_length: w * seq_length + seq_length + 1] for w in range(n_windows)])
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, n_windows, batch_size):
            x = windows[b: b + batch_size].to(device)
            logits = model(input_ids=x[:, :-1], use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    mean = total / count
    return {"loss": mean, "ppl": math.exp(min(mean, 700.0)), "tokens": count}


# --- the run --------------------------------------------------------------------------------------------------------


def _tokenizer(src: TokenizerSource, model_max_length: int):
    """An AutoTokenizer for `src`, through the export's own tokenizer conversion (written to a temporary dir)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mesh-eval-tok") as d:
        export_tokenizer(src, Path(d), model_max_length=model_max_length)
        return AutoTokenizer.from_pretrained(d)


class WandbLog:
    """Best effort logging to the run's wandb project (offline by default); one eval run per --out, resumed on re-runs."""

    def __init__(self, mode: str, run_cfg: dict, out: Path):
        self.run = None
        if mode == "disabled":
            return
        wb = ((run_cfg.get("logging") or {}).get("wandb") or {})
        id_file = out / "wandb_run_id"
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            name = (run_cfg.get("model") or {}).get("name") or "run"
            self.run = wandb.init(project=wb.get("project") or "mesh-megatron", entity=wb.get("entity"), name=f"{name}-eval",
                                  group=name, job_type="eval", mode=mode, dir=str(out), id=run_id, resume="allow",
                                  config={"source_run": run_cfg.get("logging", {}).get("dir")})
            self.run.define_metric("train/tokens_seen")
            self.run.define_metric("eval/*", step_metric="train/tokens_seen")
            id_file.write_text(self.run.id + "\n")
        except Exception as e:  # noqa: BLE001 -- logging must never stop an evaluation
            print(f"mesh-eval: wandb disabled: {type(e).__name__}: {e}", file=sys.stderr)
            self.run = None

    def log(self, rec: dict) -> None:
        if self.run is None:
            return
        k = rec["num_loops"]
        tag = f"K{k}" if k is not None else "vanilla"
        self.run.log({"train/tokens_seen": rec["tokens_seen"], "train/step": rec["step"],
                      **{f"eval/{tag}/{m}": v for m, v in rec["metrics"].items()}})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def evaluate(checkpoint: str | Path, out: str | Path, settings: EvalSettings, *, num_loops: list[int] | None = None,
             tokenizer: TokenizerSource | None = None, batch_size: int = 8, device: str | None = None,
             wandb_mode: str = "offline", progress: bool = True) -> dict:
    """Evaluate every (checkpoint, K) not already in the cache; write per-result JSON, tables and plots under `out`.

    Returns {"evaluated": [...], "cached": [...], "records": [...], "tables": [...], "plots": [...]}.
    """
    out = Path(out)
    if not settings.tasks and not settings.ppl_prefixes:
        raise EvalError("nothing to evaluate: pass --tasks and/or --ppl PREFIX")
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a directory")
    try:
        check_writable(out, "--out", out)
    except ExportError as e:
        raise EvalError(str(e)) from None
    if any(k < 1 for k in num_loops or []):
        raise EvalError(f"--num-loops {num_loops}: loop counts must be >= 1")
    if tokenizer is not None and not tokenizer.path.is_file():
        raise EvalError(f"--tokenizer {tokenizer.path}: no such file")
    for prefix in settings.ppl_prefixes:
        check_ppl_prefix(prefix)
    ckpts = [describe(p) for p in find_checkpoints(checkpoint)]
    key = settings.key()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    jobs, cached = [], []
    for c in ckpts:
        for k in loop_counts(c.model, num_loops):
            hit = cache.load_cached(out, c.step, k, key)
            (cached if hit else jobs).append((c, k, hit))
    tm = task_manager(settings) if jobs else None  # indexing lm-eval's tasks takes seconds; a cached re-run skips it
    out.mkdir(parents=True, exist_ok=True)
    wandb_log = WandbLog(wandb_mode, ckpts[-1].run_config, out) if jobs else None

    evaluated, tok = [], None
    bar = tqdm(total=len(jobs), desc="mesh-eval", unit="eval", disable=not progress or not jobs)
    try:
        by_ckpt: dict[Path, list] = {}
        for c, k, _ in jobs:
            by_ckpt.setdefault(c.path, []).append((c, k))
        for path, todo in by_ckpt.items():
            bar.set_postfix_str(f"{path.name}: gathering")
            try:
                cfg, sd, run_cfg = load_checkpoint(path)
                model = build_hf_model(cfg, sd, settings.dtype, source=str(path)).to(device)
            except ExportError as e:
                raise EvalError(str(e)) from None
            del sd
            max_length = settings.max_length or cfg.seq_length
            if settings.tasks and tok is None:
                src = tokenizer or tokenizer_from_run_config(run_cfg)
                if src is None:
                    raise EvalError(f"--checkpoint {path}: no tokenizer found (its datasets have no PREFIX.meta.json "
                                    "naming one); pass --tokenizer FILE (tokenizer.json or SentencePiece .model)")
                tok = _tokenizer(src, max_length)
            per_ckpt = []
            for c, k in todo:
                bar.set_postfix_str(f"{path.name} K={k}")
                looped = hasattr(model, "model") and hasattr(model.model, "reset_exit_stats")
                if k is not None:
                    model.config.num_loops = k  # the standalone model reads its loop count from the config at each call
                if looped:
                    model.config.exit_threshold = settings.exit_threshold  # also read at each call; None = off
                    model.model.reset_exit_stats()
                t0 = time.time()
                metrics, lm_out, ppl = {}, None, {}
                if settings.tasks:
                    lm_out = run_lm_eval(model, tok, tm, settings, max_length, batch_size, k)
                    metrics.update(flatten_lm_eval(lm_out["results"]))
                for prefix in settings.ppl_prefixes:
                    name = Path(prefix).name
                    ppl[prefix] = perplexity(model, prefix, cfg.seq_length, settings.ppl_tokens, batch_size, cfg.padded_vocab_size)
                    metrics[f"ppl/{name}"] = ppl[prefix]["ppl"]
                    metrics[f"loss/{name}"] = ppl[prefix]["loss"]
                if looped and settings.exit_threshold:
                    metrics["loops_per_token"] = model.model.average_loops_per_token
                rec = {"checkpoint": str(path), "step": c.step, "tokens_seen": c.tokens_seen, "num_loops": k,
                       "trained_num_loops": cfg.num_loops if cfg.arch != "vanilla" else None, "arch": cfg.arch,
                       "max_length": max_length, "settings": asdict(settings), "settings_key": key, "metrics": metrics,
                       "lm_eval": lm_out, "perplexity": ppl, "seconds": round(time.time() - t0, 3), "device": device}
                cache.store(out, rec)
                per_ckpt.append(rec)
                evaluated.append(rec)
                bar.update(1)
            for rec in per_ckpt:
                wandb_log.log(rec)
            del model
    finally:
        bar.close()
        if wandb_log is not None:
            wandb_log.finish()

    records = [*(h for _, _, h in cached), *evaluated]
    from mesh_tools.eval.report import write_plots, write_tables

    # the tables and plots show the whole curve so far: every result in OUT made with these settings, so a run
    # evaluated one checkpoint at a time (during training, --watch) still gets one table
    everything = cache.load_all(out, key)
    tables = write_tables(everything, out)
    plots = write_plots(everything, out)
    return {"evaluated": evaluated, "cached": [h for _, _, h in cached], "records": records, "tables": tables, "plots": plots}


__all__ = ["EvalError", "EvalSettings", "evaluate", "find_checkpoints", "perplexity", "flatten_lm_eval"]

