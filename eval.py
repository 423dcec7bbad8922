"""Evaluate a checkpoint written by train.py: ``python eval.py checkpoint=path [key=value ...]`` (configs/eval.yaml).

Examples: ``python eval.py checkpoint=runs/gpt2-nano-stdlib/<time>`` (a run directory: its best checkpoint; test perplexity,
bits per byte), ``... text_file=notes.txt context=128 stride=64``, ``... perplexity=false 'prompt="def main("'``
(samples; in a shell the whole override goes in single quotes, so Hydra gets the quoted text),
``python eval.py checkpoint=runs/vit-digits/<time>/checkpoints/best.safetensors`` (accuracy and a
confusion matrix PNG). Logic lives in ``training.evaluate``.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    from training.evaluate import run
    from training.run import user_errors

    with user_errors():  # a missing checkpoint= or a refused setting is one line
        run(cfg)


if __name__ == "__main__":
    main()
