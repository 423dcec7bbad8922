"""Evaluation behind ``eval.py``: perplexity and bits per byte, sampling, image accuracy and confusion matrix.

Perplexity uses the sliding-window convention of Hugging Face's perplexity guide: windows of ``context``
input tokens start every ``stride`` tokens; each window scores only the targets the previous window did not
(its last ``stride`` ones, all of them in the first window), so every token after the first is scored exactly
once, with at least ``context - stride`` tokens of context except near the start. Bits per byte divide the
summed negative log-likelihood (in bits) by the UTF-8 bytes of the scored tokens (end-of-text counts 0).
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.data import build_data, load_tokenizer
from training.data.common import check_positive_int
from training.data.text import read_text
from training.tasks import get_task, with_article

log = logging.getLogger("triformer.eval")


# ------------------------------------------------------------------------------------------- perplexity

def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` per window: inputs ``tokens[begin:end]``, targets
    ``tokens[begin+1:end+1]``, of which those at window positions ``>= first_scored`` are scored."""
    check_positive_int("context", context)
    check_positive_int("stride", stride)
    if stride > context:
        raise ValueError(f"stride ({stride}) must not exceed context ({context}): tokens would go unscored")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {n_tokens}")
    windows, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + context, n_tokens - 1)
        windows.append((begin, end, prev_end - begin))
        prev_end = end
        if end == n_tokens - 1:
            return windows
        begin += stride


def _full_logits(model, x: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    if logits is None or tuple(logits.shape[:2]) != tuple(x.shape):
        raise ValueError(f"model(x) must return logits for every position [B, T, V] = [{x.shape[0]}, {x.shape[1]},"
                         f" V], got {None if logits is None else tuple(logits.shape)}")
    return logits


@torch.no_grad()
def sliding_window_nll(model, tokens, context: int, stride: int, batch_size: int = 8,
                       byte_lengths: np.ndarray | None = None, device: str | torch.device = "cpu",
                       autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, float]:
    """Summed NLL (nats) of every token after the first of ``tokens`` (1-D ints) under ``model``, the number of
    scored tokens, and their UTF-8 bytes when ``byte_lengths`` (per id) is given. ``progress``: a tqdm bar over
    the windows (stderr)."""
    check_positive_int("batch_size", batch_size)
    tokens = np.asarray(tokens)
    windows = sliding_windows(len(tokens), context, stride)
    device = torch.device(device)
    byte_table = torch.from_numpy(byte_lengths).to(device) if byte_lengths is not None else None
    nll = torch.zeros((), dtype=torch.float64, device=device)
    scored = n_bytes = 0
    # Every window but the last has ``context`` inputs; a shorter last one gets a batch of its own.
    groups: list[list[tuple[int, int, int]]] = []
    for w in windows:
        if groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == w[1] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    bar = _bar(len(windows), "windows", progress)
    for group in groups:
        bar.update(len(group))
        length = group[0][1] - group[0][0]
        rows = np.stack([tokens[b: e + 1] for b, e, _ in group]).astype(np.int64)
        chunk = torch.from_numpy(rows).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = _full_logits(model, x)
        if logits.dtype in (torch.float16, torch.bfloat16):  # autocast: take the softmax in fp32
            logits = logits.float()
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
        first = torch.tensor([f for _, _, f in group], device=device)
        mask = torch.arange(length, device=device)[None, :] >= first[:, None]
        nll += losses.double()[mask].sum()
        scored += int(mask.sum())
        if byte_table is not None:
            n_bytes += int(byte_table[y][mask].sum())
    bar.close()
    out = {"nll_sum": float(nll), "tokens": scored}
    if byte_lengths is not None:
        out["bytes"] = n_bytes
    return out


def _bar(total: int | None, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="evaluating", disable=not enabled, file=sys.stderr, mininterval=1.0,
                dynamic_ncols=True)


def perplexity_metrics(stats: dict[str, float]) -> dict[str, float]:
    loss = stats["nll_sum"] / stats["tokens"]
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": stats["tokens"]}
    if stats.get("bytes"):
        out["bytes"] = stats["bytes"]
        out["bits_per_byte"] = stats["nll_sum"] / math.log(2) / stats["bytes"]
    return out


# ----------------------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample(model, tokenizer, prompt: str, num_samples: int = 1, max_new_tokens: int = 100,
           temperature: float = 1.0, top_k: int | None = None, device: str | torch.device = "cpu",
           seed: int = 0) -> list[str]:
    """Continuations of ``prompt`` (an empty prompt starts from end-of-text). Sampling stops at end-of-text;
    a prompt longer than the room left in the model's context keeps its last tokens."""
    check_positive_int("num_samples", num_samples)
    check_positive_int("max_new_tokens", max_new_tokens)
    block = model.config.block_size
    if max_new_tokens >= block:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be below the model's block_size ({block})")
    ids = tokenizer.encode(prompt) or [tokenizer.eot_token_id]
    ids = ids[-(block - max_new_tokens):]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         eos_token_id=tokenizer.eot_token_id, generator=generator)
    texts = []
    for row in out[:, len(ids):].tolist():
        if tokenizer.eot_token_id in row:
            row = row[: row.index(tokenizer.eot_token_id)]
        texts.append(tokenizer.decode(row))
    return texts


