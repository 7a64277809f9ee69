"""Typed configuration: YAML + overrides, unknown keys with suggestions, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hpcdeconv.config import (
    COMIDatasetConfig,
    DeconvolveConfig,
    ExperimentConfig,
    GibsonLanniPSF,
    PSFDatasetConfig,
    PSFFileConfig,
    RLConfig,
    SimulateConfig,
    dump_config,
    load_config,
    parse_overrides,
)
from hpcdeconv.errors import ConfigError
from hpcdeconv.sweep.config import SweepConfig


def test_overrides_parse_yaml_values_into_nested_dicts() -> None:
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=true", "e=x"]) == {
        "a": {"b": 3, "c": [1, 2]},
        "d": True,
        "e": "x",
    }


@pytest.mark.parametrize("bad", ["novalue", "=3"])
def test_malformed_override_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        parse_overrides([bad])


def test_yaml_then_overrides_then_validation(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump({"shape": [32, 64, 64], "psf": {"na": 1.2}}))
    cfg = load_config(SimulateConfig, path, ["psf.wavelength=0.6", "seed=5"])
    assert cfg.shape == (32, 64, 64)
    assert cfg.psf.na == 1.2 and cfg.psf.wavelength == 0.6 and cfg.seed == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["splitt.train=3"], "unknown configuration key 'splitt'; did you mean 'split'?"),
        (["psf.nna=1.2"], "unknown configuration key 'psf.nna'; did you mean 'na'?"),
        (
            ["psf.model=gaussian", "psf.sigmaa=[1, 1, 1]"],
            "unknown configuration key 'psf.sigmaa'; did you mean 'sigma'?",
        ),
        (["storage.codec.cnam=lz4"], "'storage.codec.cnam'; did you mean 'cname'?"),
    ],
)
def test_unknown_key_names_dotted_path_and_closest(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        load_config(SimulateConfig, None, overrides)


def test_unknown_key_inside_a_tagged_method_union() -> None:
    with pytest.raises(ConfigError, match=r"'method.kernel.sizee'; did you mean 'size'"):
        load_config(ExperimentConfig, None, ["method.kernel.sizee=[3, 3, 3]"])
    with pytest.raises(ConfigError, match=r"'method\.kernel'"):
        load_config(
            ExperimentConfig, None, ["method.name=supervised", "method.kernel.size=[3,3,3]"]
        )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["shape=[0, 64, 64]"], "shape.0"),
        (["shape=[-4, 64, 64]"], "shape.0"),
        (["psf.na=1.6"], "must be smaller than n_immersion"),
        (["psf.shape=[99, 31, 31]"], "larger than the volume"),
        (["split.train=0", "split.val=0", "split.test=0"], "at least one volume"),
        (["noise.snr_db=loud"], "noise.snr_db"),
    ],
)
def test_bad_values_give_one_line(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SimulateConfig, None, overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(SimulateConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SimulateConfig, bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ExperimentConfig, None, ["method.name=cyclegan", "train.steps=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(ExperimentConfig, tmp_path / "config.yaml")
    assert again == cfg


def test_repo_configs_all_load() -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    # File-name prefix -> configuration class, longest prefix first; the rest are training
    # configs (psfnet_train_*: the PSF-regression training, psfnet_*: its datasets;
    # comi_data_*: COMI's training sets, comi*: its trainings).
    kinds = [
        ("comi_data", COMIDatasetConfig),
        ("psfnet_train", ExperimentConfig),
        ("psfnet", PSFDatasetConfig),
        ("simulate", SimulateConfig),
        ("psf", PSFFileConfig),
        ("deconvolve", DeconvolveConfig),
        ("rl", RLConfig),
        ("sweep", SweepConfig),
    ]
    paths = sorted(root.glob("*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        kind = next(
            (c for p, c in kinds if path.stem == p or path.stem.startswith(p + "_")),
            ExperimentConfig,
        )
        load_config(kind, path)


def test_gibson_lanni_defaults_have_no_immersion_mismatch() -> None:
    cfg = GibsonLanniPSF()
    assert cfg.n_immersion == cfg.n_immersion_design


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_an_override_switching_a_union_member_starts_from_its_defaults() -> None:
    """``--set method.generator.kind=resnet`` over a U-Net block drops the U-Net's keys
    (``depth`` is unknown to a ResNet); a merge within one member keeps the others."""
    from hpcdeconv.config import ResNetConfig, UNetConfig

    switched = load_config(
        ExperimentConfig,
        CONFIGS / "supervised_2d.yaml",
        ["method.generator.kind=resnet", "method.generator.n_blocks=2"],
    )
    assert switched.method.generator == ResNetConfig(n_blocks=2)
    kept = load_config(
        ExperimentConfig, CONFIGS / "supervised_2d.yaml", ["method.generator.depth=2"]
    )
    assert kept.method.generator == UNetConfig(channels=16, depth=2, final_activation="none")
