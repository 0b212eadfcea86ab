"""fedlora: federated LoRA fine-tuning of LLMs across heterogeneous clients."""

__version__ = "0.1.0"
