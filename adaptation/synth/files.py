"""A generated clip on disk: palette label PNGs ``000000.png ...`` and, optionally, flow files
``000000.npy ...``, published together with the clip's video or not at all.

Flow files are float32 (H, W, 2) backward flow t -> t-1 in pixels (frame 0: zeros), or in the DA-VSN
format (``flow_format="davsn"``): int16 flow x 10 at half resolution (``models.flow.encode_davsn_flow``).
The video encoder is the caller's (``write_video``): this package does not depend on the service.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from models.atomic import replacing_dir
from models.classes import label_png
from models.flow import encode_davsn_flow

from .core import PALETTE, Clip

FLOW_FORMATS = ("npy", "davsn")


def flow_file(flow: np.ndarray, flow_format: str = "npy") -> bytes:
    """The ``.npy`` bytes of one (H, W, 2) float32 backward flow field in ``flow_format``."""
    if flow_format not in FLOW_FORMATS:
        raise ValueError(f"unknown flow format {flow_format!r}; choose one of {', '.join(FLOW_FORMATS)}")
    data = encode_davsn_flow(flow) if flow_format == "davsn" else flow.astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, data, allow_pickle=False)
    return buf.getvalue()


def write_clip(clip: Clip, labels_dir: Path, flow_dir: Path | None, write_video: Callable[[np.ndarray], None],
               flow_format: str = "npy") -> None:
    """Write ``clip``'s label maps (and flow) into staging directories, call ``write_video(clip.frames)``
    (which must write the video atomically), then rename the directories into place. Refuses (before
    writing anything) a target directory that exists and is not empty: FileExistsError."""
    for d in (labels_dir, flow_dir):
        if d is not None and d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise FileExistsError(f"refusing to overwrite non-empty {d}")
    if flow_format not in FLOW_FORMATS:
        raise ValueError(f"unknown flow format {flow_format!r}; choose one of {', '.join(FLOW_FORMATS)}")
    with ExitStack() as stack:  # on success the flow directory is renamed into place, then the labels'
        labels_tmp = stack.enter_context(replacing_dir(labels_dir))
        for i, labels in enumerate(clip.labels):
            (labels_tmp / f"{i:06d}.png").write_bytes(label_png(labels, PALETTE, compress_level=6))
        if flow_dir is not None:
            flow_tmp = stack.enter_context(replacing_dir(flow_dir))
            for i, flow in enumerate(clip.flow):
                (flow_tmp / f"{i:06d}.npy").write_bytes(flow_file(flow, flow_format))
        write_video(clip.frames)
