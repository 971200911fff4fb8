"""rayworld/CARLA-v0 against a test double of the CARLA client (tests/carla_double.py).

The double replaces `carla.Client` and everything reached through it; the env gets it through
its `client_factory` kwarg. The unreachable-server tests also use the real `carla.Client` on a
port where nothing listens. The live test needs a real server: CARLA_HOST (and CARLA_PORT).
"""

import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import carla
import carla_double as double
import gymnasium as gym
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import free_ports
from gymnasium.utils.env_checker import check_env
from PIL import Image

from rayworld.collect import Collector
from rayworld.config import load_config
from rayworld.data import Manifest, obs_array, open_shard
from rayworld.envs import make_env
from rayworld.envs.carla import CarlaEnv, CarlaServerError
from rayworld.envs.registry import EnvArgumentError, SimulatorError

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = f"{Path(double.__file__).resolve()}:FakeClient"  # loadable in Ray workers too
PRESET = ROOT / "tune_configs" / "carla.yaml"
GAS, BRAKE = np.array([0, 1, 0], np.float32), np.array([0, 0, 1], np.float32)


@pytest.fixture(autouse=True)
def servers():
    double.SERVERS.clear()
    yield double.SERVERS
    double.SERVERS.clear()


def make(**kwargs) -> CarlaEnv:
    return CarlaEnv(**{"client_factory": double.FakeClient, "timeout_s": 0.3, **kwargs})


def srv(port=2000) -> double.FakeServer:
    return double.SERVERS[("127.0.0.1", port)]


def ours(server):
    return [a for a in server.world._actors.values() if a.attributes.get("role_name") == "rayworld"]


def seed_at(env, spawn_points) -> int:
    """A reset seed whose spawn point is one of `spawn_points` (the env is left reset on it)."""
    for seed in range(100):
        if env.reset(seed=seed)[1]["spawn_point"] in spawn_points:
            return seed
    raise AssertionError(f"no seed spawns at {spawn_points}")


# ---------------------------------------------------------------- the double is the real API


FAKES = {double.FakeClient: carla.Client, double.FakeWorld: carla.World, double.FakeMap: carla.Map,
         double.FakeBlueprintLibrary: carla.BlueprintLibrary, double.FakeBlueprint: carla.ActorBlueprint,
         double.FakeActor: carla.Actor, double.FakeVehicle: carla.Vehicle, double.FakeSensor: carla.Sensor}
DATA = {carla.Image: ["frame", "width", "height", "fov", "raw_data"],
        carla.CollisionEvent: ["frame", "actor", "other_actor", "normal_impulse"],
        carla.LaneInvasionEvent: ["frame", "actor", "crossed_lane_markings"],
        carla.Waypoint: ["transform", "lane_type", "lane_id", "road_id", "lane_width", "is_junction"],
        carla.Actor: ["id", "type_id", "attributes", "parent", "is_alive"], carla.Map: ["name"]}


def _real_signatures(method) -> list[list[str]]:
    """Parameter names (without self) of each overload in a Boost.Python docstring, whose
    lines read like 'tick( (World)arg1 [, (float)seconds=0.0]) -> int :'."""
    name = method.__name__
    return [re.findall(r"\(\w+\)(\w+)", line)[1:] for line in method.__doc__.splitlines()
            if line.startswith(f"{name}(")]


def _matches(params, real_params) -> bool:
    return len(params) <= len(real_params) and all(  # argN: positional only, any name will do
        r in (p, f"arg{i + 2}") for i, (p, r) in enumerate(zip(params, real_params)))


