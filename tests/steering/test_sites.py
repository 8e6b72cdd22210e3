"""Where steering acts: decoder layers and site modules, with errors that list what exists."""


import pytest

from brep_rl import SteeringConfig, SteeringVectors


def test_unknown_site_and_layer_list_what_exists(tiny_llama):
    with pytest.raises(ValueError, match=r"site 'mlp.gate' does not exist .*available sites: .*mlp.down_proj"):
        SteeringVectors.attach(tiny_llama, SteeringConfig(site="mlp.gate"))
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist: the model has 3 decoder layers \(0..2\)"):
        SteeringVectors.attach(tiny_llama, SteeringConfig(layers=[0, 5]))
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(site="mlp.up_proj"))
    assert steer.dim == 128  # BREP's placement: the MLP's inner width
    with pytest.raises(ValueError, match="already has steering vectors attached"):
        SteeringVectors.attach(tiny_llama, SteeringConfig())
