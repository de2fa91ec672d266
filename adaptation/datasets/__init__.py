"""Video datasets for offline UDA (Cityscapes-Seq, VIPER, SYNTHIA-Seq, the synthetic benchmark)."""

from .base import IGNORE_INDEX, DatasetError, VideoFrameDataset
from .spec import (DATASETS, LABEL_SPACE, DataSpec, accepted_options, build_dataset, classes_of, label_space_of,
                   parse_spec)

__all__ = ["DATASETS", "IGNORE_INDEX", "LABEL_SPACE", "DataSpec", "DatasetError", "VideoFrameDataset",
           "accepted_options", "build_dataset", "classes_of", "label_space_of", "parse_spec"]
