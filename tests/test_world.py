"""The synthetic world: deterministic, in the DSEC layout, with colour kept out of the events."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
from conftest import TINY_WORLD
from PIL import Image

from evspec.events import read_dsec_window
from evspec.world.esim import LOG_EPS, EventSimulator, SensorParams
from evspec.world.generate import T_OFFSET_US, generate_world, write_sequence
from evspec.world.render import SceneRenderer
from evspec.world.scene import COLOURS, LUMA_WEIGHTS, OBJECT_LUMA, sample_scene


def _digest(directory):
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_same_seed_gives_identical_bytes_for_any_worker_count(tiny_world, tmp_path):
    generate_world(tmp_path / "again", TINY_WORLD, workers=2)
    assert _digest(tmp_path / "again") == _digest(tiny_world)


def test_dsec_layout(tiny_world):
    manifest = json.loads((tiny_world / "world.json").read_text())
    assert manifest["sequences"] == ["seq-000", "seq-001", "seq-002", "seq-003"]
    sequence = tiny_world / "seq-001"
    stamps = np.loadtxt(sequence / "images" / "timestamps.txt", dtype=np.int64)
    frames = sorted((sequence / "images" / "left" / "rectified").glob("*.png"))
    assert len(frames) == len(stamps) == 21  # 1 s at 20 Hz, both ends included
    assert np.all(np.diff(stamps) == 50_000) and stamps[0] == T_OFFSET_US
    assert Image.open(frames[0]).size == (64, 48)
    events = read_dsec_window(sequence / "events" / "left" / "events.h5", stamps[0], stamps[-1])
    assert len(events) > 1000 and {0, 1} <= set(np.unique(events.p))


def test_objects_are_isoluminant():
    for colour in COLOURS.values():
        assert abs(float(LUMA_WEIGHTS @ np.asarray(colour)) - OBJECT_LUMA) < 1e-9
    assert len(set(COLOURS.values())) == len(COLOURS)


def test_colour_shows_in_frames_but_not_in_events():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng, TINY_WORLD)
    recoloured = dataclasses.replace(
        scene, objects=tuple(dataclasses.replace(obj, colour="green" if obj.colour != "green" else "red")
                             for obj in scene.objects))  # fmt: skip
    renders = [SceneRenderer(s, 48, 64, 1.0) for s in (scene, recoloured)]
    assert not np.array_equal(renders[0].rgb(0.5), renders[1].rgb(0.5))
    event_streams = []
    for renderer in renders:
        simulator = EventSimulator(renderer.luminance(0.0), SensorParams(), np.random.default_rng(9))
        for step in range(1, 101):
            simulator.step(renderer.luminance(step * 0.002), (step - 1) * 2000, step * 2000)
        event_streams.append(simulator.events())
    a, b = event_streams
    assert len(a) > 100
    for name in "xytp":
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_frame_luma_matches_event_luminance():
    scene = sample_scene(np.random.default_rng(4), TINY_WORLD)
    renderer = SceneRenderer(scene, 48, 64, 1.0)
    luma = renderer.rgb(0.3).astype(np.float64) @ LUMA_WEIGHTS / 255
    np.testing.assert_allclose(luma, renderer.luminance(0.3), atol=2.5 / 255)


def test_brightening_pixel_fires_on_events_with_interpolated_times():
    params = SensorParams(pos_thres=0.2, neg_thres=0.2, sigma_thres=0.0, refractory_period_s=0.0, shot_noise_rate_hz=0)
    dark = np.full((1, 1), 0.1, np.float32)
    simulator = EventSimulator(dark, params, np.random.default_rng(0))
    bright = dark * np.exp(0.65)  # log change ~0.645 (after LOG_EPS) -> ON crossings at 0.2, 0.4, 0.6
    simulator.step(bright, 0, 1000)
    events = simulator.events()
    change = np.log(bright[0, 0] + LOG_EPS) - np.log(dark[0, 0] + LOG_EPS)
    assert list(events.p) == [1, 1, 1]
    np.testing.assert_allclose(events.t, np.round(np.array([0.2, 0.4, 0.6]) / change * 1000), atol=1)


def test_refractory_period_drops_events():
    params = SensorParams(sigma_thres=0.0, refractory_period_s=0.001, shot_noise_rate_hz=0)
    simulator = EventSimulator(np.full((1, 1), 0.1, np.float32), params, np.random.default_rng(0))
    simulator.step(np.full((1, 1), 0.1 * np.exp(0.65), np.float32), 0, 1000)
    assert len(simulator.events()) == 1


def test_sequence_written_twice_is_identical(tmp_path):
    write_sequence(tmp_path / "a", TINY_WORLD, np.random.default_rng([1, 2]))
    write_sequence(tmp_path / "b", TINY_WORLD, np.random.default_rng([1, 2]))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_describe_answers_place_each_object_at_the_clip_time_with_its_pace_and_the_camera():
    from evspec.world.scene import MovingObject, Scene, describe

    fast = MovingObject("circle", "red", 8.0, 5.0, 30.0, "right", 40.0)  # crosses 64 px in 1.6 s
    slow = MovingObject("square", "blue", 5.0, 32.0, 60.0, "up", 5.0)
    scene = Scene((fast, slow), (0.0, -3.0), 0)
    early, late = describe(scene, 0.0, 64, 64), describe(scene, 1.2, 64, 64)
    assert early.startswith("There are two objects. The large red circle is in the middle left of the frame and "
                            "moves right quickly. The small blue square is in the bottom centre")  # fmt: skip
    assert "red circle is in the middle right" in late and late.endswith("moves up slowly. The camera drifts up.")
    assert describe(Scene((slow,), (0.0, 0.0), 0), 0.0, 64, 64).endswith("The camera is still.")
