"""rematch_pl: ReMatch for MLLM multimodal embeddings on PyTorch Lightning + Hydra.

`rematch_pl.Encoder` (see `rematch_pl.encoder`) is imported on first use, so ``import rematch_pl``
stays light (no torch / transformers import).
"""

__all__ = ["Encoder"]


def __getattr__(name: str):
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'rematch_pl' has no attribute {name!r}")
