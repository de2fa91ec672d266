"""One budget per request: bytes, pixels, frames and seconds of compute, checked before work starts.

Every route and websocket message asks ``Budget`` (built from the settings) before it decodes,
allocates or computes: an image a request decodes or produces (an uploaded frame, a stream frame, a
label map of any requested ``size``, an overlay frame) fits ``max_pixels``; the network input (the
upload ``size`` override) fits ``max_inference_pixels``; bodies fit ``max_upload_bytes``, websocket
messages ``ws_max_message_bytes``; videos fit ``max_frames`` / ``max_duration_s``; adaptation jobs
fit ``adapt_max_steps`` / ``adapt_max_time_s``. The defaults fit a 2-core, 4 GiB container: no one
request raises the server's RSS by more than 512 MiB (``tests/service/test_budget.py`` measures it).

``BudgetExceeded`` names the limit, the value asked for and the setting that raises it; callers turn
it into their protocol's answer (HTTP 413/422, websocket close 1008).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .settings import Settings


MAX_JSON_BODY_BYTES = 1 << 20  # a request body that is not a multipart upload (JSON: POST /v1/adapt)


class BudgetExceeded(ValueError):
    """A request asks for more than its budget; ``code`` is the machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Budget:
    max_pixels: int  # any image decoded or produced: input frames, label maps, overlay frames
    max_inference_pixels: int  # the network input of one frame
    max_width: int  # video sides (the long and the short side are bounded like landscape ones)
    max_height: int
    max_upload_bytes: int
    max_message_bytes: int  # one websocket message
    max_frames: int
    max_duration_s: float
    max_adapt_steps: int
    max_adapt_seconds: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Budget:
        return cls(max_pixels=min(settings.max_pixels, settings.max_width * settings.max_height),
                   max_inference_pixels=settings.max_inference_pixels, max_width=settings.max_width,
                   max_height=settings.max_height, max_upload_bytes=settings.max_upload_bytes,
                   max_message_bytes=settings.ws_max_message_bytes, max_frames=settings.max_frames,
                   max_duration_s=settings.max_duration_s, max_adapt_steps=settings.adapt_max_steps,
                   max_adapt_seconds=settings.adapt_max_time_s)

    def check_pixels(self, height: int, width: int, what: str) -> None:
        """An image of ``height`` x ``width`` that a request decodes or produces (``what`` names it)."""
        if height * width > self.max_pixels:
            raise BudgetExceeded("too_many_pixels", f"{what} of {width}x{height} = {height * width} pixels is over "
                                                    f"the limit of {self.max_pixels} pixels (VSS_MAX_PIXELS)")

    def check_inference(self, height: int, width: int) -> None:
        """The network input size of one frame."""
        if height * width > self.max_inference_pixels:
            raise BudgetExceeded("too_many_pixels", f"an inference size of {width}x{height} = {height * width} "
                                                    f"pixels is over the limit of {self.max_inference_pixels} "
                                                    "pixels (VSS_MAX_INFERENCE_PIXELS)")

    def check_message(self, size: int) -> None:
        if size > self.max_message_bytes:
            raise BudgetExceeded("message_too_big", f"a message of {size} bytes is over the limit of "
                                                    f"{self.max_message_bytes} bytes (VSS_WS_MAX_MESSAGE_BYTES)")

    def check_adapt(self, steps: int, time_budget_s: float | None) -> None:
        if steps > self.max_adapt_steps:
            raise BudgetExceeded("invalid_request", f"steps={steps} is over the limit of {self.max_adapt_steps} "
                                                    "(VSS_ADAPT_MAX_STEPS)")
        if time_budget_s is not None and time_budget_s > self.max_adapt_seconds:
            raise BudgetExceeded("invalid_request", f"time_budget_s={time_budget_s:g} is over the limit of "
                                                    f"{self.max_adapt_seconds:g} s (VSS_ADAPT_MAX_TIME_S)")


def budget(settings: Settings) -> Budget:
    """The request budget of a server with ``settings``."""
    return Budget.from_settings(settings)


def document_limits(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write the limits that come from settings into an OpenAPI ``schema`` (in place), so it states what the
    routes enforce: the largest ``max_frames`` of an upload, ``steps`` and ``time_budget_s`` of a job."""
    limits = budget(settings)
    for param in schema.get("paths", {}).get("/v1/segment", {}).get("post", {}).get("parameters", []):
        if param.get("name") == "max_frames":
            _number_schema(param.get("schema", {}))["maximum"] = limits.max_frames
    request = schema.get("components", {}).get("schemas", {}).get("AdaptRequest", {}).get("properties", {})
    if "steps" in request:
        request["steps"]["maximum"] = limits.max_adapt_steps
    if "time_budget_s" in request:
        _number_schema(request["time_budget_s"])["maximum"] = limits.max_adapt_seconds
    return schema


def _number_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """The numeric branch of an optional property (``anyOf: [{type: number}, {type: null}]``)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") in ("integer", "number"):
            return branch
    return prop
