"""brep-rl: train tiny steering vectors on a frozen LLM with SFT and GRPO on verifiable math rewards."""

from brep_rl.errors import ArtifactError, ConfigError
from brep_rl.model import load_base
from brep_rl.steering import SteeringConfig, SteeringVectors

__all__ = ["ArtifactError", "ConfigError", "SteeringConfig", "SteeringVectors", "load_base"]
__version__ = "0.1.0"
