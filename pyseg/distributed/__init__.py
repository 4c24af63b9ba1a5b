"""Scale-out on Ray: data-parallel training with Ray Train (see ray_train.py)."""

from pyseg.distributed.ray_train import RayScaling, absolute_paths, fit_with_ray, init_ray

__all__ = ["RayScaling", "absolute_paths", "fit_with_ray", "init_ray"]
