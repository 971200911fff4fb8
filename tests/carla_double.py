"""A test double of CARLA's server side: what rayworld reaches through `carla.Client`.

The real `carla` package's value types (Transform, Location, Vector3D, VehicleControl,
WorldSettings, LaneType...) are used as they are: they need no server. Everything that talks to
a server is replaced with the same method names and signatures (tests/test_carla.py checks them
against the real classes): Client, World, Map, BlueprintLibrary, ActorBlueprint, Actor,
Vehicle, Sensor, Waypoint and the sensor data (Image, CollisionEvent, LaneInvasionEvent).

The fake town: a straight two-way road along +x (lane centres y = -1.75 and +1.75, markings at
y = -3.5, 0 and 3.5), sidewalks up to |y| = 6.5, buildings from |y| = 8, and a wall across the
road at x = wall_x. Traffic keeps right, as in CARLA's towns, and CARLA's frame is left-handed
(y is to the right of +x), so the y > 0 lane runs along +x (yaw 0, lane_id -1) and the y < 0
lane back along -x (yaw 180, lane_id 1); spawn points face their lane. Cars follow a simple
kinematic model. Sensor data is delivered on another
thread after each tick, as the real client does. Calls to a server that is down wait for the
client's timeout and raise the real client's RuntimeError.

Servers live in this process: SERVERS[(host, port)] is made on first use and answers. A test
puts its own FakeServer there to make one crash, stay down, or have a nearer wall.
"""

from __future__ import annotations

import fnmatch
import math
import threading
import time

import carla
import numpy as np

TOWNS = ["Town01", "Town02", "Town10HD_Opt"]
LANES = (-1.75, 1.75)
MARKINGS = ((-3.5, carla.LaneMarkingType.Solid), (0.0, carla.LaneMarkingType.Broken),
            (3.5, carla.LaneMarkingType.Solid))
ROAD_HALF, SIDEWALK_HALF, BUILDINGS = 3.5, 6.5, 8.0
ROAD_LENGTH = 500.0
CAR_HALF_LENGTH = 2.4
SERVERS: dict = {}


def lane_yaw(y: float) -> float:
    return 0.0 if y >= 0 else 180.0


def server(host: str, port: int) -> FakeServer:
    return SERVERS.setdefault((host, port), FakeServer(host, port))


class FakeServer:
    """One simulator process.

    up: answers calls. crash_at_tick: goes down when its n-th tick (counted over its life)
    arrives. restart_after: connection attempts (Client.get_world) that time out while it is
    down before it is back, with a fresh world; None: it never comes back.
    """

    def __init__(self, host="127.0.0.1", port=2000, up=True, crash_at_tick=None, restart_after=1,
                 wall_x=200.0, town="Town10HD_Opt"):
        self.host, self.port = host, port
        self.up, self.crash_at_tick, self.restart_after = up, crash_at_tick, restart_after
        self.wall_x = wall_x
        self.timeout_s = 5.0  # the client's, as set_timeout left it
        self.ticks = self.connects = self.epoch = 0
        self.settings_applied = []  # every WorldSettings a client applied, in order
        self.maps_loaded = []
        self.lock = threading.Lock()
        self._new_world(town)

    def _new_world(self, town):
        self.epoch += 1
        self.world = FakeWorld(self, town)

    def rpc(self, timeout_s: float, epoch: int | None = None):
        """What every call does first: wait out the timeout, as the real client does, if the
        server is down or the caller's world belongs to a server that has since restarted."""
        if not self.up or (epoch is not None and epoch != self.epoch):
            time.sleep(timeout_s)
            raise RuntimeError(f"time-out of {round(timeout_s * 1000)}ms while waiting for the "
                               f"simulator, make sure the simulator is ready and connected to "
                               f"{self.host}:{self.port}")

    def crash(self):
        self.up, self.crash_at_tick = False, None

    def connect(self, timeout_s: float) -> FakeWorld:
        self.connects += 1
        if not self.up and self.restart_after is not None:
            self.restart_after -= 1
            if self.restart_after < 0:
                self.up = True
                self._new_world("Town10HD_Opt")
        self.rpc(timeout_s)
        return self.world


# ---------------------------------------------------------------- client, world, map


class FakeClient:
    def __init__(self, host="127.0.0.1", port=2000, worker_threads=0):
        self._server = server(host, port)
        self._timeout = 5.0

    def set_timeout(self, seconds):
        self._timeout = self._server.timeout_s = float(seconds)

    def get_client_version(self):
        return "0.9.16"

    def get_server_version(self):
        self._server.rpc(self._timeout)
        return "0.9.16"

    def get_world(self):
        return self._server.connect(self._timeout)

    def get_available_maps(self):
        self._server.rpc(self._timeout)
        return [f"/Game/Carla/Maps/{t}" for t in TOWNS]

    def load_world(self, map_name, reset_settings=True, map_layers=carla.MapLayer.All):
        self._server.rpc(self._timeout)
        town = map_name.rsplit("/", 1)[-1]
        if town not in TOWNS:
            raise RuntimeError("map not found")
        self._server.maps_loaded.append(town)
        self._server._new_world(town)
        return self._server.world


