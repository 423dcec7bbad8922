"""Train a model: ``python train.py [experiment=...] [group=option] [key=value]`` (configs/train.yaml).

Examples: ``python train.py`` (small GPT on the stdlib sources, CPU), ``python train.py experiment=vit-digits``,
``python train.py -m model.dropout=0.0,0.1 loss.ce_chunks=1,4`` (sweep), ``python train.py resume=latest``,
``torchrun --nproc_per_node 8 train.py experiment=gpt2-small-owt``.
"""
import os

# Before torch loads OpenMP: its idle threads sleep instead of spinning, which on a few shared cores burned as
# much CPU as the work (the default run's 20 steps: 49 s of CPU time spinning, 27 s passive; same losses).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import training.config  # noqa: E402, F401  (registers the resolvers configs/train.yaml uses)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from training.run import user_errors
    from training.trainer import train

    with user_errors():  # a refused setting is one line, Ctrl-C saves and says how to resume
        summary = train(cfg)
    return summary.get("final_val/loss")  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    main()
