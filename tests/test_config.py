"""Configs: shipped files load, unknown keys and bad values are rejected with the valid choices."""
from pathlib import Path

import pytest

from hpc_bkd.config import ConfigError, config_from_dict, describe_keys, load_config, shipped_configs


def test_shipped_configs_load():
    names = shipped_configs()
    assert {"digits-vgg16", "tiny", "vgg16-cifar10", "resnet50-cifar10"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.distill.epochs > 0


def test_default_is_digits_vgg16():
    cfg = load_config(None)
    assert (cfg.model.arch, cfg.data.dataset) == ("vgg16", "digits")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"distill": {"epoch": 3}})
    msg = str(err.value)
    assert "distill.epoch" in msg and "epochs" in msg and "optimizer" in msg


def test_unknown_section_lists_sections():
    with pytest.raises(ConfigError, match="valid sections: model, data, teacher"):
        config_from_dict({"distil": {}})


@pytest.mark.parametrize("raw, match", [
    ({"distill": {"optimizer": "lbfgs"}}, "choose one of rmsprop, sgd, adam"),
    ({"distill": {"epochs": "three"}}, "expected an integer"),
    ({"distill": {"epochs": 0}}, "must be > 0"),
    ({"data": {"val_fraction": 1.5}}, r"must be in \[0, 1\)"),
    ({"blocks": {"granularity": "layer"}}, "choose one of conv, unit"),
    ({"run": {"device": "tpu"}}, "choose one of auto, cpu, cuda"),
    ({"distill": {"teacher_cache": True}}, "'on' is not valid; choose one of auto, off"),
    ({"distill": {"teacher_cache_gb": -1}}, "must be >= 0 or null"),
])
def test_bad_values_are_rejected(raw, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_overrides_are_typed(tmp_path: Path):
    cfg = load_config("tiny", ["distill.epochs=5", "distill.lr=0.01", "teacher.checkpoint=null",
                               "run.dir=" + str(tmp_path)])
    assert cfg.distill.epochs == 5 and cfg.distill.lr == 0.01 and cfg.teacher.checkpoint is None
    assert cfg.run.dir == str(tmp_path)
    # YAML reads an unquoted `off` as false: a setting spelled off means off
    assert load_config("tiny", ["distill.teacher_cache=off"]).distill.teacher_cache == "off"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["epochs=5"])
    with pytest.raises(ConfigError, match="unknown key distill.bogus"):
        load_config("tiny", ["distill.bogus=1"])


def test_file_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="shipped configs: .*digits-vgg16"):
        load_config(str(tmp_path / "missing.yaml"))


def test_every_key_is_documented():
    text = describe_keys()
    for section in ("model", "data", "teacher", "blocks", "distill", "plan", "finetune", "run"):
        assert f"{section}:" in text
    lines = text.splitlines()
    undocumented = [lines[i] for i in range(1, len(lines))
                    if lines[i].startswith("  ") and not lines[i].strip().startswith("#")
                    and not lines[i - 1].strip().startswith("#")]
    assert undocumented == [], f"keys without a comment in config.py: {undocumented}"
