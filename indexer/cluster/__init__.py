"""Clustering of unit face embeddings: K-Means, identity clustering, quality metrics and stable cluster ids.

Pure functions over float32 [N, 512] arrays with L2-normalised rows (cosine = inner product); the store and CLI
wire them in. Errors are ``indexer.errors.ClusteringError`` with a one-sentence message.
"""

from indexer.cluster.identity import METHODS, assign_to_centers, cluster_identities
from indexer.cluster.kmeans import KMeansResult, choose_k, fit_kmeans
from indexer.cluster.metrics import external_scores, internal_scores, purity
from indexer.cluster.passes import centers_from_labels
from indexer.cluster.stable import match_ids

__all__ = [
    "METHODS", "KMeansResult", "assign_to_centers", "centers_from_labels", "choose_k", "cluster_identities",
    "external_scores", "fit_kmeans", "internal_scores", "match_ids", "purity",
]
