"""Scene sampling for the synthetic world: what moves where, and the questions it answers.

A scene is 1-3 objects (shape, colour, size, straight-line motion) over a smooth
random texture, with an optional slow camera drift. Every object has the same
luminance whatever its colour (`OBJECT_LUMA`): colour shows in the RGB frames but
cannot reach the events, which see luminance only, as a real event sensor would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OBJECT_LUMA = 0.5
BACKGROUND_LUMA_RANGE = (0.08, 0.28)
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def _isoluminant(hue: tuple[float, float, float]) -> tuple[float, float, float]:
    """The most saturated colour along `hue` whose BT.601 luma is exactly OBJECT_LUMA."""
    hue_array = np.asarray(hue, dtype=np.float64)
    chroma = hue_array - LUMA_WEIGHTS @ hue_array  # luma of chroma is 0
    with np.errstate(divide="ignore"):
        upper = np.where(chroma > 0, (1 - OBJECT_LUMA) / chroma, np.inf)
        lower = np.where(chroma < 0, -OBJECT_LUMA / chroma, np.inf)
    saturation = float(min(upper.min(), lower.min()))
    return tuple(float(v) for v in np.clip(OBJECT_LUMA + saturation * chroma, 0.0, 1.0))


COLOURS = {
    name: _isoluminant(hue)
    for name, hue in {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}.items()
}


@dataclass(frozen=True)
class MovingObject:
    shape: str
    colour: str
    radius_px: float
    x0_px: float  # centre at t = 0
    y0_px: float
    direction: str
    speed_px_s: float

    def centre_at(self, t_s: float) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.x0_px + dx * self.speed_px_s * t_s, self.y0_px + dy * self.speed_px_s * t_s


@dataclass(frozen=True)
class Scene:
    objects: tuple[MovingObject, ...]  # drawn in this order; the first is the largest
    camera_velocity_px_s: tuple[float, float]
    texture_seed: int

    def to_dict(self) -> dict:
        return asdict(self)


def sample_scene(rng: np.random.Generator, settings) -> Scene:
    """Draw one scene whose objects stay fully inside the frame for the whole recording.

    The largest object is at least 25% larger than any other, so "the largest object"
    names exactly one.
    """
    n_objects = int(rng.integers(1, settings.max_objects + 1))
    low, high = settings.radius_px
    radii = sorted(rng.uniform(low, high, size=n_objects), reverse=True)
    for i in range(1, n_objects):
        radii[i] = min(radii[i], radii[0] / 1.25)
    objects = []
    for radius in radii:
        direction = str(rng.choice(list(DIRECTIONS)))
        speed = float(rng.uniform(*settings.speed_px_s))
        travel = speed * settings.duration_s
        dx, dy = DIRECTIONS[direction]
        margin = radius + 2
        x0 = _start_position(rng, settings.width, margin, dx * travel)
        y0 = _start_position(rng, settings.height, margin, dy * travel)
        objects.append(
            MovingObject(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                radius_px=float(radius),
                x0_px=x0,
                y0_px=y0,
                direction=direction,
                speed_px_s=speed,
            )
        )
    camera = (0.0, 0.0)
    if rng.random() < settings.camera_motion_fraction:
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.5, 1.0) * settings.camera_speed_px_s
        camera = (float(speed * np.cos(angle)), float(speed * np.sin(angle)))
    return Scene(tuple(objects), camera, int(rng.integers(2**31)))


def _start_position(rng: np.random.Generator, extent: int, margin: float, travel: float) -> float:
    """A start coordinate such that start and start + travel both keep `margin` from the edges."""
    low = margin - min(travel, 0.0)
    high = extent - margin - max(travel, 0.0)
    if high < low:
        raise ValueError(
            f"an object of margin {margin:.1f} px travelling {abs(travel):.1f} px does not fit in {extent} px: "
            "lower speed_px_s, radius_px or duration_s"
        )
    return float(rng.uniform(low, high))


QUESTION_TYPES = ("shape", "colour", "direction", "count", "describe")
QUESTIONS = {
    "shape": "What shape is the largest object?",
    "colour": "What colour is the largest object?",
    "direction": "Which way is the largest object moving?",
    "count": "How many objects are moving?",
    "describe": "Describe the scene.",
}


# "describe" answers: several sentences from the ground truth at the clip's middle time. An object
# crossing more than this share of the frame's width per second moves "quickly" (the demo's 8-20 px/s
# on 64 px split at their middle), a camera drift is named by its dominant axis.
QUICK_FRAME_WIDTHS_PER_S = 0.22
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")
DESCRIBE_WORDS = ("There is are object objects The large small is in the of frame and moves quickly slowly "
                  "camera still drifts .")


def answer(scene: Scene, question_type: str, t_s: float, height: int, width: int) -> str:
    """The ground-truth answer, in the fixed wording the toy models learn; `describe` says where the
    objects are at `t_s` (seconds into the recording) in a frame of height x width pixels."""
    largest = scene.objects[0]
    if question_type == "shape":
        return largest.shape
    if question_type == "colour":
        return largest.colour
    if question_type == "direction":
        return largest.direction
    if question_type == "count":
        return NUMBER_WORDS[len(scene.objects)]
    if question_type == "describe":
        return describe(scene, t_s, height, width)
    raise ValueError(f"unknown question type {question_type!r}; known: {QUESTION_TYPES}")


def describe(scene: Scene, t_s: float, height: int, width: int) -> str:
    """How many objects; each one's size, colour, shape, place in a 3 x 3 grid, direction and pace; the camera."""
    n = len(scene.objects)
    sentences = ["There is one object." if n == 1 else f"There are {NUMBER_WORDS[n]} objects."]
    for index, obj in enumerate(scene.objects):
        x, y = obj.centre_at(t_s)
        row, column = ROWS[min(2, max(0, int(3 * y / height)))], COLUMNS[min(2, max(0, int(3 * x / width)))]
        pace = "quickly" if obj.speed_px_s > QUICK_FRAME_WIDTHS_PER_S * width else "slowly"
        size = "large" if index == 0 else "small"
        sentences.append(f"The {size} {obj.colour} {obj.shape} is in the {row} {column} of the frame and moves "
                         f"{obj.direction} {pace}.")  # fmt: skip
    vx, vy = scene.camera_velocity_px_s
    if vx == 0.0 and vy == 0.0:
        sentences.append("The camera is still.")
    else:
        axis = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
        sentences.append(f"The camera drifts {axis}.")
    return " ".join(sentences)


def scene_from_dict(values: dict) -> Scene:
    """Inverse of `Scene.to_dict` (reads annotations.json)."""
    return Scene(
        objects=tuple(MovingObject(**obj) for obj in values["objects"]),
        camera_velocity_px_s=tuple(values["camera_velocity_px_s"]),
        texture_seed=int(values["texture_seed"]),
    )
