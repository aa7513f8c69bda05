"""Typed configs: YAML overrides, --set, unknown keys and wrong types named, saved config reloads."""
from pathlib import Path

import pytest
import yaml

from customgen.config import config_hash, load_config, parse_override, save_config
from customgen.errors import UserError


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  root: /data/wikiart\n  style: Analytical_Cubism\n")
    cfg = load_config(f, ["data.resolution=256", "model.ref=tiny", "data.random_flip=false"])
    assert cfg.data.root == "/data/wikiart" and cfg.data.style == "Analytical_Cubism"
    assert cfg.data.resolution == 256 and cfg.data.random_flip is False
    assert cfg.model.ref == "tiny" and cfg.data.layout == "wikiart"


@pytest.mark.parametrize("override,key", [
    ("data.rooot=/x", "data.rooot"),
    ("nosuch.key=1", "nosuch"),
    ("data.resolution=big", "data.resolution"),
    ("data.center_crop=3", "data.center_crop"),
    ("data.layout=zip", "data.layout"),
    ("data=3", "data"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_float_spellings_and_bool_is_not_int():
    from dataclasses import dataclass

    from customgen.config import _coerce

    @dataclass
    class S:
        lr: float = 0.0

    assert _coerce({"lr": "1e-4"}, S, "s").lr == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert _coerce({"lr": 1}, S, "s").lr == 1.0
    with pytest.raises(UserError, match="s.lr"):
        _coerce({"lr": "fast"}, S, "s")
    with pytest.raises(UserError):
        load_config(None, ["data.resolution=true"])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "bad.yaml"
    f.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(f)


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["data.root=/r", "model.dtype=fp16"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["data.root=/other"])) != config_hash(cfg)
    assert yaml.safe_load(path.read_text())["data"]["root"] == "/r"


def test_shipped_configs_only_hold_known_keys():
    root = Path(__file__).resolve().parents[1] / "configs"
    for f in sorted(root.rglob("*.yaml")):  # recipes and the study presets under configs/studies/
        load_config(f)  # raises on any unknown key or wrong type


def test_yaml_booleans_name_literal_choices():
    """`--set train.mixed_precision=no` reaches YAML as False: the literal choice "no" is meant."""
    from customgen.config import load_config

    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_lora_types_are_the_table_limits_checks():
    """`lora.type`'s choices are the adapter types limits.py knows (one list), and the defaults train plain LoRA."""
    import typing

    from customgen.config import LoraSettings
    from customgen.limits import LORA_TYPES

    assert typing.get_args(typing.get_type_hints(LoraSettings)["type"]) == tuple(LORA_TYPES)
    c = load_config(None).lora
    assert (c.type, c.dora, c.conv_rank, c.conv_alpha) == ("lora", False, None, None)


@pytest.mark.parametrize("sets,match", [
    (["lora.type=boft"], r"config key lora.type: 'boft' is not one of lora, locon, loha, lokr"),
    (["lora.type=loha", "lora.dora=true"], r"lora.dora needs lora.type lora or locon .*peft has no DoRA for loha"),
    (["lora.type=lokr", "lora.dora=true"], r"lora.dora needs lora.type lora or locon .*peft has no DoRA for lokr"),
    (["lora.conv_rank=4"], r"lora.conv_rank applies to lora.type locon, loha or lokr"),
    (["lora.conv_alpha=2"], r"lora.conv_alpha applies to lora.type locon, loha or lokr"),
    (["lora.type=locon", "lora.conv_rank=-1"], r"config key lora.conv_rank must be >= 0 and <= 1024, got -1"),
    (["lora.type=loha", "lora.conv_rank=5000"], r"config key lora.conv_rank must be >= 0 and <= 1024, got 5000"),
    (["lora.type=loha", "lora.conv_alpha=0"], r"config key lora.conv_alpha must be > 0 and <= 1000000.0, got 0"),
    (["lora.type=loha", "lora.rank=0"], r"config key lora.rank must be >= 1 and <= 1024, got 0"),
    (["lora.type=lokr", "lora.alpha=-1"], r"config key lora.alpha must be > 0"),
    (["lora.type=locon", "lora.dora=true", "lora.rank=2000"], r"config key lora.rank must be >= 1 and <= 1024"),
    (["lora.type=loha", "pivotal.tokens=2"], r"pivotal tuning needs lora.type lora or locon: a loha artifact"),
])
def test_bad_adapter_settings_are_one_line(sets, match):
    with pytest.raises(UserError, match=match) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


def test_good_adapter_settings_load():
    for sets in (["lora.type=locon", "lora.dora=true", "lora.conv_rank=2", "lora.conv_alpha=1"],
                 ["lora.type=loha", "lora.conv_rank=0"], ["lora.type=lokr"], ["lora.dora=true"],
                 ["lora.type=locon", "lora.dora=true", "pivotal.tokens=2"]):
        load_config(None, sets)