def test_double_has_the_real_names_and_parameters():
    for fake, real in FAKES.items():
        for name, member in vars(fake).items():
            if name.startswith("_"):
                continue
            assert hasattr(real, name), f"{fake.__name__}.{name} is not in {real.__name__}"
            if not callable(member) or name == "__init__":
                continue
            params = list(inspect.signature(member).parameters)[1:]
            real_signatures = _real_signatures(getattr(real, name))
            assert any(_matches(params, r) for r in real_signatures), \
                f"{fake.__name__}.{name}{params}: the real one takes {real_signatures}"
    assert ["host", "port", "worker_threads"] in _real_signatures(carla.Client.__init__)
    assert list(inspect.signature(double.FakeClient).parameters) == ["host", "port", "worker_threads"]
    for real, names in DATA.items():
        for name in names:
            assert hasattr(real, name), f"{real.__name__}.{name}"


# ---------------------------------------------------------------- the env


def test_check_env_and_gymnasium_make():
    env = make()
    check_env(env, skip_render_check=True)
    env.close()
    env = gym.make("rayworld/CARLA-v0", client_factory=DOUBLE, timeout_s=0.3, render_mode="rgb_array")
    obs, info = env.reset(seed=1)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8 and info["server"] == "127.0.0.1:2000"
    assert np.array_equal(env.render(), obs)
    env.close()


def test_reset_loads_the_town_goes_synchronous_and_spawns_by_seed():
    env = make(town="Town02", fixed_delta_seconds=0.04)
    _, info = env.reset(seed=5)
    server = srv()
    assert server.maps_loaded == ["Town02"] and server.world._map.name.endswith("Town02")
    applied = server.settings_applied[-1]
    assert applied.synchronous_mode and applied.fixed_delta_seconds == pytest.approx(0.04)
    cars = [a for a in ours(server) if a.type_id.startswith("vehicle.")]
    sensors = [a for a in ours(server) if a.type_id.startswith("sensor.")]
    assert len(cars) == 1 and cars[0].type_id == "vehicle.tesla.model3"
    assert sorted(s.type_id for s in sensors) == ["sensor.camera.rgb", "sensor.other.collision",
                                                  "sensor.other.lane_invasion"]
    assert all(s.parent is cars[0] and s.is_listening for s in sensors)
    camera = next(s for s in sensors if s.type_id == "sensor.camera.rgb")
    assert (camera.attributes["image_size_x"], camera.attributes["fov"]) == ("128", "90.0")
    point = server.world._map.get_spawn_points()[info["spawn_point"]].location
    assert cars[0].get_location().distance(point) < 0.01
    spawns = {s: env.reset(seed=s)[1]["spawn_point"] for s in range(8)}
    assert spawns[5] == info["spawn_point"] and len(set(spawns.values())) > 2
    assert len(ours(server)) == 4  # each reset replaced the car and its sensors
    env.close()


def _expected_obs(car, wall_x, size):
    bgra = np.frombuffer(double.render(car, wall_x, size, size), np.uint8).reshape(size, size, 4)
    rgb = Image.fromarray(np.ascontiguousarray(bgra[..., 2::-1]))
    return np.asarray(rgb.resize((64, 64), Image.Resampling.BOX))


@pytest.mark.parametrize("size", [64, 128])
def test_each_step_ticks_once_and_the_camera_image_is_the_obs(size):
    env = make(camera_size=size)
    obs, _ = env.reset(seed=2)
    server = srv()
    car = next(a for a in ours(server) if a.type_id.startswith("vehicle."))
    np.testing.assert_array_equal(obs, _expected_obs(car, server.wall_x, size))
    for _ in range(5):
        ticks = server.ticks
        obs, *_ = env.step(np.array([0.2, 1.0, 0.0], np.float32))
        assert server.ticks == ticks + 1
        np.testing.assert_array_equal(obs, _expected_obs(car, server.wall_x, size))
    assert car._control.throttle == 1.0 and car._control.steer == pytest.approx(0.2)
    env.close()


