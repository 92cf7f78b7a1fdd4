"""dreamlora: DreamBooth + LoRA personalization for Stable Diffusion."""

__version__ = "0.1.0"
