"""Pinhole camera, ego trajectory and projection.

World frame: x to the right of the road, y up, z along the road (forward). Camera frame: x right, y up,
z along the optical axis. Image coordinates: x to the right, y down, pixel centres at integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FPS = 15.0
NEAR = 0.05  # metres; camera-space depth below which a point counts as behind the camera


@dataclass(frozen=True)
class Intrinsics:
    height: int
    width: int
    focal: float
    cx: float
    cy: float

    @classmethod
    def for_size(cls, height: int, width: int, hfov_deg: float = 80.0) -> Intrinsics:
        focal = 0.5 * width / np.tan(np.radians(hfov_deg) / 2)
        return cls(height, width, float(focal), (width - 1) / 2, (height - 1) / 2)


@dataclass(frozen=True)
class Trajectory:
    """Camera poses for frames -1 .. T-1 (row i is frame i-1): frame -1 gives frame 0 its motion blur."""

    origins: np.ndarray  # (T+1, 3) float64 world positions
    rotations: np.ndarray  # (T+1, 3, 3) float64 camera-to-world rotations
    dt: float = 1.0 / FPS

    def pose(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Origin and camera-to-world rotation of frame t (t >= -1)."""
        return self.origins[t + 1], self.rotations[t + 1]

    @property
    def frames(self) -> int:
        return len(self.origins) - 1


def rotation(yaw: np.ndarray | float, pitch: np.ndarray | float) -> np.ndarray:
    """Camera-to-world rotation(s): yaw turns the optical axis towards +x, positive pitch looks up."""
    yaw, pitch = np.asarray(yaw, float), np.asarray(pitch, float)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    zero = np.zeros_like(yaw)
    # columns are the camera axes in world coordinates: R = R_yaw @ R_pitch
    right = np.stack([cy, zero, -sy], -1)
    up = np.stack([-sy * sp, cp + zero, -cy * sp], -1)
    fwd = np.stack([sy * cp, sp + zero, cy * cp], -1)
    return np.stack([right, up, fwd], -1)


def static_trajectory(frames: int, origin: tuple[float, float, float] = (1.75, 1.5, 0.0),
                      yaw: float = 0.0, pitch: float = -0.03) -> Trajectory:
    """A camera that does not move (useful to isolate object motion)."""
    origins = np.tile(np.asarray(origin, float), (frames + 1, 1))
    rotations = np.tile(rotation(yaw, pitch), (frames + 1, 1, 1))
    return Trajectory(origins, rotations)


def ego_trajectory(rng: np.random.Generator, frames: int, lane_x: float, speed: tuple[float, float]) -> Trajectory:
    """Forward driving with a per-clip speed, lateral weaving (yaw follows the heading), pitch and bob."""
    dt = 1.0 / FPS
    t = (np.arange(frames + 1) - 1) * dt
    v0 = rng.uniform(*speed)
    v = v0 * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.1, 0.3) * t + rng.uniform(0, 2 * np.pi)))
    z = np.concatenate([[0.0], np.cumsum(v[1:] * dt)])
    weave_amp, weave_w = rng.uniform(0.2, 0.7), 2 * np.pi / rng.uniform(3.0, 8.0)
    phase = rng.uniform(0, 2 * np.pi)
    x = lane_x - weave_amp * np.cos(weave_w * t + phase)
    yaw = np.arctan2(weave_amp * weave_w * np.sin(weave_w * t + phase), v)
    bob_w, bob_phase = 2 * np.pi * rng.uniform(1.0, 2.0), rng.uniform(0, 2 * np.pi)
    pitch = np.radians(-rng.uniform(1.0, 4.0) + 0.5 * np.sin(bob_w * t + bob_phase))
    y = rng.uniform(1.35, 1.65) + 0.03 * np.sin(bob_w * t + bob_phase + 1.0)
    return Trajectory(np.stack([x, y, z], -1), rotation(yaw, pitch), dt)


def camera_rays(intr: Intrinsics) -> np.ndarray:
    """(H, W, 3) float32 unit viewing directions of the pixel centres, in the camera frame."""
    xs = (np.arange(intr.width, dtype=np.float64) - intr.cx) / intr.focal
    ys = -(np.arange(intr.height, dtype=np.float64) - intr.cy) / intr.focal
    rays = np.empty((intr.height, intr.width, 3))
    rays[..., 0], rays[..., 1], rays[..., 2] = xs[None, :], ys[:, None], 1.0
    return (rays / np.linalg.norm(rays, axis=-1, keepdims=True)).astype(np.float32)


def to_camera(rel: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Camera coordinates of world offsets `rel` (..., 3) from the camera origin.

    einsum rather than matmul: BLAS may spread a tiny product over threads, which on a busy machine
    costs far more than the product itself.
    """
    return np.einsum("...j,jk->...k", rel, rot.astype(rel.dtype))


def project(cam: np.ndarray, intr: Intrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of camera-frame points (..., 3); depths are clamped to `NEAR`."""
    inv = 1.0 / np.maximum(cam[..., 2], NEAR)
    return intr.cx + intr.focal * cam[..., 0] * inv, intr.cy - intr.focal * cam[..., 1] * inv
