"""Training step of models as people have them: unpatched vs ``triformer.patch`` vs Liger-Kernel's patch, each
eager and under ``torch.compile``.

    python -m benchmarks.patch_llama                  # Llama, Qwen3, Gemma (4 layers each), one GPU, about 4 minutes
    python -m benchmarks.patch_llama --quick          # Llama only, fewer steps (about 1.5 minutes)
    python -m benchmarks.patch_llama --only qwen3 --modes compile --steps 10
    python -m benchmarks.patch_llama --smoke          # tiny configs on the CPU (interpreter), 1 step: the code path

Models (``transformers``, random weights, 4 decoder layers, untied LM head unless the model ties it):
* ``llama``: LlamaForCausalLM with Llama 3.2 1B's shapes (hidden 2048, intermediate 8192, 32/8 heads, vocabulary
  128256, llama3 RoPE);
* ``qwen3``: Qwen3ForCausalLM with Qwen3 1.7B's (hidden 2048, intermediate 6144, 16/8 heads of 128, q/k norms,
  vocabulary 151936, tied);
* ``gemma``: GemmaForCausalLM with Gemma 2B's (hidden 2048, intermediate 16384, 8/1 heads of 256, GeGLU, ``1 + w``
  norms, vocabulary 256000, tied; its head dim of 256 is triformer attention's largest);
* ``vit`` (only with ``--only vit``): timm ViT-B/16, batch 128 (``--vit-batch``), unpatched vs triformer.
Batch 8 x 1024 tokens (``--batch``/``--seq``), labels = inputs, bf16 autocast, fp32 weights, fused AdamW, SDPA
attention when unpatched. Variants: ``unpatched``; ``triformer`` (``triformer.patch``: norms, attention, GLU MLP,
RoPE, fused linear + cross-entropy); ``liger`` (``apply_liger_kernel_to_<family>()`` with its defaults: RoPE,
RMSNorm, GLU MLP, fused linear cross-entropy; skipped when liger_kernel does not import). Modes: ``eager``;
``compile``: each decoder layer compiled with ``torch.compile`` (regional compilation: the layers share one
compiled graph, so a model compiles in the time of one layer; ``--compile model`` compiles the whole model
instead, several times slower to compile).

Liger patches transformers' classes for the whole process, so its variants run in a second process; unpatched and
triformer share the first (the patch is per instance). Each variant builds a fresh model, runs ``--warmup`` steps
(Triton's autotuning and the compilation happen there; their time is the ``warmup_s`` column), then ``--steps``
timed steps, each between two ``torch.cuda.synchronize()``; tokens/s from the median step, peak =
``torch.cuda.max_memory_allocated()`` over the timed steps (weights, gradients, AdamW state and activations).
Results: ``$TRIFORMER_BENCH_OUT`` (default benchmarks/results/<card>/) ``patch_llama.{md,csv}`` with the card, the
versions and the command.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import triformer  # before triton: picks compile vs interpreter
import torch
import torch._dynamo
import torch.nn.functional as F

from benchmarks.common import environment, out_dir

LLAMA = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, num_hidden_layers=4, tie_word_embeddings=False, max_position_embeddings=131072,
             rms_norm_eps=1e-5, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192})
QWEN3 = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
             vocab_size=151936, num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=40960,
             rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
GEMMA = dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
             vocab_size=256000, num_hidden_layers=4, tie_word_embeddings=True, max_position_embeddings=8192,
             hidden_activation="gelu_pytorch_tanh")
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=131, num_hidden_layers=2, max_position_embeddings=64)
# name: (transformers model class, config class, config, Liger's patch function)
LMS = {"llama": ("LlamaForCausalLM", "LlamaConfig", LLAMA, "apply_liger_kernel_to_llama"),
       "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", QWEN3, "apply_liger_kernel_to_qwen3"),
       "gemma": ("GemmaForCausalLM", "GemmaConfig", GEMMA, "apply_liger_kernel_to_gemma")}
VIT = dict(model_name="vit_base_patch16_224", img_size=224)
SMOKE_VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
VARIANTS = ("unpatched", "triformer", "liger")
MODES = ("eager", "compile")


def versions() -> dict[str, str]:
    out = {}
    for name in ("transformers", "timm", "liger_kernel"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception as exc:  # absent, or not importable beside this torch (timm needs torchvision)
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name.replace("_", "-"))


def _device(smoke: bool) -> torch.device:
    if smoke:
        return torch.device("cpu" if triformer.INTERPRET else "cuda")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (use --smoke for the CPU code path)")
    return torch.device("cuda")


def build_lm(name: str, variant: str, smoke: bool, device: torch.device):
    import transformers
    model_cls, config_cls, fields, liger_fn = LMS[name]
    if variant == "liger":
        import liger_kernel.transformers
        getattr(liger_kernel.transformers, liger_fn)()  # patches the family's classes: before building the model
    fields = {**fields, **SMOKE} if smoke else fields
    config = getattr(transformers, config_cls)(**fields, attn_implementation="sdpa")
    with device:  # initialized where it runs: a billion normal_ draws on the CPU take seconds per variant
        model = getattr(transformers, model_cls)(config)
    return model, triformer.patch(model) if variant == "triformer" else None


def build_vit(variant: str, smoke: bool, device: torch.device):
    import timm
    if smoke:
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(**SMOKE_VIT)
    else:
        model = timm.create_model(VIT["model_name"], pretrained=False, num_classes=1000)
    model = model.to(device)
    return model, triformer.patch(model) if variant == "triformer" else None


def compile_model(model, how: str):
    """``how`` = "layers": each repeated block (decoder layers, ViT blocks) compiled in place; "model": the whole
    model."""
    if how == "model":
        return torch.compile(model)
    blocks = getattr(getattr(model, "model", None), "layers", None) or getattr(model, "blocks", None)
    for block in blocks:
        block.compile()
    return model


def run_variant(task: str, variant: str, mode: str, args) -> dict:
    """Build a fresh model, train ``args.warmup + args.steps`` steps, return the row."""
    device = _device(args.smoke)
    torch.manual_seed(0)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model, report = build_vit(variant, args.smoke, device) if task == "vit" else build_lm(task, variant, args.smoke,
                                                                                          device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    forward = compile_model(model, args.compile) if mode == "compile" else model
    if task == "vit":
        batch = 2 if args.smoke else args.vit_batch
        size = SMOKE_VIT["img_size"] if args.smoke else VIT["img_size"]
        images = torch.randn(batch, 3, size, size, device=device)
        targets = torch.randint(0, SMOKE_VIT["num_classes"] if args.smoke else 1000, (batch,), device=device)
        items, shape = batch, str(batch)
    else:
        batch, seq = (2, 16) if args.smoke else (args.batch, args.seq)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
        items, shape = batch * seq, f"{batch}x{seq}"
    # bf16 autocast on the GPU; the CPU smoke run stays fp32, where tests/test_patch.py holds the patched loss to
    # the unpatched one at fp32's tolerance
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        with autocast:
            if task == "vit":
                loss = F.cross_entropy(forward(images).float(), targets)
            else:
                loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    median = statistics.median(times)
    unit = "images_per_s" if task == "vit" else "tokens_per_s"
    row = {"model": task, "variant": variant, "mode": mode, "batch": shape, "ms_per_step": round(median * 1e3, 2),
           unit: round(items / median),
           "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else "",
           "warmup_s": round(warmup_s, 1), "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
           "swapped": " ".join(f"{k}={v}" for k, v in report.parts().items()) if report is not None else ""}
    if report is not None and report.left_alone:
        row["left_alone"] = "; ".join(f"{n or '<model>'}: {w}" for n, w in report.left_alone)
    if args.profile and device.type == "cuda":
        from benchmarks.profile_step import memory_table, time_table
        label = f"{task}, {variant}, {mode}"
        row["profile"] = time_table(step, label) + memory_table(step, label)
    return row


def unavailable(task: str, variant: str) -> str | None:
    """Why the variant cannot run here, or None."""
    if task == "vit" and variant == "liger":
        return "Liger has no ViT patch"
    if task == "vit" and versions()["timm"].startswith("unavailable"):
        return "timm does not import"
    if variant == "liger":
        try:
            import liger_kernel.transformers as liger
            getattr(liger, LMS[task][3])
        except Exception as exc:
            return f"liger_kernel does not import or lacks {LMS[task][3]} ({type(exc).__name__})"
    return None


def run_group(runs: list[tuple[str, str, str]], args) -> list[dict]:
    """Runs in this process, each row printed as it comes."""
    rows = []
    for task, variant, mode in runs:
        try:
            row = run_variant(task, variant, mode, args)
        except Exception as exc:  # one failing variant (out of memory, a compile error) leaves the others
            first_line = (str(exc).splitlines() or [""])[0][:200]
            row = {"model": task, "variant": variant, "mode": mode,
                   "skipped": f"failed: {type(exc).__name__}: {first_line}"}
        print("ROW " + json.dumps(row), flush=True)
        rows.append(row)
        gc.collect()  # the variant's model and optimizer state go before the next is built
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def child_args(args, runs) -> list[str]:
    out = [sys.executable, "-m", "benchmarks.patch_llama", "--child", json.dumps(runs),
           "--batch", str(args.batch), "--seq", str(args.seq), "--vit-batch", str(args.vit_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--compile", args.compile]
    return out + (["--smoke"] if args.smoke else []) + (["--profile"] if args.profile else [])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated: llama,qwen3,gemma,vit (default llama,qwen3,gemma)")
    p.add_argument("--variants", default="all", help="comma-separated: unpatched,triformer,liger (default all)")
    p.add_argument("--modes", default="eager,compile", help="comma-separated: eager,compile")
    p.add_argument("--compile", choices=["layers", "model"], default="layers",
                   help="compile each decoder layer (default) or the whole model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vit-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="Llama only, 3 timed steps after 2 warm-up steps")
    p.add_argument("--smoke", action="store_true", help="tiny configs, 1 warm-up and 1 timed step (CPU or GPU)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each variant's step: kernels by GPU time, memory alive at the peak")
    p.add_argument("--in-process", action="store_true",
                   help="run every variant in this process (for the CPU smoke test; Liger then patches the process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 1, 1
    if args.quick:
        args.steps, args.warmup, args.only = 3, 2, args.only or "llama"
    if args.child:  # a group of runs in its own process: one ROW line each
        run_group([tuple(r) for r in json.loads(args.child)], args)
        return []
    _device(args.smoke)
    tasks = (args.only or "llama,qwen3,gemma").split(",")
    variants = VARIANTS if args.variants == "all" else tuple(args.variants.split(","))
    modes = tuple(args.modes.split(","))
    for name, values, allowed in (("--only", tasks, (*LMS, "vit")), ("--variants", variants, VARIANTS),
                                  ("--modes", modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}, expected some of {list(allowed)}")
    rows, groups = [], {"own": [], "liger": []}
    for task in tasks:
        for variant in variants:
            why = unavailable(task, variant)
            if why is not None:
                print(f"{task} {variant}: skipped, {why}", flush=True)
                rows.append({"model": task, "variant": variant, "skipped": why})
                continue
            for mode in modes:
                groups["liger" if variant == "liger" else "own"].append((task, variant, mode))
    started = time.perf_counter()
    for runs in groups.values():
        if not runs:
            continue
        if args.in_process:
            rows += run_group(runs, args)
            continue
        proc = subprocess.run(child_args(args, runs), cwd=Path(__file__).resolve().parents[1], capture_output=True,
                              text=True)
        got = [json.loads(ln[4:]) for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        for row in got:
            print(row, flush=True)
        rows += got
        if proc.returncode != 0:
            print(f"process failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            done = {(r["model"], r["variant"], r.get("mode")) for r in got}
            rows += [{"model": t, "variant": v, "mode": m, "skipped": f"process failed, exit {proc.returncode}"}
                     for t, v, m in runs if (t, v, m) not in done]
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    write_tables(rows, args)
    return rows


def write_tables(rows: list[dict], args) -> None:
    d = out_dir()
    env = {**environment(), **versions()}
    profiles = [line for r in rows for line in r.pop("profile", [])]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    name = "patch_llama_smoke" if args.smoke else "patch_llama"
    with open(d / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    command = "python -m benchmarks.patch_llama " + " ".join(sys.argv[1:] if __name__ == "__main__" else [])
    md = [f"# {name}", "", " | ".join(f"{k}: {v}" for k, v in env.items()), "", f"Command: `{command.strip()}`", "",
          f"Timed: median of {args.steps} steps after {args.warmup} warm-up steps (autotuning and compilation, "
          f"`warmup_s`); compile = `torch.compile` of each {'decoder layer' if args.compile == 'layers' else 'model'}; "
          "Liger's variants in a second process; peak = torch.cuda.max_memory_allocated() over the timed steps.",
          "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    if profiles:
        md += ["", "## Profiles (--profile)", "", *profiles]
    (d / f"{name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {d / name}.md and .csv", flush=True)


if __name__ == "__main__":
    main()
