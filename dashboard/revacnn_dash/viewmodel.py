"""Transitional alias: the names that lived here, re-exported from where they live now, until ``app.py`` imports
them from there (delete this module then). Hierarchy: ``compute.layers``; embeddings: ``compute.embeddings``;
hints: ``compute.redundancy``; network view: ``viewmodels.network``; images: ``viewmodels.images``."""

from __future__ import annotations

from .compute.embeddings import (align_to_previous, compute_embedding, embedding_features, kmeans_labels,  # noqa: F401
                                 missing_maps_reason, nearest_neighbours, procrustes_align)
from .compute.layers import TreeNode, default_expanded, layer_tree, visible_columns  # noqa: F401
from .compute.redundancy import redundancy  # noqa: F401
from .viewmodels.images import (activation_image, data_uri, filter_image, fit_rows, mosaic, png_bytes,  # noqa: F401
                                to_uint8)
from .viewmodels.network import jitter_pixels, network_model, top_half  # noqa: F401