def test_driving_along_the_lane_earns_metres_driven():
    env = make()
    env.reset(seed=0)
    rewards, speeds = [], []
    for _ in range(40):
        _, r, term, trunc, info = env.step(GAS)
        assert not (term or trunc or info["off_road"] or info["lane_invasions"])
        rewards.append(r)
        speeds.append(info["speed_along_lane"])
    np.testing.assert_allclose(rewards, np.array(speeds) * 0.05)
    assert speeds[-1] > speeds[0] > 0 and sum(rewards) > 5  # metres
    for _ in range(60):
        _, r, *_ = env.step(BRAKE)
    assert r == 0.0
    env.close()


def _drive(env, steps=30):
    infos = [env.step(GAS)[1::3] for _ in range(steps)]
    return np.array([r for r, _ in infos]), np.array([i["speed"] for _, i in infos])


@pytest.mark.parametrize("points, lane_yaw", [((1, 3, 5, 7), 0.0), ((0, 2, 4, 6), 180.0)],
                         ids=["y>0 lane runs +x", "y<0 lane runs -x"])
def test_the_reward_follows_the_lane_so_the_wrong_way_scores_negative(points, lane_yaw):
    env = make()
    seed = seed_at(env, points)
    assert env._ego.get_transform().rotation.yaw == lane_yaw  # spawn points face their lane
    start = env._ego.get_location()
    along, speeds = _drive(env)
    driven = env._ego.get_location().distance(start)
    env.reset(seed=seed)  # the same spawn point, turned around
    turned = env._ego.get_transform()
    turned.rotation.yaw += 180.0
    env._ego.set_transform(turned)
    against, speeds_against = _drive(env)
    assert (along > 0).all() and along.sum() == pytest.approx(driven, rel=1e-3) and driven > 3
    np.testing.assert_allclose(speeds_against, speeds)
    np.testing.assert_allclose(against, -along)
    env.close()


def test_collision_ends_the_episode_with_the_penalty(servers):
    servers[("127.0.0.1", 2000)] = double.FakeServer(wall_x=40.0)  # 20 m ahead of points 1 and 2
    env = make(collision_penalty=50.0)
    seed_at(env, (1, 2))
    for step in range(1, 200):  # noqa: B007 (read after the loop)
        _, r, term, trunc, info = env.step(GAS)
        if term or trunc:
            break
    assert term and not trunc and info["collision"] and step < 100
    assert r == pytest.approx(info["speed_along_lane"] * 0.05 - 50.0)
    obs, _ = env.reset(seed=0)  # and the next episode starts cleanly
    assert obs.shape == (64, 64, 3) and len(ours(srv())) == 4
    env.close()


def test_lane_invasion_and_off_road_penalties():
    env = make(speed_weight=0.0, lane_invasion_penalty=2.0, off_road_penalty=10.0)
    env.reset(seed=0)
    seen = {"lane": 0, "off": 0}
    for _ in range(300):
        _, r, term, trunc, info = env.step(np.array([-1.0, 0.6, 0.0], np.float32))  # left, across
        expected = -2.0 * info["lane_invasions"] - 10.0 * 0.05 * info["off_road"] - 50.0 * term
        assert r == pytest.approx(expected)
        seen["lane"] += info["lane_invasions"]
        seen["off"] += info["off_road"]
        if term or trunc:
            break
    assert seen["lane"] >= 2 and seen["off"] >= 1
    env.close()


def test_time_limit_truncates():
    env = make(time_limit_s=1.0, fixed_delta_seconds=0.05)  # 20 steps
    env.reset(seed=0)
    ends = [env.step(BRAKE)[2:4] for _ in range(20)]
    assert ends[-1] == (False, True) and not any(t or u for t, u in ends[:-1])
    env.close()


def _assert_clean(server):
    assert ours(server) == []
    last = server.settings_applied[-1]
    assert not last.synchronous_mode  # the server no longer waits for our ticks


