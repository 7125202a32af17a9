"""pmd: Procedural Memory Distillation, with GRPO and SDPO baselines, on PyTorch + transformers + PEFT."""

__version__ = "0.1.0"