def _copy_settings(s: carla.WorldSettings) -> carla.WorldSettings:
    return carla.WorldSettings(synchronous_mode=s.synchronous_mode,
                               no_rendering_mode=s.no_rendering_mode,
                               fixed_delta_seconds=s.fixed_delta_seconds or 0.0)


class FakeWorld:
    def __init__(self, srv: FakeServer, town: str):
        self._server, self._epoch = srv, srv.epoch
        self._map = FakeMap(self, f"Carla/Maps/{town}")
        self._settings = carla.WorldSettings()
        self._actors: dict[int, FakeActor] = {}
        self._next_id, self._frame = 1, 0
        self._library = FakeBlueprintLibrary([
            FakeBlueprint("vehicle.tesla.model3", {"role_name": "", "color": "255,0,0"}),
            FakeBlueprint("vehicle.audi.a2", {"role_name": "", "color": "0,0,255"}),
            FakeBlueprint("sensor.camera.rgb", {"role_name": "", "image_size_x": "800",
                                                "image_size_y": "600", "fov": "90"}),
            FakeBlueprint("sensor.other.collision", {"role_name": ""}),
            FakeBlueprint("sensor.other.lane_invasion", {"role_name": ""})])
        self._wall = self._add(FakeActor, "static.prop.wall", {},
                               carla.Transform(carla.Location(x=srv.wall_x)))

    def _rpc(self, seconds=None):
        self._server.rpc(seconds or self._server.timeout_s, self._epoch)

    @property
    def id(self):
        return self._epoch

    def get_map(self):
        self._rpc()
        return self._map

    def get_settings(self):
        self._rpc()
        return _copy_settings(self._settings)

    def apply_settings(self, settings, seconds=0.0):
        self._rpc()
        self._settings = _copy_settings(settings)
        self._server.settings_applied.append(_copy_settings(settings))
        return self._frame

    def get_blueprint_library(self):
        self._rpc()
        return self._library

    def get_actors(self, actor_ids=None):
        self._rpc()
        actors = [a for a in self._actors.values() if actor_ids is None or a.id in actor_ids]
        return FakeActorList(actors)

    def _add(self, cls, type_id, attributes, transform, parent=None):
        actor = cls(self, self._next_id, type_id, dict(attributes), transform, parent)
        self._actors[actor.id] = actor
        self._next_id += 1
        return actor

    def try_spawn_actor(self, blueprint, transform, attach_to=None,
                        attachment_type=carla.AttachmentType.Rigid, bone=""):
        self._rpc()
        if blueprint.id.startswith("sensor."):
            if attach_to is None or not attach_to.is_alive:
                return None
            return self._add(FakeSensor, blueprint.id, blueprint._attributes, transform, attach_to)
        for other in self._actors.values():  # the spawn point must be free
            if isinstance(other, FakeVehicle) and other.get_location().distance(transform.location) < 4:
                return None
        return self._add(FakeVehicle, blueprint.id, blueprint._attributes, transform)

    def spawn_actor(self, blueprint, transform, attach_to=None,
                    attachment_type=carla.AttachmentType.Rigid, bone=""):
        actor = self.try_spawn_actor(blueprint, transform, attach_to, attachment_type, bone)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def tick(self, seconds=0.0):
        srv = self._server
        srv.ticks += 1
        if srv.crash_at_tick is not None and srv.ticks >= srv.crash_at_tick:
            srv.crash()
        self._rpc(seconds or None)
        if not self._settings.synchronous_mode:
            raise RuntimeError("tick() in asynchronous mode: the double expects synchronous mode")
        dt = self._settings.fixed_delta_seconds
        self._frame += 1
        deliveries = []
        for actor in list(self._actors.values()):
            if isinstance(actor, FakeVehicle):
                deliveries += actor._advance(dt, self._frame)
        for actor in self._actors.values():  # events first, then images, in one thread
            if isinstance(actor, FakeSensor) and actor.type_id == "sensor.camera.rgb":
                deliveries.append((actor, actor._image(self._frame)))
        deliveries = [(s._callback, data) for s, data in deliveries if s._callback is not None]
        threading.Thread(target=lambda: [cb(d) for cb, d in deliveries], daemon=True).start()
        return self._frame


class FakeActorList(list):
    def filter(self, wildcard_pattern):
        return FakeActorList(a for a in self if fnmatch.fnmatch(a.type_id, wildcard_pattern))