def test_close_destroys_what_it_spawned_and_restores_settings():
    env = make()
    env.close()  # never connected: nothing to do
    assert double.SERVERS == {}
    env.reset(seed=0)
    env.step(GAS)
    sensors = [a for a in ours(srv()) if a.type_id.startswith("sensor.")]
    env.close()
    _assert_clean(srv())
    assert not any(s.is_listening for s in sensors)
    applied, connects = len(srv().settings_applied), srv().connects
    env.close()  # twice: no server calls
    assert (len(srv().settings_applied), srv().connects) == (applied, connects)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(GAS)
    env.reset(seed=0)  # and a closed env connects again
    assert len(ours(srv())) == 4
    env.close()


def _wrap(obj, name, before):
    call = getattr(obj, name)

    def wrapped(*args):
        before()
        return call(*args)
    setattr(obj, name, wrapped)


def _fail():
    raise RuntimeError("the call failed")


@pytest.mark.parametrize("failing", ["settings", "sensor.other.collision", "vehicle.tesla.model3"])
def test_cleanup_restores_settings_first_and_goes_on_past_a_failing_call(failing):
    env = make()
    env.reset(seed=0)
    world, log = srv().world, []
    calls = {"settings": (world, "apply_settings")}
    calls.update((a.type_id, (a, "destroy")) for a in [*env._sensors, env._ego])
    _wrap(*calls[failing], _fail)
    for label, (obj, name) in calls.items():
        _wrap(obj, name, lambda label=label: log.append(label))
    env.close()
    assert log == ["settings", "sensor.camera.rgb", "sensor.other.collision",
                   "sensor.other.lane_invasion", "vehicle.tesla.model3"]
    assert world._settings.synchronous_mode == (failing == "settings")
    assert [a.type_id for a in ours(srv())] == ([] if failing == "settings" else [failing])
    assert env._client is None and env._ego is None and env._sensors == []


def test_close_on_a_dead_server_returns_within_about_a_second():
    env = make(timeout_s=20.0)
    env.reset(seed=0)
    srv().crash()
    start = time.perf_counter()
    env.close()  # the settings call waits out the 1 s, then the cleanup gives up
    assert 0.9 <= time.perf_counter() - start < 2.5
    assert srv().timeout_s <= 1.0 and env._client is None
    start = time.perf_counter()
    env.close()  # no server calls at all
    assert time.perf_counter() - start < 0.5


def test_a_failing_destroy_between_episodes_cleans_up_the_rest():
    env = make()
    env.reset(seed=0)
    camera = next(s for s in env._sensors if s.type_id == "sensor.camera.rgb")
    _wrap(camera, "destroy", _fail)
    with pytest.raises(CarlaServerError, match="the call failed"):
        env.reset(seed=1)
    assert [a.type_id for a in ours(srv())] == ["sensor.camera.rgb"]
    assert not srv().world._settings.synchronous_mode


def test_an_exception_in_step_cleans_up_and_the_env_reconnects():
    env = make()
    env.reset(seed=0)
    env._ego.get_velocity = lambda: 1 / 0  # any error inside a step
    with pytest.raises(ZeroDivisionError):
        env.step(GAS)
    _assert_clean(srv())
    obs, _ = env.reset(seed=0)  # a new connection
    assert obs.shape == (64, 64, 3) and len(ours(srv())) == 4
    env.close()


def test_leftovers_of_a_killed_client_are_removed_on_connect():
    killed = make()
    killed.reset(seed=0)  # never closed, as when Ray kills the actor
    env = make()
    env.reset(seed=0)
    assert len(ours(srv())) == 4 and all(a in ours(srv()) for a in [env._ego, *env._sensors])
    env.close()


def test_a_missing_camera_image_is_a_server_error_and_cleans_up():
    env = make(timeout_s=0.3)
    env.reset(seed=0)
    camera = next(s for s in env._sensors if s.type_id == "sensor.camera.rgb")
    camera._callback = lambda image: None  # the image of the next tick never arrives
    start = time.perf_counter()
    with pytest.raises(CarlaServerError, match=r"^CARLA server 127\.0\.0\.1:2000: no camera image "
                                               r"within 0\.3 s of frame \d+ \(env\.kwargs\.timeout_s\)$"):
        env.step(GAS)
    assert 0.3 <= time.perf_counter() - start < 0.3 + 1.0
    _assert_clean(srv())  # the server is alive: everything was cleaned up


