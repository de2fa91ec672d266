"""Pure models: DeepLabV2 backbones, the ACCEL wrapper, flow warping, flow providers, checkpoint I/O."""

from .accel import AccelSegmenter, ScoreFusion, build_model
from .config import CONFIGS, ModelConfig, Normalization, get_config
from .warp import resize_flow, warp

__all__ = ["CONFIGS", "AccelSegmenter", "ModelConfig", "Normalization", "ScoreFusion", "build_model",
           "get_config", "resize_flow", "warp"]
