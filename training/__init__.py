"""The training framework behind ``train.py`` / ``eval.py``.

``training.trainer.train(cfg)`` runs a composed Hydra config (``configs/train.yaml``); the pieces are
``training.data`` (datasets), ``training.optim`` (AdamW + schedule), ``training.checkpoint`` (safe, atomic
checkpoints), ``training.memory`` (activation-memory report), ``training.logging`` (metrics, plots, wandb)
and ``training.distributed`` (DDP / FSDP2). Submodules are imported on use, so ``import training`` is cheap.
"""