def test_server_crash_mid_episode_raises_and_cleans_up_quickly(servers):
    servers[("127.0.0.1", 2000)] = double.FakeServer(crash_at_tick=10)
    env = make(timeout_s=0.3)
    env.reset(seed=0)
    start = time.perf_counter()
    with pytest.raises(CarlaServerError, match=r"^CARLA server 127\.0\.0\.1:2000 did not answer "
                                               r"within 0\.3 s") as e:
        for _ in range(20):
            env.step(GAS)
    assert isinstance(e.value, SimulatorError) and "\n" not in str(e.value)
    assert time.perf_counter() - start < 0.3 + 0.3 + 1.0  # the tick, one cleanup call, slack
    assert env._client is None and env._ego is None


@pytest.mark.parametrize("client", ["double", "real carla.Client"])
def test_unreachable_server_fails_within_the_timeout(servers, client):
    (port,) = free_ports()
    if client == "double":
        servers[("127.0.0.1", port)] = double.FakeServer(up=False, restart_after=None)
        env = make(port=port, timeout_s=0.5)
    else:
        env = CarlaEnv(port=port, timeout_s=0.5)  # the real client, nothing listening
    start = time.perf_counter()
    with pytest.raises(CarlaServerError) as e:
        env.reset(seed=0)
    elapsed = time.perf_counter() - start
    assert str(e.value) == (f"CARLA server 127.0.0.1:{port} did not answer within 0.5 s "
                            f"(env.kwargs.timeout_s); is a server running there, started with "
                            f"-carla-rpc-port={port}? See docs/carla.md")
    assert 0.5 <= elapsed < 0.5 + 1.5


# ---------------------------------------------------------------- config and servers per actor


def test_worker_index_picks_the_server():
    assert make(worker_index=2, port=2000, port_stride=3).address == "127.0.0.1:2006"
    assert make(worker_index=1, ports=[4000, 4100]).address == "127.0.0.1:4100"
    assert make(worker_index=1, hosts=["a", "b"], port=2000).address == "b:2000"
    assert make(worker_index=1, hosts=["a", "b"], ports=[2000, 2100]).address == "b:2100"
    env = make_env("rayworld/CARLA-v0", worker_index=3, client_factory=DOUBLE)
    assert env.address == "127.0.0.1:2009"
    # envs that take no worker_index are built as before
    assert make_env("rayworld/SimpleDriving-v0", worker_index=3).observation_space.shape == (64, 64, 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"worker_index": 2, "ports": [2000, 2003]}, r"env\.kwargs\.ports: got \[2000, 2003\], "
                                                 r"expected at least 3"),
    ({"port": 70000}, r"env\.kwargs\.port: got 70000, expected a TCP port"),
    ({"fixed_delta_seconds": 0.2}, r"env\.kwargs\.fixed_delta_seconds: got 0\.2, expected <= 0\.1"),
    ({"timeout_s": 0}, r"env\.kwargs\.timeout_s: got 0, expected a number > 0"),
    ({"timeout_s": True}, r"env\.kwargs\.timeout_s: got True, expected a number > 0"),
    ({"time_limit_s": float("inf")}, r"env\.kwargs\.time_limit_s: got inf, expected a number > 0"),
    ({"camera_size": 32}, r"env\.kwargs\.camera_size: got 32"),
    ({"camera_size": 64.0}, r"env\.kwargs\.camera_size: got 64\.0, expected an int >= 64"),
    ({"camera_fov": False}, r"env\.kwargs\.camera_fov: got False, expected degrees in \(0, 180\)"),
    ({"port_stride": True}, r"env\.kwargs\.port_stride: got True, expected an int >= 0"),
    ({"worker_index": True}, r"env\.kwargs\.worker_index: got True, expected an int >= 0"),
    ({"port": True}, r"env\.kwargs\.port: got True, expected a TCP port"),
    ({"speed_weight": "1.0"}, r"env\.kwargs\.speed_weight: got '1\.0', expected a number \(reward per metre"),
    ({"speed_weight": True}, r"env\.kwargs\.speed_weight: got True, expected a number"),
    ({"collision_penalty": True}, r"env\.kwargs\.collision_penalty: got True, expected a number >= 0 "
                                  r"\(subtracted from the reward\)$"),
    ({"lane_invasion_penalty": -1.0}, r"env\.kwargs\.lane_invasion_penalty: got -1\.0, "
                                      r"expected a number >= 0"),
    ({"off_road_penalty": None}, r"env\.kwargs\.off_road_penalty: got None, expected a number >= 0"),
    ({"vehicle": ""}, r"env\.kwargs\.vehicle: got '', expected a vehicle blueprint id such as "
                      r"'vehicle\.tesla\.model3'$"),
    ({"vehicle": None}, r"env\.kwargs\.vehicle: got None, expected a vehicle blueprint id"),
    ({"client_factory": "no_such_module:Client"}, r"env\.kwargs\.client_factory: cannot load "
                                                  r"'no_such_module:Client' \(No module named"),
    ({"client_factory": "/nowhere/double.py:FakeClient"}, r"env\.kwargs\.client_factory: cannot load"),
])
def test_bad_kwargs_fail_with_one_line(kwargs, message):
    with pytest.raises(EnvArgumentError, match=f"^{message}") as e:
        make(**kwargs)
    assert "\n" not in str(e.value)
    assert double.SERVERS == {}  # found before any connection


