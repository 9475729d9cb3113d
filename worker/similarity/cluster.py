"""Group indexed images (say, everything blocked this week) so a reviewer sees each kind once.

k-means on the unit-length embeddings (cosine geometry), or HDBSCAN, which finds the number of
groups itself and leaves outliers unclustered. Each cluster lists its images nearest its centre
first, so a contact sheet opens on its most typical members.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import numpy as np

from worker.errors import InvalidDataset, MissingExtra
from worker.similarity.index import IndexedImage, VectorIndex

__all__ = ["Cluster", "Method", "cluster_index", "default_k"]

Method = Literal["kmeans", "hdbscan"]
NOISE = -1


@dataclass(frozen=True)
class Cluster:
    label: int  # -1: HDBSCAN's unclustered images
    items: list[IndexedImage]  # nearest the centre first

    @property
    def name(self) -> str:
        return "unclustered" if self.label == NOISE else f"cluster-{self.label:03d}"


def default_k(count: int) -> int:
    """The usual rule of thumb, sqrt(n / 2), at least 2 and at most n."""
    return max(1, min(count, max(2, round(math.sqrt(count / 2)))))


def cluster_index(
    index: VectorIndex,
    only: Collection[str] = (),
    method: Method = "kmeans",
    k: int | None = None,
    min_cluster_size: int = 5,
    seed: int = 0,
) -> list[Cluster]:
    """Clusters of the images whose verdict is in ``only`` (all when empty), largest first."""
    items = [item for item in index.items if not only or item.verdict in only]
    if len(items) < 2:
        raise InvalidDataset(
            f"{len(items)} image(s) with verdict {'/'.join(only) or 'any'}: nothing to cluster"
        )
    vectors = index.vectors(items)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    labels = _labels(vectors, method, k, min_cluster_size, seed)
    clusters = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        centre = vectors[members].mean(axis=0)
        order = members[np.argsort(-(vectors[members] @ centre), kind="stable")]
        clusters.append(Cluster(int(label), [items[i] for i in order]))
    clusters.sort(key=lambda c: (c.label == NOISE, -len(c.items), c.label))
    return clusters


def _labels(
    vectors: np.ndarray, method: Method, k: int | None, min_cluster_size: int, seed: int
) -> np.ndarray:
    try:
        from sklearn.cluster import HDBSCAN, KMeans
    except ModuleNotFoundError as exc:
        raise MissingExtra("clustering needs scikit-learn: pip install 'modq[analysis]'") from exc
    if method == "hdbscan":
        size = max(2, min(min_cluster_size, len(vectors)))
        return np.asarray(HDBSCAN(min_cluster_size=size, copy=True).fit_predict(vectors))
    clusters = default_k(len(vectors)) if k is None else k
    if not 1 <= clusters <= len(vectors):
        raise InvalidDataset(f"k={clusters} for {len(vectors)} images: need 1 <= k <= images")
    model = KMeans(n_clusters=clusters, n_init="auto", random_state=seed)
    return np.asarray(model.fit_predict(vectors))
