"""Similarity over embeddings: a vector index, nearest-image queries and clusters with
contact sheets. Needs the ``analysis`` extra (usearch, scikit-learn)."""

from worker.similarity.cluster import Cluster, cluster_index
from worker.similarity.index import IndexedImage, Neighbour, VectorIndex
from worker.similarity.query import embed_image, model_spec_for
from worker.similarity.sheet import reader_for, write_sheet

__all__ = [
    "Cluster",
    "IndexedImage",
    "Neighbour",
    "VectorIndex",
    "cluster_index",
    "embed_image",
    "model_spec_for",
    "reader_for",
    "write_sheet",
]