@pytest.mark.parametrize("kwargs, message", [
    ({"town": "Town99"}, r"env\.kwargs\.town: got 'Town99', expected one of the maps on "
                         r"127\.0\.0\.1:2000: Town01, Town02, Town10HD_Opt"),
    ({"vehicle": "vehicle.nope.*"}, r"env\.kwargs\.vehicle: got 'vehicle\.nope\.\*', expected a vehicle "
                                    r"blueprint on 127\.0\.0\.1:2000 \(an id or a pattern such as "
                                    r"'vehicle\.audi\.\*'\): vehicle\.audi\.a2, vehicle\.tesla\.model3$"),
    ({"vehicle": "sensor.camera.rgb"}, r"env\.kwargs\.vehicle: got 'sensor\.camera\.rgb', "
                                       r"expected a vehicle blueprint on"),
])
def test_values_the_server_refuses_fail_with_one_line(kwargs, message):
    env = make(**kwargs)
    with pytest.raises(EnvArgumentError, match=message) as e:
        env.reset(seed=0)
    assert "\n" not in str(e.value)
    assert ours(srv()) == [] and srv().settings_applied == []  # refused before any change


def test_vehicle_may_be_a_pattern_and_the_first_match_drives():
    env = make(vehicle="vehicle.audi.*")
    env.reset(seed=0)
    assert env._ego.type_id == "vehicle.audi.a2"
    env.close()


def test_preset_builds_the_env_without_a_server():
    cfg = load_config(PRESET)
    env = make_env(cfg.env.id, worker_index=3, **cfg.env.kwargs)
    assert env.address == "127.0.0.1:2009" and env.max_steps == 1200
    assert env.action_space.shape == (3,) and list(env.action_space.low) == [-1, 0, 0]
    assert cfg.collect.num_actors == cfg.evolve.real_episodes == cfg.evaluate.episodes == 4


def test_real_env_runners_use_server_i_too(monkeypatch, tmp_path):
    """evaluate's runners and evolve's workers are pools too: runner i plays on server i."""
    import rayworld.evaluate as evaluate

    class NoAgent:  # the runner's models are not what this checks
        def __init__(self, run_dir, cfg, **kwargs):
            self.world = self.controller = None

    monkeypatch.setattr(evaluate, "Agent", NoAgent)
    cfg = load_config(PRESET, [f"env.kwargs={{client_factory: '{DOUBLE}', port_stride: 3}}"])
    runner = evaluate.RealRunner(str(tmp_path), cfg.to_dict(), worker_index=2)
    assert runner.env.address == "127.0.0.1:2006"