class FakeMap:
    def __init__(self, world: FakeWorld, name: str):
        self._world, self.name = world, name

    def get_spawn_points(self):
        self._world._rpc()
        return [carla.Transform(carla.Location(x=x, y=y, z=0.5), carla.Rotation(yaw=lane_yaw(y)))
                for x in (20.0, 60.0, 100.0, 140.0) for y in LANES]

    def get_waypoint(self, location, project_to_road=True, lane_type=carla.LaneType.Driving):
        self._world._rpc()
        x, y = location.x, location.y
        on_road = 0 <= x <= ROAD_LENGTH
        if project_to_road:
            lane_y = LANES[0] if y < 0 else LANES[1]
            return FakeWaypoint(min(max(x, 0.0), ROAD_LENGTH), lane_y, carla.LaneType.Driving)
        if on_road and abs(y) <= ROAD_HALF:
            found = carla.LaneType.Driving
        elif on_road and abs(y) <= SIDEWALK_HALF:
            found = carla.LaneType.Sidewalk
        else:
            return None
        if lane_type not in (carla.LaneType.Any, found):
            return None
        return FakeWaypoint(x, y, found)


class FakeWaypoint:
    def __init__(self, x, y, lane_type):
        self.transform = carla.Transform(carla.Location(x=x, y=y), carla.Rotation(yaw=lane_yaw(y)))
        self.lane_type = lane_type
        self.lane_id = -1 if y >= 0 else 1  # OpenDRIVE: negative ids run along the road
        self.road_id, self.lane_width, self.is_junction = 1, 3.5, False


# ---------------------------------------------------------------- blueprints


class FakeBlueprint:
    def __init__(self, id, attributes):
        self.id, self._attributes = id, dict(attributes)

    def has_attribute(self, id):
        return id in self._attributes

    def set_attribute(self, id, value):
        if not isinstance(value, str):  # Boost.Python refuses anything but str here
            raise TypeError(f"set_attribute({id!r}, {value!r}): value must be str")
        if id not in self._attributes:
            raise IndexError(f"attribute '{id}' not found in {self.id}")
        self._attributes[id] = value


class FakeBlueprintLibrary:
    def __init__(self, blueprints):
        self._blueprints = list(blueprints)

    def filter(self, wildcard_pattern):
        return FakeBlueprintLibrary(b for b in self._blueprints
                                    if fnmatch.fnmatch(b.id, wildcard_pattern))

    def find(self, id):
        for b in self._blueprints:
            if b.id == id:
                return b
        raise IndexError(f"blueprint '{id}' not found")

    def __iter__(self):
        return iter([FakeBlueprint(b.id, b._attributes) for b in self._blueprints])

    def __len__(self):
        return len(self._blueprints)

    def __getitem__(self, pos):
        b = self._blueprints[pos]
        return FakeBlueprint(b.id, b._attributes)


# ---------------------------------------------------------------- actors


class FakeActor:
    def __init__(self, world, actor_id, type_id, attributes, transform, parent=None):
        self._world, self.id, self.type_id = world, actor_id, type_id
        self.attributes, self.parent = attributes, parent
        loc, rot = transform.location, transform.rotation
        self._x, self._y, self._z, self._yaw = loc.x, loc.y, loc.z, rot.yaw
        self._speed = 0.0

    @property
    def is_alive(self):
        return self.id in self._world._actors

    def destroy(self):
        self._world._rpc()
        return self._world._actors.pop(self.id, None) is not None

    def get_location(self):
        self._world._rpc()
        return carla.Location(x=self._x, y=self._y, z=self._z)

    def get_transform(self):
        self._world._rpc()
        return carla.Transform(self.get_location(), carla.Rotation(yaw=self._yaw))

    def set_transform(self, transform):
        self._world._rpc()
        loc, rot = transform.location, transform.rotation
        self._x, self._y, self._z, self._yaw = loc.x, loc.y, loc.z, rot.yaw

    def get_velocity(self):
        self._world._rpc()
        yaw = math.radians(self._yaw)
        return carla.Vector3D(self._speed * math.cos(yaw), self._speed * math.sin(yaw), 0.0)


