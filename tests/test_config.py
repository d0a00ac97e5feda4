from pathlib import Path

import pytest

from ucdseg.config import ConfigError, from_dict, load_config, migrate, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_typed_and_applied(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 4\nmethod:\n  name: plop+ucd\n")
    cfg = load_config(path, ["train.batch_size=8", "method.weights.ucd=0.5", "task.order=[3,1,2]",
                             "method.options.temperature=0.2"])
    assert cfg.train.batch_size == 8
    assert cfg.method.name == "plop+ucd"
    assert cfg.method.options == {"temperature": 0.2}
    assert cfg.method.weights == {"ucd": 0.5}
    assert cfg.task.order == [3, 1, 2]


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.batch_size=abc", ["train.batch_size"]),
        ("train.bogus=1", ["train.bogus"]),
        ("nothing=1", ["nothing"]),
        ("data.setting=sideways", ["data.setting", "overlapped"]),
        ("train.amp=fp8", ["train.amp", "bf16"]),
        ("model.first_block_dilation=torchvision", ["model.first_block_dilation", "release", "previous"]),
        ("train.batch_size=0", ["train.batch_size", ">= 1"]),
        ("novalue", ["novalue", "key=value"]),
    ],
)
def test_bad_overrides_are_one_line_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(ConfigError, match="model.backbon"):
        load_config(wrong)


def test_dict_round_trip():
    cfg = load_config(None, ["seed=3", "task.name=6-2"])
    assert from_dict(to_dict(cfg)) == cfg


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert files, "no config shipped"
    for path in files:
        load_config(path)


def test_base_files_are_merged_first(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  batch_size: 4\n  lr: 0.5\ntask:\n  name: 6-2\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ntrain:\n  lr: 0.1\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.task.name) == (4, 0.1, "6-2")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("_base_: gone.yaml\n")
    with pytest.raises(ConfigError, match="gone.yaml does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_output_stride_must_suit_the_backbone():
    assert load_config(None, []).model.output_stride == 4  # the default embedded_resnet
    assert load_config(None, ["model.backbone=resnet101", "model.output_stride=8"]).model.output_stride == 8
    with pytest.raises(ConfigError, match=r"'model.output_stride' is 4; backbone resnet18 takes 8 or 16") as err:
        load_config(None, ["model.backbone=resnet18"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, words", [
    (["method.name=mib", "method.weights.ucd=1"], ["'mib' has no loss term 'ucd'", "unce"]),
    (["method.name=nope"], ["method.name", "unknown method 'nope'"]),
    (["method.name=mib", "method.options.temperature=0.1"], ["method.options.temperature", "'mib' has no such option"]),
    (["method.name=mib+ucd", "method.options.temperature=0"], ["method.options.temperature", "> 0"]),
    (["method.name=mib+ucd", "method.options.formulation=dense"], ["method.options.formulation", "supcon"]),
    (["method.name=mib+ucd", "method.options.gather=3"], ["method.options.gather", "bool"]),
    (["method.name=plop", "method.options.pod_factor=-1"], ["method.options.pod_factor", "> 0"]),
    (["method.ucd_temperature=0.1"], ["invalid config key 'method.ucd_temperature'", "not in 'MethodConfig'"]),
])
def test_method_weights_and_options_are_checked_when_the_config_is_read(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_saved_config_with_a_key_of_no_release_is_refused_by_name():
    """0.1 reads the configs it writes: a method key outside method.options is no key of it."""
    saved = to_dict(load_config(None, ["method.name=plop+ucd"]))
    saved["method"]["ucd_temperature"] = 0.2
    with pytest.raises(ConfigError, match=r"^invalid config key 'method.ucd_temperature': Key 'ucd_temperature' "
                                          r"not in 'MethodConfig'$"):
        from_dict(saved)


def test_first_block_dilation_follows_the_releases_unless_a_saved_resnet_config_predates_it():
    assert load_config(None, []).model.first_block_dilation == "release"
    resnet = ["model.backbone=resnet101", "model.output_stride=16"]
    assert load_config(None, resnet).model.first_block_dilation == "release"  # new runs: the releases'
    assert load_config(None, resnet + ["model.first_block_dilation=previous"]).model.first_block_dilation == "previous"
    # a config saved before the key existed was trained with torchvision's layout: read as "previous"
    old = to_dict(load_config(None, resnet))
    old["model"].pop("first_block_dilation")
    assert from_dict(old).model.first_block_dilation == "previous"
    assert migrate(old)["model"]["first_block_dilation"] == "previous" and "first_block_dilation" not in old["model"]
    # ... but a saved value is kept, and backbones the key does not concern take the default
    saved = to_dict(load_config(None, resnet))
    assert migrate(saved) == saved and from_dict(saved).model.first_block_dilation == "release"
    embedded = to_dict(load_config(None, []))
    embedded["model"].pop("first_block_dilation")
    assert migrate(embedded) == embedded and from_dict(embedded).model.first_block_dilation == "release"


def test_a_bad_value_from_a_file_names_the_file_and_one_from_an_override_does_not(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: -1.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config file {path}: config key 'train.lr' is -1.0")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lr=-2.0"])
    assert str(info.value).startswith("config key 'train.lr' is -2.0")
