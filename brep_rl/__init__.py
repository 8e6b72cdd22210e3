"""brep-rl: train tiny steering vectors on a frozen LLM with SFT and GRPO on verifiable math rewards."""

from brep_rl.config import ConfigError, SteeringConfig
from brep_rl.model import load_base
from brep_rl.steering import ArtifactError, SteeringVectors

__all__ = ["ArtifactError", "ConfigError", "SteeringConfig", "SteeringVectors", "load_base"]
__version__ = "0.1.0"