# ---------------------------------------------------------------- the collector


def _collector(tmp_path, port, retries=2, timeout_s=0.3, index=0):
    kwargs = {"client_factory": DOUBLE, "port": port, "timeout_s": timeout_s, "time_limit_s": 3.0}
    return Collector("rayworld/CARLA-v0", kwargs, str(tmp_path), "brownian", 0.5, "zstd",
                     worker_index=index, env_retries=retries)


def test_collector_redoes_the_episode_after_a_server_crash(servers, tmp_path):
    clean = _collector(tmp_path / "clean", 2000).run(episode=0, seed=7, max_steps=40)
    servers[("127.0.0.1", 2100)] = double.FakeServer(port=2100, crash_at_tick=25, restart_after=1)
    start = time.perf_counter()
    redone = _collector(tmp_path / "crash", 2100).run(episode=0, seed=7, max_steps=40)
    assert time.perf_counter() - start < 10
    # tries: crashed mid-episode; reconnect while down; reconnect after the restart
    assert srv(2100).connects == 3 and srv(2100).ticks >= 25 + 41
    assert redone["steps"] == clean["steps"] == 40
    assert pq.read_table(tmp_path / "crash" / "ep-000000.parquet").equals(
        pq.read_table(tmp_path / "clean" / "ep-000000.parquet"))
    assert sorted(p.name for p in (tmp_path / "crash").iterdir()) == ["ep-000000.parquet"]


def test_collector_gives_up_with_one_clear_line(servers, tmp_path):
    servers[("127.0.0.1", 2200)] = double.FakeServer(port=2200, up=False, restart_after=None)
    collector = _collector(tmp_path, 2200, retries=2, timeout_s=0.2)
    start = time.perf_counter()
    with pytest.raises(SimulatorError) as e:
        collector.run(episode=3, seed=3, max_steps=40)
    assert time.perf_counter() - start < 3 * 0.2 + 2.0
    assert str(e.value) == ("collector 0, episode 3: CARLA server 127.0.0.1:2200 did not answer within "
                            "0.2 s (env.kwargs.timeout_s); is a server running there, started with "
                            "-carla-rpc-port=2200? See docs/carla.md (tried 3 times; collect.env_retries=2)")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_collector_uses_its_own_server(tmp_path):
    _collector(tmp_path, 2000, index=1).run(episode=1, seed=1, max_steps=5)
    assert list(double.SERVERS) == [("127.0.0.1", 2003)] and srv(2003).connects == 1


# ---------------------------------------------------------------- rayworld collect on Ray


def _config(tmp_path, **kwargs) -> Path:
    data = yaml.safe_load(PRESET.read_text())
    data["env"]["kwargs"].update(kwargs)
    path = tmp_path / "carla.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_rayworld_collect_with_two_actors_on_the_double(ray_session, tmp_path):
    from rayworld.cli import main

    config = _config(tmp_path, client_factory=DOUBLE, timeout_s=2.0, time_limit_s=2.0)
    out = tmp_path / "run"
    assert main(["collect", "--config", str(config), "--out", str(out), "--set", "collect.episodes=4",
                 "--set", "collect.num_actors=2", "--set", "collect.max_steps=30"]) == 0
    m = Manifest.load(out / "data")
    assert sorted(m.shards) == [0, 1, 2, 3] and m.info["env_id"] == "rayworld/CARLA-v0"
    assert m.info["obs_shape"] == [64, 64, 3] and m.info["action_dim"] == 3
    for e in m.shards:
        table = open_shard(m.file(e)).read()
        assert table.num_rows == m.shards[e]["steps"] == 30  # the 2 s limit is 40 steps
        obs = obs_array(table.column("obs"), (64, 64, 3))
        assert obs.dtype == np.uint8 and obs.std() > 10
    # the same episodes in this process: which actor (server) played them does not matter
    cfg = load_config(config)
    here = Collector(cfg.env.id, cfg.env.kwargs, str(tmp_path / "here"), cfg.collect.policy,
                     cfg.collect.brownian_sigma, "zstd")
    for e in (0, 3):
        here.run(episode=e, seed=e, max_steps=30)
        got = pq.read_table(tmp_path / "here" / f"ep-00000{e}.parquet", columns=["obs", "reward"])
        assert got.equals(pq.read_table(m.file(e), columns=["obs", "reward"]))
    firsts = {obs_array(open_shard(m.file(e)).read().column("obs"), (64, 64, 3))[0].tobytes()
              for e in m.shards}
    assert len(firsts) > 1  # the seeds spawned the cars in different places


