"""Video data: frame folders, video files and a synthetic motion dataset; TSN sampling; transforms."""

from .build import build_source, eval_dataset, num_classes, train_dataset
from .dataset import Batch, EvalClips, Skipped, TrainClips, collate
from .frames import FrameFolderSource
from .records import BadSampleError, VideoRecord, read_list_file
from .sampling import eval_indices, segment_indices, train_indices
from .synthetic import SyntheticMotion
from .transforms import EvalTransform, TrainTransform
from .video import VideoFileSource

__all__ = [
    "BadSampleError", "Batch", "EvalClips", "EvalTransform", "FrameFolderSource", "Skipped",
    "SyntheticMotion", "TrainClips", "TrainTransform", "VideoFileSource", "VideoRecord",
    "build_source", "collate", "eval_dataset", "eval_indices", "num_classes", "read_list_file",
    "segment_indices", "train_dataset", "train_indices",
]
