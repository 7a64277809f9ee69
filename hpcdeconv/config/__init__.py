"""Typed configuration: pydantic models loaded from YAML with ``--set a.b=c`` overrides.

One module per concern (``loading``, ``physics``, ``data``, ``networks``, ``methods``, ``run``,
``experiment``, ``infer``); every public name is re-exported here, so
``from hpcdeconv.config import ExperimentConfig`` is the import to use.
"""

from hpcdeconv.config.base import PositiveFloat, PositiveInt, Shape, Shape3D, Spacing3D, StrictModel
from hpcdeconv.config.data import DataConfig, ImageDomainsData, PairedImagesData, PSFSamplesData
from hpcdeconv.config.experiment import ExperimentConfig
from hpcdeconv.config.infer import ClusterConfig, DeconvolveConfig, PredictConfig, RLConfig
from hpcdeconv.config.loading import (
    build_config,
    deep_merge,
    dump_config,
    load_config,
    parse_overrides,
)
from hpcdeconv.config.methods import (
    METHOD_CONFIGS,
    BlindCycleGANConfig,
    COMIConfig,
    COMILossConfig,
    CycleGANConfig,
    GANLossConfig,
    KernelConfig,
    KnownKernelConfig,
    MethodConfig,
    NonBlindCycleGANConfig,
    PSFRegressionConfig,
    SupervisedConfig,
)
from hpcdeconv.config.networks import (
    DiscriminatorConfig,
    GeneratorConfig,
    RegressorConfig,
    ResNetConfig,
    UNetConfig,
)
from hpcdeconv.config.perceptual import ContentLossConfig
from hpcdeconv.config.physics import (
    BornWolfPSF,
    CodecConfig,
    GaussianPSF,
    GibsonLanniPSF,
    NoiseConfig,
    PhantomConfig,
    PSFConfig,
    PSFFileConfig,
    RichardsWolfPSF,
    SimulateConfig,
    SplitConfig,
    StorageConfig,
    ZernikePSF,
)
from hpcdeconv.config.psf_map import PSFMapConfig
from hpcdeconv.config.psfnet import (
    PhantomLibraryConfig,
    PSFDatasetConfig,
    PSFModelConfig,
    PSFModelName,
    PSFNoiseConfig,
    PSFOptics,
    PSFSplitFractions,
)
from hpcdeconv.config.run import DeepSpeedConfig, OptimConfig, StrategyConfig, TrainConfig

__all__ = [
    "METHOD_CONFIGS",
    "BlindCycleGANConfig",
    "BornWolfPSF",
    "COMIConfig",
    "COMILossConfig",
    "ClusterConfig",
    "CodecConfig",
    "ContentLossConfig",
    "CycleGANConfig",
    "DataConfig",
    "DeconvolveConfig",
    "DeepSpeedConfig",
    "DiscriminatorConfig",
    "ExperimentConfig",
    "GANLossConfig",
    "GaussianPSF",
    "GeneratorConfig",
    "GibsonLanniPSF",
    "ImageDomainsData",
    "KernelConfig",
    "KnownKernelConfig",
    "MethodConfig",
    "NoiseConfig",
    "NonBlindCycleGANConfig",
    "OptimConfig",
    "PSFConfig",
    "PSFDatasetConfig",
    "PSFFileConfig",
    "PSFMapConfig",
    "PSFModelConfig",
    "PSFModelName",
    "PSFNoiseConfig",
    "PSFOptics",
    "PSFRegressionConfig",
    "PSFSamplesData",
    "PSFSplitFractions",
    "PairedImagesData",
    "PhantomConfig",
    "PhantomLibraryConfig",
    "PositiveFloat",
    "PositiveInt",
    "PredictConfig",
    "RLConfig",
    "RegressorConfig",
    "ResNetConfig",
    "RichardsWolfPSF",
    "Shape",
    "Shape3D",
    "SimulateConfig",
    "Spacing3D",
    "SplitConfig",
    "StorageConfig",
    "StrategyConfig",
    "StrictModel",
    "SupervisedConfig",
    "TrainConfig",
    "UNetConfig",
    "ZernikePSF",
    "build_config",
    "deep_merge",
    "dump_config",
    "load_config",
    "parse_overrides",
]
