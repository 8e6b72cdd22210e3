"""Steering vectors, one concept a module: config, vectors (parameters and contexts), hooks (how they act in a
forward pass), artifact (on disk), sites (where in the model)."""

from brep_rl.steering.artifact import WEIGHTS_NAME, read_artifact, relative_difference
from brep_rl.steering.config import CONFIG_NAME, SteeringConfig
from brep_rl.steering.vectors import SteeringVectors

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "SteeringConfig", "SteeringVectors", "read_artifact", "relative_difference"]