class FakeVehicle(FakeActor):
    def __init__(self, *args):
        super().__init__(*args)
        self._control = carla.VehicleControl()

    def apply_control(self, control):
        self._world._rpc()
        self._control = control

    def _sensors(self, type_id):
        return [a for a in self._world._actors.values()
                if isinstance(a, FakeSensor) and a.parent is self and a.type_id == type_id]

    def _front(self):
        return self._x + CAR_HALF_LENGTH * math.cos(math.radians(self._yaw))

    def _advance(self, dt, frame):
        """One physics step; returns the (sensor, event) pairs it set off."""
        c = self._control
        y0, front0 = self._y, self._front()
        accel = 5.0 * c.throttle - 10.0 * c.brake - 0.1 * self._speed
        self._speed = max(0.0, self._speed + accel * dt)
        self._yaw += 30.0 * c.steer * dt * min(1.0, self._speed / 5.0)
        self._x += self._speed * dt * math.cos(math.radians(self._yaw))
        self._y += self._speed * dt * math.sin(math.radians(self._yaw))
        events = []
        wall, front = self._world._server.wall_x, self._front()
        if min(front0, front) < wall <= max(front0, front) or abs(self._y) >= BUILDINGS:
            other = self._world._wall
            for s in self._sensors("sensor.other.collision"):
                events.append((s, FakeCollisionEvent(frame, self, other)))
            self._speed = 0.0
        crossed = [FakeLaneMarking(kind) for y, kind in MARKINGS if min(y0, self._y) < y <= max(y0, self._y)]
        if crossed:
            for s in self._sensors("sensor.other.lane_invasion"):
                events.append((s, FakeLaneInvasionEvent(frame, self, crossed)))
        return events


class FakeSensor(FakeActor):
    def __init__(self, *args):
        super().__init__(*args)
        self._callback = None

    @property
    def is_listening(self):
        return self._callback is not None

    def listen(self, callback):
        self._world._rpc()
        self._callback = callback

    def stop(self):
        self._world._rpc()
        self._callback = None

    def destroy(self):  # as the real client's: a listening sensor stops first
        self._world._rpc()
        self._callback = None
        return super().destroy()

    def _image(self, frame):
        w, h = int(self.attributes["image_size_x"]), int(self.attributes["image_size_y"])
        return FakeImage(frame, w, h, float(self.attributes["fov"]),
                         render(self.parent, self._world._server.wall_x, w, h))


def render(car: FakeActor, wall_x: float, w: int, h: int) -> bytes:
    """A road seen from the car, as BGRA bytes: lines slide with the car's offset and heading,
    dashes with the distance driven, and the wall comes closer."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[: h // 2] = (110, 160, 230)  # sky
    rows = np.arange(h - h // 2)[:, None] + 0.5
    t = rows / (h - h // 2)  # 0 at the horizon, 1 at the bottom
    ahead = 3.0 / t  # metres ahead shown by each row
    right = ((np.arange(w)[None, :] + 0.5) / w - 0.5) * ahead * 2.0  # metres to the right
    yaw = math.radians(car._yaw)
    x = car._x + ahead * math.cos(yaw) - right * math.sin(yaw)  # left-handed: right of +x is +y
    y = car._y + ahead * math.sin(yaw) + right * math.cos(yaw)
    ground = np.where(np.abs(y) <= ROAD_HALF, 90, 60)[..., None] * np.array([1, 1, 1])
    ground = np.where((np.abs(y) > ROAD_HALF)[..., None], [70, 140, 60], ground)
    dashed = (x % 6.0) < 3.0
    for line_y, kind in MARKINGS:
        line = np.abs(y - line_y) < 0.15
        if kind == carla.LaneMarkingType.Broken:
            line &= dashed
        ground = np.where(line[..., None], [240, 240, 240], ground)
    behind_wall = (x - wall_x) * (car._x - wall_x) <= 0  # the wall is between the car and there
    ground = np.where(behind_wall[..., None], [200, 40, 40], ground)
    rgb[h // 2:] = ground.astype(np.uint8)
    bgra = np.concatenate([rgb[..., ::-1], np.full((h, w, 1), 255, np.uint8)], axis=-1)
    return bgra.tobytes()


# ---------------------------------------------------------------- sensor data


class FakeImage:
    def __init__(self, frame, width, height, fov, raw_data):
        self.frame, self.timestamp = frame, frame * 0.05
        self.width, self.height, self.fov, self.raw_data = width, height, fov, raw_data
        self.transform = carla.Transform()


class FakeCollisionEvent:
    def __init__(self, frame, actor, other_actor):
        self.frame, self.timestamp, self.transform = frame, frame * 0.05, carla.Transform()
        self.actor, self.other_actor = actor, other_actor
        self.normal_impulse = carla.Vector3D(-1000.0, 0.0, 0.0)


class FakeLaneInvasionEvent:
    def __init__(self, frame, actor, crossed_lane_markings):
        self.frame, self.timestamp, self.transform = frame, frame * 0.05, carla.Transform()
        self.actor, self.crossed_lane_markings = actor, crossed_lane_markings


class FakeLaneMarking:
    def __init__(self, type):
        self.type, self.color = type, carla.LaneMarkingColor.White
        self.lane_change, self.width = carla.LaneChange.Both, 0.15
