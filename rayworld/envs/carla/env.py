"""CARLA through its Python client, as a 64x64x3 gymnasium env.

The env connects on its first reset (building it needs no server, so the driver can read its
spaces), loads the town if the server has another one, and runs the world in synchronous mode
with a fixed time step: every step applies the action and ticks the world once. The ego car
carries an RGB camera, a collision sensor and a lane-invasion sensor; their callbacks run on
the client's threads and only fill queues that step() reads after its tick.

Reward per step: speed_weight * (velocity . lane direction) * dt, i.e. metres driven along the
lane (the lane's heading, not the car's: driving the wrong way scores negative), minus
collision_penalty once on a collision (which ends the episode), lane_invasion_penalty per
crossed marking, and off_road_penalty per second away from a driving lane. The episode is
truncated after time_limit_s of simulated time.
"""

from __future__ import annotations

import contextlib
import queue
import time

import carla
import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image

from rayworld.envs.carla.server import CarlaServerError, describe, load_factory, server_address
from rayworld.envs.registry import check, is_int, is_number

ROLE = "rayworld"  # role_name of everything we spawn, so a later connection can remove leftovers
CAMERA_MOUNT = carla.Transform(carla.Location(x=1.5, z=2.4), carla.Rotation(pitch=-10.0))
CLEANUP_TIMEOUT_S = 1.0  # all that close() waits on the server: a dead one must not hold it


def _same_town(map_name: str, town: str) -> bool:
    return map_name.rsplit("/", 1)[-1] == town.rsplit("/", 1)[-1]


class CarlaEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, host: str = "127.0.0.1", port: int = 2000, town: str = "Town01",
                 fixed_delta_seconds: float = 0.05, timeout_s: float = 20.0,
                 time_limit_s: float = 60.0, worker_index: int = 0, port_stride: int = 3,
                 hosts: list | None = None, ports: list | None = None,
                 vehicle: str = "vehicle.tesla.model3", camera_size: int = 128,
                 camera_fov: float = 90.0, speed_weight: float = 1.0,
                 collision_penalty: float = 50.0, lane_invasion_penalty: float = 1.0,
                 off_road_penalty: float = 5.0, client_factory="carla:Client",
                 render_mode: str | None = None):
        check("port_stride", port_stride, is_int(port_stride) and port_stride >= 0,
              "an int >= 0 (CARLA uses port, port+1 and port+2: 3 or more for servers on one host)")
        self.host, self.port = server_address(worker_index, host, port, port_stride, hosts, ports)
        self.address = f"{self.host}:{self.port}"
        for key, value in (("fixed_delta_seconds", fixed_delta_seconds), ("timeout_s", timeout_s),
                           ("time_limit_s", time_limit_s)):
            check(key, value, is_number(value) and value > 0, "a number > 0")
        check("fixed_delta_seconds", fixed_delta_seconds, fixed_delta_seconds <= 0.1,
              "<= 0.1 s (CARLA's physics is unstable at longer steps)")
        check("camera_size", camera_size, is_int(camera_size) and camera_size >= 64,
              "an int >= 64 (pixels; the frame is averaged down to 64x64)")
        check("camera_fov", camera_fov, is_number(camera_fov) and 0 < camera_fov < 180,
              "degrees in (0, 180)")
        check("speed_weight", speed_weight, is_number(speed_weight),
              "a number (reward per metre driven along the lane)")
        for key, value in (("collision_penalty", collision_penalty),
                           ("lane_invasion_penalty", lane_invasion_penalty),
                           ("off_road_penalty", off_road_penalty)):
            check(key, value, is_number(value) and value >= 0, "a number >= 0 (subtracted from the reward)")
        check("town", town, isinstance(town, str) and town != "", "a map name such as 'Town01'")
        check("vehicle", vehicle, isinstance(vehicle, str) and vehicle != "",
              "a vehicle blueprint id such as 'vehicle.tesla.model3'")
        check("render_mode", render_mode, render_mode in (None, "rgb_array"), "None or 'rgb_array'")
        self.town, self.vehicle = town, vehicle
        self.dt, self.timeout_s = float(fixed_delta_seconds), float(timeout_s)
        self.max_steps = max(1, round(time_limit_s / fixed_delta_seconds))
        self.camera_size, self.camera_fov = camera_size, float(camera_fov)
        self.speed_weight, self.collision_penalty = float(speed_weight), float(collision_penalty)
        self.lane_invasion_penalty = float(lane_invasion_penalty)
        self.off_road_penalty = float(off_road_penalty)
        self.client_factory = load_factory(client_factory)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
        # [steer, throttle, brake], as CarRacing and rayworld's controller lay them out
        self.action_space = spaces.Box(np.array([-1, 0, 0], np.float32),
                                       np.array([1, 1, 1], np.float32), dtype=np.float32)
        self._client = self._world = self._map = self._library = None
        self._original = None  # the world's settings before we switched to synchronous mode
        self._ego, self._sensors = None, []
        self._images, self._events = queue.SimpleQueue(), queue.SimpleQueue()
        self._steps, self._obs = 0, None

    # ------------------------------------------------------------ gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        with self._server_calls():
            if self._client is None:
                self._connect()
            else:
                self._destroy_actors()
            spawn_point = self._spawn()
            obs = self._observe(self._world.tick(self.timeout_s))
            self._drain_events()  # what the spawn itself set off does not count
        self._steps, self._obs = 0, obs
        return obs, {"spawn_point": spawn_point, "server": self.address}

    def step(self, action):
        if self._ego is None:
            raise RuntimeError("CarlaEnv.step() before reset(), or after close() or an error")
        a = np.clip(np.asarray(action, np.float32), self.action_space.low, self.action_space.high)
        with self._server_calls():
            self._ego.apply_control(carla.VehicleControl(steer=float(a[0]), throttle=float(a[1]),
                                                         brake=float(a[2])))
            frame = self._world.tick(self.timeout_s)
            obs = self._observe(frame)
            collided, invasions = self._drain_events()
            where, velocity = self._ego.get_location(), self._ego.get_velocity()
            lane = self._map.get_waypoint(where)  # the nearest driving lane's centre
            here = self._map.get_waypoint(where, project_to_road=False,
                                          lane_type=carla.LaneType.Any)
        ahead = lane.transform.get_forward_vector()
        along = velocity.x * ahead.x + velocity.y * ahead.y + velocity.z * ahead.z
        off_road = here is None or here.lane_type != carla.LaneType.Driving
        reward = (self.speed_weight * along * self.dt - self.collision_penalty * collided
                  - self.lane_invasion_penalty * invasions - self.off_road_penalty * off_road * self.dt)
        self._steps += 1
        self._obs = obs
        terminated = collided
        truncated = self._steps >= self.max_steps and not terminated
        speed = float(np.sqrt(velocity.x ** 2 + velocity.y ** 2 + velocity.z ** 2))
        info = {"speed": speed, "speed_along_lane": float(along), "collision": collided,
                "lane_invasions": invasions, "off_road": off_road}
        return obs, float(reward), terminated, truncated, info

    def render(self):
        return self._obs if self.render_mode == "rgb_array" else None

    def close(self):
        """Give the server back its settings and remove our actors. Cheap, and safe to call
        again or on an env that never connected; a dead server holds it about 1 s."""
        self._cleanup()

    # ------------------------------------------------------------ the server

    @contextlib.contextmanager
    def _server_calls(self):
        """On any error: clean up, and raise the client's RuntimeErrors as CarlaServerError."""
        try:
            yield
        except CarlaServerError:
            self._cleanup()
            raise
        except RuntimeError as e:  # what the carla client raises for time-outs and failures
            self._cleanup()
            raise CarlaServerError(describe(e, self.address, self.timeout_s)) from e
        except BaseException:
            self._cleanup()
            raise

    def _connect(self):
        client = self.client_factory(self.host, self.port)
        client.set_timeout(self.timeout_s)
        self._client = client
        world = client.get_world()
        if not _same_town(world.get_map().name, self.town):
            maps = client.get_available_maps()
            check("town", self.town, any(_same_town(m, self.town) for m in maps),
                  f"one of the maps on {self.address}: "
                  + ", ".join(sorted(m.rsplit("/", 1)[-1] for m in maps)))
            world = client.load_world(self.town)
        self._world, self._map = world, world.get_map()
        self._library = world.get_blueprint_library()  # a copy on the client: no calls later
        self._check_vehicle()
        self._original = world.get_settings()
        self._original.synchronous_mode = False  # never leave a server waiting for our ticks
        for actor in sorted(world.get_actors(), key=lambda a: not a.type_id.startswith("sensor.")):
            if actor.attributes.get("role_name") == ROLE:  # left by a client that was killed
                actor.destroy()
        settings = world.get_settings()
        settings.synchronous_mode, settings.fixed_delta_seconds = True, self.dt
        world.apply_settings(settings)

    def _vehicles(self, pattern: str) -> list:
        return sorted((b for b in self._library.filter(pattern) if b.id.startswith("vehicle.")),
                      key=lambda b: b.id)

    def _check_vehicle(self):
        if self._vehicles(self.vehicle):
            return
        ids = [b.id for b in self._vehicles("vehicle.*")]
        some = ", ".join(ids[:5]) + (f", ... ({len(ids)} in all)" if len(ids) > 5 else "")
        check("vehicle", self.vehicle, False,
              f"a vehicle blueprint on {self.address} (an id or a pattern such as 'vehicle.audi.*'): "
              + (some or "it has none"))

    def _blueprint(self, pattern: str, **attributes):
        found = self._vehicles(pattern) if pattern == self.vehicle else \
            sorted(self._library.filter(pattern), key=lambda b: b.id)
        if not found:
            raise CarlaServerError(f"CARLA server {self.address} has no blueprint {pattern!r}")
        bp = found[0]
        for name, value in {"role_name": ROLE, **attributes}.items():
            bp.set_attribute(name, str(value))
        return bp

    def _spawn(self) -> int:
        points = self._map.get_spawn_points()
        if not points:
            raise CarlaServerError(f"CARLA server {self.address}: {self.town} has no spawn points")
        first = int(self.np_random.integers(len(points)))  # the reset seed picks the start
        car = self._blueprint(self.vehicle)
        for k in range(len(points)):
            index = (first + k) % len(points)
            self._ego = self._world.try_spawn_actor(car, points[index])
            if self._ego is not None:
                break
        else:
            raise CarlaServerError(f"CARLA server {self.address}: every spawn point is taken")
        self._images, self._events = queue.SimpleQueue(), queue.SimpleQueue()
        images, events = self._images, self._events  # this episode's, whatever arrives late
        size = self.camera_size
        for blueprint, callback in (
                (self._blueprint("sensor.camera.rgb", image_size_x=size, image_size_y=size,
                                 fov=self.camera_fov), images.put),
                (self._blueprint("sensor.other.collision"),
                 lambda event: events.put("collision")),
                (self._blueprint("sensor.other.lane_invasion"),
                 lambda event: events.put("lane_invasion"))):
            sensor = self._world.spawn_actor(blueprint, CAMERA_MOUNT, attach_to=self._ego)
            self._sensors.append(sensor)
            sensor.listen(callback)
        return index

    def _observe(self, frame: int) -> np.ndarray:
        """The camera's image of `frame` as 64x64x3 RGB."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                image = self._images.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise CarlaServerError(f"CARLA server {self.address}: no camera image within "
                                       f"{self.timeout_s:g} s of frame {frame} (env.kwargs.timeout_s)") \
                    from None
            if image.frame >= frame:
                break
        bgra = np.frombuffer(image.raw_data, np.uint8).reshape(image.height, image.width, 4)
        rgb = np.ascontiguousarray(bgra[:, :, 2::-1])
        if rgb.shape[:2] != (64, 64):  # BOX: an area average, so thin lane lines blur, not alias
            rgb = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BOX))
        return rgb

    def _drain_events(self) -> tuple[bool, int]:
        collided, invasions = False, 0
        while True:
            try:
                kind = self._events.get_nowait()
            except queue.Empty:
                return collided, invasions
            collided |= kind == "collision"
            invasions += kind == "lane_invasion"

    def _destroy_actors(self):
        """Between episodes. What a failure leaves in our lists, the cleanup it sets off tries again."""
        while self._sensors:
            self._sensors[0].destroy()  # a sensor stops listening when destroyed
            self._sensors.pop(0)
        if self._ego is not None:
            self._ego.destroy()
            self._ego = None

    def _cleanup(self):
        """Restore the world's settings, then destroy what we spawned; never raises.

        Settings first: a world left in synchronous mode stalls until the next client, while our
        leftover actors only wait for the next connection to remove them (by role_name). Each call
        is tried on its own, all within CLEANUP_TIMEOUT_S, so a failing call does not skip the
        rest and a dead server does not hold the caller for long.
        """
        client, world, original = self._client, self._world, self._original
        actors = [*self._sensors, *([self._ego] if self._ego is not None else [])]
        self._client = self._world = self._map = self._library = self._original = None
        self._ego, self._sensors = None, []
        if client is None:
            return
        calls = [lambda: world.apply_settings(original)] if original is not None else []
        calls += [actor.destroy for actor in actors]
        deadline = time.monotonic() + min(self.timeout_s, CLEANUP_TIMEOUT_S)
        for call in calls:
            left = deadline - time.monotonic()
            if left < 0.01:  # out of time: the server is gone or too slow to wait for
                return
            try:
                client.set_timeout(left)
                call()
            except Exception:  # noqa: BLE001 (best effort, see above)
                continue
