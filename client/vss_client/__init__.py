"""vss-client: a small client for the vss segmentation server (httpx, websockets, numpy, Pillow; no torch).

    from vss_client import Client

    with Client("http://127.0.0.1:8000") as vss:
        result = vss.segment("drive.mp4", format="zip", progress=True)
        for labels in result.label_maps(): ...
        for r in vss.stream(frames):          # frames: RGB arrays, JPEG/PNG bytes or PIL images
            print(r.index, r.model_version, r.labels.shape)
        job = vss.adapt("tent", steps=100, progress=True)
        vss.models.activate(job["parent"])    # roll back

``AsyncClient`` has the same methods as coroutines (``stream`` is an async iterator).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .aio import AsyncClient, AsyncFrameStream, AsyncModels  # noqa: E402
from .errors import APIError, JobFailed, ServerUnreachable, StreamError, TimedOut, VSSError  # noqa: E402
from .frames import Frame, encode_frame, raw_frame  # noqa: E402
from .labels import colorize, decode_labels, decode_png, decode_rle, encode_rle, overlay, resize_labels  # noqa: E402
from .progress import tqdm_progress  # noqa: E402
from .sync import Client, FrameStream, Models  # noqa: E402
from .types import AdaptJob, ModelInfo, SegmentJob, SegmentResult, ServingModel, StreamResult  # noqa: E402

__all__ = [
    "APIError", "AdaptJob", "AsyncClient", "AsyncFrameStream", "AsyncModels", "Client", "Frame", "FrameStream",
    "JobFailed", "ModelInfo", "Models", "SegmentJob", "SegmentResult", "ServerUnreachable", "ServingModel",
    "StreamError", "StreamResult", "TimedOut", "VSSError", "__version__", "colorize", "decode_labels", "decode_png",
    "decode_rle", "encode_frame", "encode_rle", "overlay", "raw_frame", "resize_labels", "tqdm_progress",
]
