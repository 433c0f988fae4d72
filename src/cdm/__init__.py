"""cdm: cascaded diffusion models with conditioning augmentation (Ho et al., JMLR 2022)."""

from .augment import AugKind, AugmentConfig, ConditioningAugmentation
from .cascade import Cascade, Mode, SamplingPlan, StagePlan
from .cascade_file import load_cascade, read_cascade_file, write_cascade_file
from .checkpoint import load_stage
from .config import StageConfig, TrainConfig, load_stage_config
from .diffusion import DiffusionConfig, GaussianDiffusion, time_grid
from .stage import Stage
from .unet import UNet, UNetConfig

__version__ = "0.1.0"

__all__ = ["AugKind", "AugmentConfig", "ConditioningAugmentation", "Cascade", "SamplingPlan", "Mode",
           "StagePlan", "load_cascade", "read_cascade_file", "write_cascade_file", "load_stage", "StageConfig", "TrainConfig", "load_stage_config", "DiffusionConfig",
           "GaussianDiffusion", "time_grid", "Stage", "UNet", "UNetConfig"]
