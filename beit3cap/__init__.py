"""beit3cap: fine-tune, evaluate and serve BEiT-3 image-captioning models."""

__version__ = "0.1.0"
