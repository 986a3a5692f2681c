"""portllm: carry a LoRA patch from one version of a model to the next, without retraining."""

__version__ = "0.1.0"
