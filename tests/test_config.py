"""Config keys (config.py): bad values and files are named errors; top_k as a count or a fraction."""
from __future__ import annotations

import pytest

from cigma_ray.config import Config, ConfigError, from_dict, resolve_k


@pytest.mark.parametrize("values, message", [
    ({"tp_ratio": 0.0}, "tp_ratio"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"mask_steps": "many"}, "mask_steps"),
    ({"top_k": True}, "top_k"),
    ({"maks_steps": 3}, "unknown key"),
])
def test_bad_config_is_named(tmp_path, values, message):
    import yaml

    from cigma_ray import config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_config_file_errors(tmp_path):
    from cigma_ray import config

    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "ok.yaml").write_text("mask_lr: 1\nseed: 3\n")
    cfg = config.load(tmp_path / "ok.yaml")
    assert cfg.mask_lr == 1.0 and isinstance(cfg.mask_lr, float) and cfg.seed == 3


def test_top_k_fractions_round_half_up_and_at_least_one():
    assert [resolve_k(0.02, n) for n in (1000, 72, 24, 100)] == [20, 1, 1, 2]
    assert resolve_k(0.025, 100) == 3 and resolve_k(0.015, 100) == 2  # 1.5 rounds up despite 0.015 * 100 < 1.5
    assert resolve_k(16, 1000) == 16 and Config(top_k=0.5).k_of(24) == 12
    assert from_dict({"top_k": 0.02}).top_k == 0.02 and from_dict({"top_k": 3}).top_k == 3
    with pytest.raises(ConfigError, match="has 24 heads"):
        resolve_k(25, 24)
    with pytest.raises(ConfigError, match="write a count as an integer"):
        from_dict({"top_k": 2.0})
    with pytest.raises(ConfigError, match="top_k"):
        from_dict({"top_k": 0})
    with pytest.raises(ConfigError, match="needs FIG"):
        from_dict({"score": "bir_drop", "measure_fig": False})
    with pytest.raises(ConfigError, match="score='paper'"):
        from_dict({"score": "paper"})
    with pytest.raises(ConfigError, match="must be bool"):
        from_dict({"measure_fig": 1})


FLOAT_KEYS = ("tp_ratio", "mask_lr", "l_js", "l_1", "l_tv", "keep_ratio", "tau", "ci_level", "max_clean_drop", "top_k")


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_key_must_be_finite(tmp_path, key, value):
    """mask_lr: .inf (or an infinite loss weight) passed every range check and gave 0/1 masks."""
    from cigma_ray import config

    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"{key}=(inf|-inf|nan)"):
        config.load(path)
    with pytest.raises(ConfigError, match=key):
        Config().replace(**{key: float(value.replace(".", ""))})


def test_a_config_file_that_is_not_text_or_not_a_file(tmp_path):
    """A PNG as --config raised UnicodeDecodeError; a directory said 'does not exist'."""
    from cigma_ray import config

    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\xff\xfe")
    with pytest.raises(ConfigError, match="not a text file"):
        config.load(png)
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)
    (tmp_path / "mixed.yaml").write_text("1: 2\nmask_lr: 0.1\nzz: 3\n")
    with pytest.raises(ConfigError, match="unknown key.*1, zz"):
        config.load(tmp_path / "mixed.yaml")
