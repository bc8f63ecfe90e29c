from __future__ import annotations

import pytest

from igds_ray.cli import build_parser, score_config, select_config
from igds_ray.config import ScoreConfig, SelectConfig, from_dict, sae_from_string, to_dict
from igds_ray.errors import ConfigError
from igds_ray.schema import FeatureId, parse_features

BASE = dict(model="m", sae="rel/layer_1/width_16k/canonical", features="l1_p3,l1_p17", pool="p", out="o")


def test_round_trip_and_shorthands():
    cfg = from_dict(ScoreConfig, BASE)
    assert cfg.model.name_or_path == "m"
    assert (cfg.sae.release, cfg.sae.sae_id) == ("rel", "layer_1/width_16k/canonical")
    assert cfg.features == ("l1_p3", "l1_p17")
    assert cfg.feature_ids == (FeatureId(1, 3), FeatureId(1, 17))
    assert from_dict(ScoreConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"bogus": 1}, "unknown config key bogus"),
        ({"pool": {"path": "p", "colour": "x"}}, "pool.colour"),
        ({"max_tokens": "many"}, "max_tokens: expected an integer"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"pooling": "median"}, "pooling: expected one of"),
        ({"features": "l1_p3,l2_p4"}, "one SAE layer"),
        ({"features": "p3"}, "not of the form"),
        ({"features": "l1_p3,l1_p3"}, "listed twice"),
        ({"num_gpus": -1}, "must be >= 0"),
        ({"min_actors": 3, "max_actors": 2}, "max_actors"),
        ({"chat_template": True}, "unknown config key chat_template"),
        ({"pool": {"path": "p", "text_column": "t", "chat_template": True}}, "chat_template"),
        ({"sae": {"release": "r"}}, "sae.release and sae.sae_id"),
    ],
)
def test_bad_configs_name_the_key(patch, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        from_dict(ScoreConfig, {**BASE, **patch})


def test_missing_key_is_named():
    with pytest.raises(ConfigError, match="missing config key out"):
        from_dict(ScoreConfig, {k: v for k, v in BASE.items() if k != "out"})


@pytest.mark.parametrize("fraction", [-0.1, 0.0, 1.5])
def test_select_fraction_bounds(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        from_dict(SelectConfig, dict(scores="s", out="o", fraction=fraction))


def test_sae_spec(tmp_path):
    assert sae_from_string(str(tmp_path)) == {"path": str(tmp_path)}
    assert sae_from_string("gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical") == {
        "release": "gemma-scope-2b-pt-res-canonical", "sae_id": "layer_12/width_16k/canonical"}
    with pytest.raises(ConfigError, match="neither an existing directory"):
        sae_from_string("justaname")


def test_features_parse_keeps_order():
    assert [str(f) for f in parse_features(["l14_p11575", "l14_p2"])] == ["l14_p11575", "l14_p2"]


def test_cli_flags_override_yaml(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(
        "model: {name_or_path: a, dtype: float32}\nsae: rel/x\nfeatures: [l0_p1]\n"
        "pool: {path: p, text_column: body}\nout: o\nmax_tokens: 64\n"
    )
    args = build_parser().parse_args(["score", "--config", str(y), "--max-tokens", "32", "--pooling", "max"])
    cfg = score_config(args)
    assert (cfg.max_tokens, cfg.pooling, cfg.pool.text_column, cfg.model.dtype) == (32, "max", "body", "float32")
    args = build_parser().parse_args(["score", "--config", str(y), "--model", "b"])
    assert score_config(args).model.name_or_path == "b"
    args = build_parser().parse_args(["select", "--scores", "s", "--out", "o", "--n", "7"])
    assert (select_config(args).n, select_config(args).fraction) == (7, None)


def test_yaml_is_never_code(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    args = build_parser().parse_args(["score", "--config", str(y)])
    with pytest.raises(ConfigError, match="not valid YAML"):
        score_config(args)


def test_neuronpedia_links_come_from_sae_lens_ids_or_the_local_cfg(tmp_path):
    """Gemma Scope layer 12 width 16k links to its Neuronpedia page (sae-lens's neuronpedia_id); a local SAE
    links only when its cfg.json names one."""
    import json

    from igds_ray.config import SAEConfig
    from igds_ray.stages.cards import neuronpedia_base

    gemma = SAEConfig(release="gemma-scope-2b-pt-res-canonical", sae_id="layer_12/width_16k/canonical")
    assert neuronpedia_base(gemma) == "https://www.neuronpedia.org/gemma-2-2b/12-gemmascope-res-16k"
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 8, "metadata": {"neuronpedia_id": "m/3-res"}}))
    assert neuronpedia_base(SAEConfig(path=str(tmp_path))) == "https://www.neuronpedia.org/m/3-res"
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 8}))
    assert neuronpedia_base(SAEConfig(path=str(tmp_path))) is None
