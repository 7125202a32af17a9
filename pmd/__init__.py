"""pmd: Procedural Memory Distillation, with GRPO and SDPO baselines, on PyTorch + transformers + PEFT.

    import pmd
    run = pmd.train({"method": "pmd", "steps": 20}, dataset=rows, reward=my_reward)   # pmd/api.py
    pmd.evaluate(run.path); run.metrics; run.memory(level="insight")

The names below load on first use, so `import pmd` stays light.
"""

__version__ = "0.1.0"
__all__ = ["Config", "TrainedRun", "evaluate", "read_memory", "train"]


def __getattr__(name: str):
    if name == "Config":
        from pmd.config import Config

        return Config
    if name in ("TrainedRun", "evaluate", "read_memory", "train"):
        from pmd import api

        return getattr(api, name)
    raise AttributeError(f"module 'pmd' has no attribute {name!r}")
