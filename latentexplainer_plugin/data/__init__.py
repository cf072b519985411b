"""Image data: reading npz datasets and the procedural shapes datasets with known factors."""

from .npz import check_finite_factors, check_images_fit, load_npz

__all__ = ["check_finite_factors", "check_images_fit", "load_npz"]
