"""neoxray: pretrain, fine-tune, evaluate and serve GPT-NeoX-family models on Ray."""

__version__ = "0.1.0"
