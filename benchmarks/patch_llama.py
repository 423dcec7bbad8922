"""Training step of models as people have them, unpatched vs ``triformer.patch`` vs Liger-Kernel's patch.

    python -m benchmarks.patch_llama                  # Llama (1B shapes, 4 layers) and timm ViT-B/16, one GPU
    python -m benchmarks.patch_llama --only llama --batch 8 --seq 1024 --steps 10 --warmup 3
    python -m benchmarks.patch_llama --smoke          # tiny configs on the CPU (interpreter), 1 step: the code path

Llama: ``transformers.LlamaForCausalLM`` with hidden 2048, intermediate 8192, 32 heads, 8 key/value heads,
vocabulary 128256, 4 layers, untied LM head, Llama 3.2's RoPE (theta 500000, llama3 scaling), SDPA attention;
batch 8 x 1024 tokens (``--batch``/``--seq``), labels = inputs, bf16 autocast, fp32 weights, fused AdamW. Variants:
``unpatched``; ``triformer.patch`` (norms, attention, SwiGLU, RoPE, fused linear + cross-entropy); Liger-Kernel's
``apply_liger_kernel_to_llama()`` (its defaults: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy), skipped when
liger_kernel does not import. timm ViT-B/16 (``vit_base_patch16_224``, random weights, 1000 classes, batch 128,
``--vit-batch``): unpatched vs ``triformer.patch``, skipped when timm does not import.

Every variant runs in a fresh process (Liger patches transformers' classes for the whole process, and each peak
is then the variant's own): a fresh model, ``--warmup`` steps (Triton's autotuning happens there), then
``--steps`` timed steps, each between two ``torch.cuda.synchronize()``; tokens/s (images/s) from the median step,
peak = ``torch.cuda.max_memory_allocated()`` over the timed steps (weights, gradients, AdamW state and
activations). Results: ``$TRIFORMER_BENCH_OUT`` (default benchmarks/results/<card>/) ``patch_llama.{md,csv}`` with the
card, the versions and the command.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import triformer  # before triton: picks compile vs interpreter
import torch
import torch.nn.functional as F

from benchmarks.common import environment, out_dir

LLAMA = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, num_hidden_layers=4, tie_word_embeddings=False, max_position_embeddings=131072,
             rms_norm_eps=1e-5, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192})
SMOKE_LLAMA = dict(LLAMA, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=131, num_hidden_layers=2, max_position_embeddings=64)
VIT = dict(model_name="vit_base_patch16_224", img_size=224)
SMOKE_VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
VARIANTS = {"llama": ("unpatched", "triformer", "liger"), "vit": ("unpatched", "triformer")}


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


def build_llama(variant: str, smoke: bool, device: torch.device):
    import transformers
    if variant == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()  # patches transformers' Llama classes: call before building the model
    config = transformers.LlamaConfig(**(SMOKE_LLAMA if smoke else LLAMA), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).to(device)
    if variant != "triformer" and model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"expected SDPA attention, got {model.config._attn_implementation!r}")
    report = None
    if variant == "triformer":
        report = triformer.patch(model)
    return model, report


def build_vit(variant: str, smoke: bool, device: torch.device):
    import timm
    if smoke:
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(**SMOKE_VIT)
    else:
        model = timm.create_model(VIT["model_name"], pretrained=False, num_classes=1000)
    model = model.to(device)
    report = triformer.patch(model) if variant == "triformer" else None
    return model, report


def run_variant(task: str, variant: str, args) -> dict:
    """Build a fresh model, train ``args.warmup + args.steps`` steps, return the row."""
    device = _device(args.smoke)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    build = build_llama if task == "llama" else build_vit
    model, report = build(variant, args.smoke, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if task == "llama":
        vocab = model.config.vocab_size
        batch, seq = (2, 16) if args.smoke else (args.batch, args.seq)
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        inputs = dict(input_ids=ids, labels=ids)
        items = batch * seq
    else:
        batch = 2 if args.smoke else args.vit_batch
        size = SMOKE_VIT["img_size"] if args.smoke else VIT["img_size"]
        images = torch.randn(batch, 3, size, size, device=device)
        targets = torch.randint(0, SMOKE_VIT["num_classes"] if args.smoke else 1000, (batch,), device=device)
        items = batch
    # bf16 autocast on the GPU; the CPU smoke run stays fp32, where tests/test_patch.py holds the patched loss to
    # the unpatched one at fp32's tolerance
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        with autocast:
            if task == "llama":
                loss = model(**inputs).loss
            else:
                loss = F.cross_entropy(model(images).float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
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
    unit = "tokens_per_s" if task == "llama" else "images_per_s"
    row = {"model": "LlamaForCausalLM" if task == "llama" else "timm ViT-B/16", "variant": variant,
           "batch": f"{batch}x{seq}" if task == "llama" else str(batch), "ms_per_step": round(median * 1e3, 2),
           unit: round(items / median), "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)
           if device.type == "cuda" else "", "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
           "swapped": " ".join(f"{k}={v}" for k, v in report.parts().items()) if report is not None else ""}
    if report is not None and report.left_alone:
        row["left_alone"] = "; ".join(f"{n or '<model>'}: {w}" for n, w in report.left_alone)
    if args.profile and device.type == "cuda":
        from benchmarks.profile_step import memory_table, time_table
        label = f"{row['model']}, {variant}"
        row["profile"] = time_table(step, label) + memory_table(step, label)
    return row


def available(task: str, variant: str) -> str | None:
    """None if the variant can run here, else why not."""
    if task == "vit" and versions()["timm"].startswith("unavailable"):
        return "timm does not import"
    if variant == "liger":
        try:
            from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401
        except Exception as exc:
            return f"liger_kernel does not import ({type(exc).__name__})"
    return None


def child_args(args, task: str, variant: str) -> list[str]:
    out = [sys.executable, "-m", "benchmarks.patch_llama", "--child", f"{task}:{variant}",
           "--batch", str(args.batch), "--seq", str(args.seq), "--vit-batch", str(args.vit_batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return out + (["--smoke"] if args.smoke else []) + (["--profile"] if args.profile else [])


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["llama", "vit"], default=None)
    p.add_argument("--variants", default="all", help="comma-separated: unpatched,triformer,liger (default all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vit-batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny configs, 1 warm-up and 1 timed step (CPU or GPU)")
    p.add_argument("--profile", action="store_true",
                   help="also profile each variant's step: kernels by GPU time, memory alive at the peak")
    p.add_argument("--in-process", action="store_true",
                   help="run the variants in this process (for the CPU smoke test; Liger then patches the process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 1, 1
    if args.child:  # one variant, in its own process: its row as the last line of stdout
        task, variant = args.child.split(":")
        print("ROW " + json.dumps(run_variant(task, variant, args)), flush=True)
        return []
    _device(args.smoke)
    wanted = None if args.variants == "all" else set(args.variants.split(","))
    rows = []
    for task in ([args.only] if args.only else ["llama", "vit"]):
        for variant in VARIANTS[task]:
            if wanted is not None and variant not in wanted:
                continue
            why = available(task, variant)
            if why is not None:
                print(f"{task} {variant}: skipped, {why}", flush=True)
                rows.append({"model": task, "variant": variant, "skipped": why})
                continue
            if args.in_process:
                row = run_variant(task, variant, args)
            else:
                proc = subprocess.run(child_args(args, task, variant), cwd=Path(__file__).resolve().parents[1],
                                      capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                if proc.returncode != 0 or not lines:
                    print(f"{task} {variant}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                    rows.append({"model": task, "variant": variant, "skipped": f"failed, exit {proc.returncode}: "
                                 + (proc.stderr.strip().splitlines() or [""])[-1][:200]})
                    continue
                row = json.loads(lines[-1][4:])
            print(row, flush=True)
            rows.append(row)
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
          f"Timed: median of {args.steps} steps after {args.warmup} warm-up steps, each variant in a fresh "
          "process; peak = torch.cuda.max_memory_allocated() over the timed steps.", "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    if profiles:
        md += ["", "## Profiles (--profile)", "", *profiles]
    (d / f"{name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {d / name}.md and .csv", flush=True)


if __name__ == "__main__":
    main()
