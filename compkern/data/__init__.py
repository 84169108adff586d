"""Data: 2-D toy distributions with exact densities (toy2d), colored digits, shape scenes."""
from compkern.data.toy2d import (  # noqa: F401
    ComposedTarget, CompositionTask, Distribution2D, GaussianMixture, Mixture, Negation, Product, SoftBox,
    composition_tasks, default_components, energy_distance, gaussian, grid, hdr_fraction, hdr_threshold,
    make_labeled_dataset, mmd_rbf, ring,
)

__all__ = [
    "ComposedTarget", "CompositionTask", "Distribution2D", "GaussianMixture", "Mixture", "Negation", "Product",
    "SoftBox", "composition_tasks", "default_components", "energy_distance", "gaussian", "grid", "hdr_fraction",
    "hdr_threshold", "make_labeled_dataset", "mmd_rbf", "ring",
]