def test_rayworld_collect_names_the_unreachable_server(ray_session, tmp_path, capsys):
    from rayworld.cli import main

    (port,) = free_ports()
    config = _config(tmp_path, port=port, timeout_s=0.5)  # the real client; nothing listens
    start = time.perf_counter()
    code = main(["collect", "--config", str(config), "--out", str(tmp_path / "run"),
                 "--set", "collect.episodes=1", "--set", "collect.num_actors=1",
                 "--set", "collect.env_retries=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 1 and err == (
        f"rayworld collect: collector 0, episode 0: CARLA server 127.0.0.1:{port} did not answer "
        f"within 0.5 s (env.kwargs.timeout_s); is a server running there, started with "
        f"-carla-rpc-port={port}? See docs/carla.md (tried 2 times; collect.env_retries=1)")
    assert time.perf_counter() - start < 2 * 0.5 + 20  # two timeouts, plus an actor's start
    assert not list((tmp_path / "run" / "data" / "episodes").glob("*.parquet"))


@pytest.mark.parametrize("kwargs, sets, message", [
    ({"town": "Town99"}, [], r"env\.kwargs\.town: got 'Town99', expected one of the maps on "
                             r"127\.0\.0\.1:200[03]: Town01, Town02, Town10HD_Opt$"),  # found in an actor
    ({"ports": [2000, 2003]}, ["collect.num_actors=3"], r"env\.kwargs\.ports: got \[2000, 2003\], "
                                                        r"expected at least 3 entries"),  # before any starts
])
def test_rayworld_collect_names_the_bad_env_kwarg(ray_session, tmp_path, capsys, kwargs, sets, message):
    from rayworld.cli import main

    config = _config(tmp_path, client_factory=DOUBLE, timeout_s=2.0, **kwargs)
    argv = ["collect", "--config", str(config), "--out", str(tmp_path / "run"), "--set", "collect.episodes=3"]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(f"rayworld collect: {message}", err), err


# ---------------------------------------------------------------- a real server


@pytest.mark.live
@pytest.mark.skipif(not os.environ.get("CARLA_HOST"),
                    reason="needs a CARLA server: set CARLA_HOST (and CARLA_PORT, default 2000)")
def test_live_collect_one_episode(tmp_path):
    config = _config(tmp_path, host=os.environ["CARLA_HOST"],
                     port=int(os.environ.get("CARLA_PORT", "2000")), time_limit_s=5.0)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rayworld.cli", "collect", "--config", str(config), "--out", str(out),
           "--set", "collect.episodes=1", "--set", "collect.num_actors=1", "--set", "ray.num_cpus=2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    m = Manifest.load(out / "data")
    table = open_shard(m.file(0)).read()
    assert 0 < table.num_rows == m.shards[0]["steps"] <= 100  # 5 s at 20 Hz, or a collision
    assert obs_array(table.column("obs"), (64, 64, 3)).std() > 5  # a rendered town, not a blank
