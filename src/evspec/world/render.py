"""Rendering of a scene at any time: a luminance image for the event simulator, RGB for frames.

Both come from the same anti-aliased coverage maps (signed distance, 1-pixel ramp),
so the RGB frame's BT.601 luma equals the luminance image, and objects move with
sub-pixel precision between the simulator's internal frames.
"""

from __future__ import annotations

import numpy as np

from evspec.world.scene import BACKGROUND_LUMA_RANGE, COLOURS, OBJECT_LUMA, MovingObject, Scene

SQRT_HALF = np.sqrt(0.5)


class SceneRenderer:
    """Renders one scene on a fixed `height` x `width` sensor."""

    def __init__(self, scene: Scene, height: int, width: int, duration_s: float) -> None:
        self.scene = scene
        self.height, self.width = height, width
        vx, vy = scene.camera_velocity_px_s
        # Texture large enough that the camera's drift never runs off it.
        self.margin_x = int(np.ceil(abs(vx) * duration_s)) + 2
        self.margin_y = int(np.ceil(abs(vy) * duration_s)) + 2
        self.texture = _smooth_texture(
            np.random.default_rng(scene.texture_seed), height + 2 * self.margin_y, width + 2 * self.margin_x
        )
        self.rows, self.cols = np.mgrid[0:height, 0:width].astype(np.float32)

    def background(self, t_s: float) -> np.ndarray:
        """Background luminance float32 [H, W]; bilinear sampling follows the camera drift."""
        vx, vy = self.scene.camera_velocity_px_s
        x_offset = self.margin_x + vx * t_s
        y_offset = self.margin_y + vy * t_s
        x0, y0 = int(np.floor(x_offset)), int(np.floor(y_offset))
        fx, fy = np.float32(x_offset - x0), np.float32(y_offset - y0)
        window = self.texture[y0 : y0 + self.height + 1, x0 : x0 + self.width + 1]
        top = window[:-1, :-1] * (1 - fx) + window[:-1, 1:] * fx
        bottom = window[1:, :-1] * (1 - fx) + window[1:, 1:] * fx
        return top * (1 - fy) + bottom * fy

    def luminance(self, t_s: float) -> np.ndarray:
        """float32 [H, W] in (0, 1]: what the event sensor sees (no colour)."""
        image = self.background(t_s)
        for obj in self.scene.objects:
            box, coverage = self._coverage(obj, t_s)
            patch = image[box]
            patch += (OBJECT_LUMA - patch) * coverage
        return image

    def rgb(self, t_s: float) -> np.ndarray:
        """uint8 [H, W, 3]: what the frame camera sees."""
        image = np.repeat(self.background(t_s)[:, :, None], 3, axis=2)
        for obj in self.scene.objects:
            box, coverage = self._coverage(obj, t_s)
            patch = image[box]
            patch += (np.asarray(COLOURS[obj.colour], np.float32) - patch) * coverage[:, :, None]
        return np.round(image * 255).astype(np.uint8)

    def _coverage(self, obj: MovingObject, t_s: float) -> tuple[tuple[slice, slice], np.ndarray]:
        """Fractional coverage of `obj` inside its bounding box (only that box is computed)."""
        cx, cy = obj.centre_at(t_s)
        reach = obj.radius_px * 1.5 + 2
        r0, r1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, self.height)
        c0, c1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, self.width)
        box = (slice(r0, r1), slice(c0, c1))
        dx = self.cols[box] - np.float32(cx)
        dy = self.rows[box] - np.float32(cy)
        distance = _signed_distance(obj.shape, dx, dy, np.float32(obj.radius_px))
        return box, np.clip(np.float32(0.5) - distance, 0, 1)


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: np.float32) -> np.ndarray:
    """Approximate signed distance to the shape's edge (negative inside); exact sign everywhere."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - radius * np.float32(0.85)
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) * np.float32(SQRT_HALF) - radius * np.float32(0.85)
    if shape == "triangle":  # pointing up; y grows downwards
        inradius = radius * np.float32(0.55)
        base = dy - inradius
        left = -0.866 * dx - 0.5 * dy - inradius
        right = 0.866 * dx - 0.5 * dy - inradius
        return np.maximum(base, np.maximum(left, right)).astype(np.float32)
    raise ValueError(f"unknown shape {shape!r}")


def _smooth_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-pass random texture (Gaussian spectrum, ~6 px blobs) scaled to BACKGROUND_LUMA_RANGE."""
    noise = rng.standard_normal((height, width))
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    smooth = np.fft.irfft2(np.fft.rfft2(noise) * np.exp(-((fx**2 + fy**2) * (2 * np.pi * 3.0) ** 2) / 2), s=(height, width))
    smooth = (smooth - smooth.min()) / max(smooth.max() - smooth.min(), 1e-9)
    low, high = BACKGROUND_LUMA_RANGE
    return (low + (high - low) * smooth).astype(np.float32)
