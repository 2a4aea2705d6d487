"""Training: one loop (`loop.train`) for pretraining, continued pretraining, SFT and DPO, with LoRA / QLoRA
adapters, checkpoints that resume exactly, and DDP / FSDP2 under torchrun.

    from llamalab.train import load_config, train
    train(load_config("recipes/sft-lora.yaml", ["steps=20"]))
"""

from llamalab.train.config import TrainConfig, load_config
from llamalab.train.loop import train

__all__ = ["TrainConfig", "load_config", "train"]
