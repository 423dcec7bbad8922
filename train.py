"""Train a model: ``python train.py [experiment=...] [group=option] [key=value]`` (configs/train.yaml).

Examples: ``python train.py`` (small GPT on the stdlib sources, CPU), ``python train.py experiment=vit-digits``,
``python train.py -m model.dropout=0.0,0.1 loss.ce_chunks=1,4`` (sweep), ``python train.py resume=latest``,
``torchrun --nproc_per_node 8 train.py experiment=gpt2-small-owt``.
"""
import hydra
from omegaconf import DictConfig

import training.config  # noqa: F401  (registers the resolvers configs/train.yaml uses)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from training.trainer import train

    summary = train(cfg)
    return summary.get("final_val/loss")  # the value a Hydra sweeper optimizes


if __name__ == "__main__":
    main()
