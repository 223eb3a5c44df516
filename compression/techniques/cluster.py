"""Weight clustering (tfmot ``cluster_weights``): each kernel keeps k shared values.

A k-means codebook per kernel means log2(k)-bit indices plus k floats; the ``.tflite`` stays a
dense float tensor, but gzip (and any entropy coding) shrinks it, which the search reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from compression.data import Dataset
from compression.techniques.base import StepResult, TechniqueError
from compression.techniques.common import clone_model, fine_tune

_LOGGER = logging.getLogger(__name__)

_CLUSTERABLE = (keras.layers.Dense, keras.layers.Embedding)
ALL_KERNELS = ("item_embedding", "hidden", "projection", "logits")


def cluster_model(model: keras.Model, dataset: Dataset, clusters: int, layers: Sequence[str], *,
                  epochs: float, learning_rate: float = 2e-4, max_pairs: int | None = None) -> keras.Model:
    """Cluster the named layers' kernels with k-means++ init, fine-tune the centroids, strip."""
    if clusters < 2:
        raise TechniqueError(f"clusters must be >= 2, got {clusters}")
    clustered_names = []

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer.name in layers and type(layer) in _CLUSTERABLE:
            clustered_names.append(layer.name)
            return tfmot.clustering.keras.cluster_weights(
                layer, number_of_clusters=clusters,
                cluster_centroids_init=tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS)
        return layer

    wrapped = keras.models.clone_model(clone_model(model), clone_function=wrap)
    missing = sorted(set(layers) - set(clustered_names))
    if missing:
        raise TechniqueError(f"cannot cluster layers {missing}: not Dense/Embedding layers of "
                             f"{model.name!r}; layers: {[la.name for la in model.layers]}")
    fine_tune(wrapped, dataset, epochs=epochs, learning_rate=learning_rate, max_pairs=max_pairs)
    return clone_model(tfmot.clustering.keras.strip_clustering(wrapped), name=model.name)


def kmeans_1d(values: np.ndarray, clusters: int, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k], assignment like ``values``): Lloyd's k-means on scalars, quantile init."""
    flat = values.ravel().astype(np.float64)
    centroids = np.quantile(flat, (np.arange(clusters) + 0.5) / clusters)
    for _ in range(iterations):
        order = np.argsort(centroids)
        centroids = centroids[order]
        edges = (centroids[1:] + centroids[:-1]) / 2
        assign = np.searchsorted(edges, flat)
        counts = np.bincount(assign, minlength=clusters)
        sums = np.bincount(assign, weights=flat, minlength=clusters)
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    edges = (np.sort(centroids)[1:] + np.sort(centroids)[:-1]) / 2
    centroids = np.sort(centroids)
    return centroids, np.searchsorted(edges, flat).reshape(values.shape)


def cluster_sequential(model: keras.Model, dataset: Dataset, clusters: int, *, epochs: float,
                       learning_rate: float = 2e-4, max_pairs: int | None = None) -> keras.Model:
    """A k-value codebook per matrix of a sequential model, centroids fine-tuned with fixed assignments.

    tfmot's ``cluster_weights`` wraps top-level Dense/Embedding layers only; the attention
    kernels sit inside custom layers. As tfmot does, each weight keeps its cluster and every
    step moves a centroid to the mean of its members (their gradient steps averaged).
    """
    from compression.techniques import sequential as seq

    if clusters < 2:
        raise TechniqueError(f"clusters must be >= 2, got {clusters}")
    out = seq.rebuild(model)
    variables = seq.matrices(out)
    books = {name: kmeans_1d(v.numpy(), clusters) for name, v in variables.items()}
    assignments = {name: assign for name, (_, assign) in books.items()}

    def project(_: int) -> None:
        for name, variable in variables.items():
            assign = assignments[name].ravel()
            values = variable.numpy().ravel()
            counts = np.bincount(assign, minlength=clusters)
            means = np.bincount(assign, weights=values, minlength=clusters) / np.maximum(counts, 1)
            variable.assign(means[assign].reshape(variable.shape).astype(np.float32))

    seq.constrained_fine_tune(out, dataset, project, epochs=epochs, learning_rate=learning_rate,
                              max_pairs=max_pairs)
    return out


def distinct_values(model: keras.Model, layer: str) -> int:
    """How many distinct values the layer's kernel holds."""
    return int(len(np.unique(model.get_layer(layer).get_weights()[0])))


@dataclass
class WeightClustering:
    """Technique ``cluster``: k shared values per kernel of the named layers."""

    clusters: int = 16
    layers: Sequence[str] = field(default_factory=lambda: ALL_KERNELS)
    epochs: float = 1.0
    max_pairs: int | None = None
    name: str = "cluster"

    def apply(self, model: keras.Model, dataset: Dataset) -> StepResult:
        """Cluster, fine-tune and report the distinct values left per kernel."""
        from compression.techniques import sequential as seq

        if seq.is_sequential(model):
            clustered = cluster_sequential(model, dataset, self.clusters, epochs=self.epochs,
                                           max_pairs=self.max_pairs)
            distinct = {name: int(len(np.unique(v.numpy()))) for name, v in seq.matrices(clustered).items()}
            return StepResult(clustered, [self.name], {"clusters": self.clusters, "distinct": distinct})
        clustered = cluster_model(model, dataset, self.clusters, list(self.layers), epochs=self.epochs,
                                  max_pairs=self.max_pairs)
        distinct = {name: distinct_values(clustered, name) for name in self.layers}
        _LOGGER.info("cluster k=%d: distinct values %s", self.clusters, distinct)
        return StepResult(clustered, [self.name], {"clusters": self.clusters, "distinct": distinct})