# ----------------------------------------------------------------------------------------------- images

@torch.no_grad()
def classify(model, data, split: str, batch_size: int, max_batches: int | None = None,
             device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
             progress: bool = False) -> dict[str, Any]:
    """Top-1 accuracy, mean cross entropy and the confusion matrix (rows: true class, columns: predicted)."""
    device = torch.device(device)
    K = data.num_classes
    confusion = torch.zeros(K * K, dtype=torch.int64)
    nll, n = 0.0, 0
    bar = _bar(None, "images", progress)
    for x, y in data.eval_batches(split, batch_size, max_batches):
        bar.update(len(y))
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(x.to(device))
        logits = logits.float().cpu()
        nll += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
        confusion += torch.bincount(y * K + logits.argmax(-1), minlength=K * K)
    bar.close()
    confusion = confusion.view(K, K)
    return {"accuracy": float(confusion.diagonal().sum()) / n, "loss": nll / n, "examples": n,
            "confusion": confusion.numpy()}


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = len(class_names)
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * K + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(K) if K <= 40 else np.arange(0, K, max(1, K // 20))
    ax.set_xticks(ticks, [class_names[i] for i in ticks], rotation=90 if K > 10 else 0)
    ax.set_yticks(ticks, [class_names[i] for i in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if K <= 20:  # counts stay readable only for a few classes
        for i in range(K):
            for j in range(K):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ checkpoints

def load_model(checkpoint: str | Path, kernels: str = "auto", device: str | torch.device = "cpu"):
    """The model a ``train.py`` checkpoint holds, in eval mode on ``device``, and the checkpoint payload."""
    import models
    from training.checkpoint import load_checkpoint

    device = torch.device(device)
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    state = load_checkpoint(checkpoint)
    config = {k: v for k, v in state["model_config"].items() if k != "kernels"}
    model = models.create_model(state["model_name"], kernels=kernels, **config)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return table[precision]


def resolve_checkpoint(spec: str | Path) -> Path:
    """``checkpoint=``: a checkpoint file, or a run directory / its checkpoints folder (its best.safetensors,
    else its newest step checkpoint)."""
    from training.checkpoint import BEST_FILE, step_checkpoints

    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            if (folder / BEST_FILE).is_file():
                return folder / BEST_FILE
            found = step_checkpoints(folder)
            if found:
                return found[-1][1]
        raise FileNotFoundError(f"checkpoint={spec} is a directory without checkpoints (no {BEST_FILE} or "
                                f"step_*.safetensors in it or in its checkpoints/ folder); pass a checkpoint file, e.g. "
                                f"runs/<name>/<time>/checkpoints/{BEST_FILE}")
    raise FileNotFoundError(f"checkpoint={spec}: no such file or directory")


def run(cfg) -> dict[str, Any]:
    """``eval.py``'s work (configs/eval.yaml): metrics of one checkpoint, written to ``output_dir``."""
    from training import run as lifecycle
    from training.settings import check_eval_config

    lifecycle.setup_logging()
    cfg = check_eval_config(cfg)
    path = resolve_checkpoint(cfg["checkpoint"])
    if str(path) != str(cfg["checkpoint"]):
        log.info(f"checkpoint={cfg['checkpoint']} is a directory: evaluating {path}")
    device = _device(cfg["device"])
    model, state = load_model(path, cfg["kernels"], device)
    data_cfg = cfg.get("data") or state["config"]["data"]
    task = get_task(data_cfg.get("task"))
    if task.name != getattr(model, "task", task.name):
        holds = with_article(get_task(model.task).model_kind)
        raise ValueError(f"{path} holds {holds} ({state['model_name']}) but data={data_cfg.get('name')} is "
                         f"{task.data_kind}; evaluate it on data of its own task (leave data unset to use the "
                         f"checkpoint's own, {state['config']['data'].get('name')})")
    amp = _autocast_dtype(cfg["precision"], device)
    out_dir = Path(cfg["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info(f"evaluating {path}: {state['model_name']} at step {state.get('step')}, data {data_cfg.get('name')}, "
             f"on {device} ({cfg['kernels']} kernels); results go to {out_dir}")
    results: dict[str, Any] = {"checkpoint": str(path), "step": state.get("step")}
    results.update(task.run_eval(cfg, model, data_cfg, device, amp, out_dir))
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    for k, v in results.items():
        print(f"{k}: {v}")
    log.info("results: " + ", ".join(f"{k} {v}" for k, v in results.items()))
    return results


def evaluate_image(cfg: dict, model, data_cfg: dict, device, amp, out_dir: Path) -> dict[str, Any]:
    """eval.py on an image classifier (task "image"): top-1 accuracy and loss on ``split``, a confusion matrix."""
    # evaluation batches are never augmented: a RandAugment run's checkpoint evaluates without torchvision
    data = build_data({**data_cfg, "randaugment_ops": 0}, seed=0)
    log.info(f"split {cfg['split']}: top-1 accuracy over {data.name} images")
    r = classify(model, data, cfg["split"], cfg["batch_size"], cfg.get("max_batches"), device, amp, progress=True)
    png = plot_confusion(r.pop("confusion"), data.class_names, out_dir / f"confusion_{cfg['split']}.png",
                         title=f"{data.name} {cfg['split']}: top-1 {r['accuracy']:.2%}")
    return {**{f"{cfg['split']}/{k}": v for k, v in r.items()}, "confusion_png": str(png)}


def evaluate_lm(cfg: dict, model, data_cfg: dict, device, amp, out_dir: Path) -> dict[str, Any]:
    """eval.py on a language model (task "lm"): perplexity and bits per byte on ``split`` or ``text_file``, and
    samples when ``prompt`` is set."""
    tokenizer = load_tokenizer(data_cfg.get("tokenizer", "bytes"), data_cfg.get("tokenizer_file"))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"the data's tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model was "
                         f"trained with vocab_size={model.config.vocab_size}")
    results: dict[str, Any] = {}
    if cfg.get("perplexity", True):
        if cfg.get("text_file"):
            text = read_text(cfg["text_file"])  # UTF-8; invalid bytes -> U+FFFD with a warning naming the file
            # end-of-text first, as between training documents, so the file's first token is scored too
            tokens = np.asarray([tokenizer.eot_token_id] + tokenizer.encode(text), dtype=np.int64)
            where = str(cfg["text_file"])
        else:
            tokens = build_data(data_cfg, seed=0).split_tokens(cfg["split"])
            where = cfg["split"]
        if cfg.get("max_tokens"):
            tokens = tokens[: cfg["max_tokens"]]
        context = cfg.get("context") or model.config.block_size
        if context > model.config.block_size:
            raise ValueError(f"context ({context}) exceeds the model's block_size ({model.config.block_size})")
        stride = cfg.get("stride") or max(1, context // 2)
        log.info(f"perplexity on {where}: {len(tokens):,} tokens, windows of {context} tokens every {stride}")
        stats = sliding_window_nll(model, tokens, context, stride, cfg["batch_size"],
                                   tokenizer.token_byte_lengths(), device, amp, progress=True)
        results.update({f"{where}/{k}": v for k, v in perplexity_metrics(stats).items()},
                       context=context, stride=stride)
    if cfg.get("prompt") is not None:
        texts = sample(model, tokenizer, cfg["prompt"], cfg["num_samples"], cfg["max_new_tokens"],
                       cfg["temperature"], cfg.get("top_k"), device, cfg.get("seed", 0))
        (out_dir / "samples.txt").write_text("\n\n---\n\n".join(cfg["prompt"] + t for t in texts))
        for t in texts:
            print(f"--- sample ---\n{cfg['prompt']}{t}")
        results["samples_file"] = str(out_dir / "samples.txt")
    return results
