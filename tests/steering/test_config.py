import json

import pytest

from brep_rl import ConfigError, SteeringConfig


def test_defaults_are_bias_on_down_proj_all_layers():
    cfg = SteeringConfig()
    assert (cfg.site, cfg.layers, cfg.mode, cfg.radius) == ("mlp.down_proj", None, "bias", None)
    assert cfg.uses_bias and not cfg.uses_prefix


def test_json_round_trip(tmp_path):
    cfg = SteeringConfig(mode="bias+prefix", layers=[3, 1], prefix_tokens=4, radius=0.5, radius_relative=True,
                         site_norms=[1.0, 2.0], penalty=0.1, provenance={"trainer": "sft", "steps": 3})
    cfg.to_json_file(tmp_path / "c.json")
    back = SteeringConfig.from_json_file(tmp_path / "c.json")
    assert back == cfg
    assert back.layers == [1, 3]  # normalised to sorted order


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "steer"}, "mode"),
        ({"prefix_tokens": -1}, "prefix_tokens"),
        ({"prefix_tokens": 2.5}, "prefix_tokens"),
        ({"layers": []}, "layers"),
        ({"layers": [0, 0]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"radius": 0}, "radius"),
        ({"radius": float("nan")}, "radius"),
        ({"radius_relative": True}, "radius"),
        ({"penalty": -1}, "penalty"),
        ({"init": "ones"}, "init"),
        ({"site": ""}, "site"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"SteeringConfig\.{field}: expected .*got"):
        SteeringConfig(**kwargs)


def test_unknown_keys_and_bad_json_name_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"mode": "bias", "radious": 1.0}))
    with pytest.raises(ConfigError, match=r"c\.json: unknown SteeringConfig field\(s\) \['radious'\]"):
        SteeringConfig.from_json_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"c\.json: not valid JSON"):
        SteeringConfig.from_json_file(path)
    path.write_text(json.dumps({"mode": "sideways"}))
    with pytest.raises(ConfigError, match=r"c\.json: SteeringConfig\.mode"):
        SteeringConfig.from_json_file(path)


@pytest.mark.parametrize("kwargs, obstacle", [
    ({"layers": [1, 2]}, None),
    ({"layers": [1, 2], "site": "mlp.up_proj"}, "these vectors are on 'mlp.up_proj', inside the layer"),
    ({"layers": [0, 1]}, "cannot act on layer 0"),
    ({}, "cannot act on layer 0"),  # all layers, layer 0 among them
])
def test_control_vector_obstacle_says_why_llama_cpp_cannot_apply_the_vectors(kwargs, obstacle):
    found = SteeringConfig(**kwargs).control_vector_obstacle()
    assert found == obstacle if obstacle is None else obstacle in found
