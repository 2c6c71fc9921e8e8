"""Storage: the LMDB store (source of truth) and the FAISS vector index derived from it."""
