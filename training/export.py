"""Export a ``train.py`` checkpoint for use outside training.

``python -m training.export CHECKPOINT OUT`` writes the weights only (the model's state dict and what
describes it: model name and config, the run's config, step) in triformer's checkpoint format, which
``eval.py checkpoint=`` and ``train.py init_from=`` read; a step checkpoint also carries the optimizer, scaler,
RNG and data state that only ``resume`` needs (about 3x the weights with AdamW). ``best.safetensors`` is already
written this way.

``python -m training.export CHECKPOINT OUT --hf`` writes a Hugging Face ``save_pretrained`` directory
(``config.json`` + ``model.safetensors``) of a GPT-2 or llama-style model, which
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads (``GPT.to_huggingface``: fp32, the vocabulary's
padding rows dropped). Its tokenizer is not included: a byte-level run has no Hugging Face tokenizer, and a
GPT-2 BPE run's is ``AutoTokenizer.from_pretrained("gpt2")``.

CHECKPOINT is a checkpoint file or a run directory (its best checkpoint, else its newest), as for eval.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from training.checkpoint import file_mode, load_checkpoint, save_checkpoint, weights_only
from training.evaluate import load_model, resolve_checkpoint


def export_weights(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The weights of ``checkpoint`` (a file or run directory) in a new checkpoint file ``out``, atomically."""
    state = load_checkpoint(resolve_checkpoint(checkpoint))
    return save_checkpoint(out, weights_only(state))


def export_huggingface(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A ``save_pretrained`` directory ``out`` (which must not exist, or be empty) of the GPT-2 / Llama model in
    ``checkpoint``. Written into a temporary sibling and renamed: ``out`` appears complete or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new one")
    path = resolve_checkpoint(checkpoint)
    model, state = load_model(path, kernels="torch", device="cpu")
    if not hasattr(model, "to_huggingface"):
        raise ValueError(f"{path} holds {state['model_name']}, which has no Hugging Face export (GPT-2 and llama-style "
                         "models have one)")
    hf = model.to_huggingface()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        # mkdtemp's 0700 (and any 0600 file) -> the modes open()/mkdir would give under the umask
        mode = file_mode()
        for f in tmp.iterdir():
            os.chmod(f, mode)
        os.chmod(tmp, 0o777 & ~(0o666 & ~mode))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint file, or a run directory (its best checkpoint)")
    parser.add_argument("out", help="the file to write (weights only), or with --hf the directory")
    parser.add_argument("--hf", action="store_true",
                        help="write a Hugging Face save_pretrained directory (GPT-2 / Llama) instead")
    args = parser.parse_args(argv)
    if args.hf:
        out = export_huggingface(args.checkpoint, args.out)
        print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        out = export_weights(args.checkpoint, args.out)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, weights only): "
              f"python eval.py checkpoint={out}")


if __name__ == "__main__":
    main()
