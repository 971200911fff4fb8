"""Offline checks of the cluster configs in cluster/; no network, no Ray runtime, a few seconds.

- cluster/ray-cluster.yaml (Ray's cluster launcher) is validated against Ray's own schema
  (ray/autoscaler/ray-schema.json) with `validate_config(prepare_config(cfg))`, the way `ray up`
  fills the AWS defaults in first. Then what matters here: a GPU worker type that scales from 0
  to many, a CPU worker type, rayworld installed on every node from the synced repository, and
  the shared run directory mounted into every container.
- cluster/kuberay/*.yaml (KubeRay RayCluster and RayJob, ray.io/v1, and their
  PersistentVolumeClaim): every key, recursively, is checked against
  tests/data/kuberay_v1_fields.json, a pruned description of KubeRay's v1 API and of the
  Kubernetes types it embeds (pod template, service, resources...): field names, required
  fields, enums and value shapes. Its "source" says where it came from, and
  tests/data/make_kuberay_fields.py regenerates it. A misspelt key is reported with its path.
- Commands: the RayJob entrypoint and every `rayworld <stage> ...` written in the launcher YAML
  or raycluster.yaml (their comments included) go through rayworld's own argument parser and
  config loader, so the subcommand, the flags, the preset file and every --set key must exist.
  The resources they ask for (Train workers, collectors, dream evaluators) must fit the node
  types or worker groups, or the run would wait forever.
- cluster/Dockerfile: its Ray base image matches the manifests' rayVersion and the launcher's
  image, its COPY sources exist and cover what pyproject.toml builds, and its WORKDIR is the
  RayJob's working_dir.
"""

import copy
import difflib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "ray-cluster.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
RAYJOB_S3 = CLUSTER / "kuberay" / "rayjob-s3.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
FIELDS = Path(__file__).parent / "data" / "kuberay_v1_fields.json"
SHARED = "/mnt/shared"
MIN_GPU_WORKERS = 8  # a cluster config that cannot reach this many GPUs is not a GPU cluster


# ---------------------------------------------------------------- helpers


def load_docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def find_doc(path, kind):
    docs = [d for d in load_docs(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


SCALARS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "quantity": lambda v: isinstance(v, (int, float, str)) and not isinstance(v, bool),
}


def check_manifest(doc, fields):
    """Every problem in one Kubernetes object, as 'path: message' lines (empty: valid)."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in fields["roots"]:
        return [f"kind: {kind!r} is not one of {sorted(fields['roots'])}"]
    errors = []
    _check(doc, fields["roots"][kind], "", fields["types"], errors)
    return errors


def _check(value, tp, path, types, errors):
    where = path or "<root>"
    if tp == "any":
        return
    if tp.startswith("[]"):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return
        for i, item in enumerate(value):
            _check(item, tp[2:], f"{path}[{i}]", types, errors)
        return
    if tp.startswith("map["):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return
        for key, item in value.items():
            _check(item, tp[4:-1], f"{path}.{key}" if path else str(key), types, errors)
        return
    if tp in SCALARS:
        if not SCALARS[tp](value):
            errors.append(f"{where}: expected {tp}, got {value!r}")
        return
    spec = types[tp]
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a {tp} mapping, got {value!r}")
        return
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in spec["fields"]:
            close = difflib.get_close_matches(str(key), spec["fields"], n=1)
            errors.append(f"{sub}: unknown field of {tp}"
                          + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        allowed = spec.get("enums", {}).get(key)
        if allowed is not None and item not in allowed:
            errors.append(f"{sub}: {item!r} is not one of {allowed}")
            continue
        _check(item, spec["fields"][key], sub, types, errors)
    for key in spec["required"]:
        if key not in value:
            errors.append(f"{f'{path}.' if path else ''}{key}: required field of {tp} is missing")


def rayworld_commands(text):
    """argv lists of the `rayworld ...` commands written in `text` (paths like .../rayworld skipped)."""
    found = []
    for match in re.finditer(r"(?<![\w/.-])rayworld[ \t]+[^'\"\n>|;&]*", text):
        found.append(shlex.split(match.group(0)))
    return found


def check_rayworld_command(argv):
    """Parse a full `rayworld <stage> ...` command the way the CLI does; return (args, config)."""
    from rayworld.cli import _parser
    from rayworld.config import load_config

    assert argv[0] == "rayworld", argv
    args = _parser().parse_args(argv[1:])
    assert args.config, f"{argv}: no --config, so the run would depend on a previous run's config"
    preset = ROOT / args.config
    assert preset.is_file(), f"{argv}: {args.config} is not a file in the repository"
    return args, load_config(str(preset), args.set)


def subcommands():
    from rayworld.cli import _parser

    parser = _parser()
    return set(next(a for a in parser._actions if a.dest == "command").choices)


def dockerfile_instructions():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def pod_templates(spec):
    """(name, pod template) of the head and every worker group of a RayClusterSpec."""
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def quantity(value):
    """A Kubernetes CPU or GPU quantity as a number: 3, "3", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def fits(capacities, cpu, gpu):
    """Whether one task or actor asking for cpu and gpu fits some node or pod shape."""
    return any(c >= cpu and g >= gpu for c, g, _ in capacities)


def check_demand_fits(cfg, capacities):
    """capacities: (cpus, gpus, max count) per node type or worker group."""
    gpu_per_train_worker = 1 if cfg.ray.use_gpu else 0
    assert fits(capacities, cfg.ray.cpus_per_worker, gpu_per_train_worker), \
        f"no node fits a Train worker ({cfg.ray.cpus_per_worker} CPU, {gpu_per_train_worker} GPU)"
    assert fits(capacities, 1, 0), "no node fits a 1-CPU collector"
    dream_gpu = cfg.evolve.gpus_per_actor if cfg.ray.use_gpu else 0
    assert fits(capacities, 1, dream_gpu), f"no node fits a dream evaluator (1 CPU, {dream_gpu} GPU)"
    total_gpus = sum(g * n for _, g, n in capacities)
    total_cpus = sum(c * n for c, _, n in capacities)
    if cfg.ray.use_gpu:
        assert total_gpus >= cfg.ray.num_workers, \
            f"{cfg.ray.num_workers} GPU Train workers, but at most {total_gpus} GPUs"
    assert total_cpus >= max(cfg.collect.num_actors, cfg.evolve.num_actors), \
        f"more actors than the {total_cpus} CPUs the cluster can reach"


@pytest.fixture(scope="module")
def fields():
    return json.loads(FIELDS.read_text())


@pytest.fixture(scope="module")
def launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER.read_text())
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return raw, prepared


# ---------------------------------------------------------------- Ray cluster launcher


def test_launcher_passes_rays_schema(launcher):
    raw, prepared = launcher
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_launcher_schema_check_catches_a_misspelt_key(launcher):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(launcher[0])
    gpu_type = next(iter(_gpu_types(launcher[1])))
    bad["available_node_types"][gpu_type]["max_worker"] = 4
    with pytest.raises(ValidationError, match="max_worker"):
        validate_config(prepare_config(bad))


def _gpu_types(prepared):
    return {name: t for name, t in prepared["available_node_types"].items()
            if t["resources"].get("GPU", 0) >= 1}


def test_launcher_has_autoscaled_gpu_and_cpu_workers(launcher):
    _, prepared = launcher
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    gpu = _gpu_types(prepared)
    assert gpu, "no worker type declares a GPU resource"
    assert head not in gpu, "the head should be a CPU node"
    for name, t in gpu.items():
        assert t["min_workers"] == 0, f"{name}: GPU workers should scale from 0"
        assert t["max_workers"] >= MIN_GPU_WORKERS, f"{name}: max_workers {t['max_workers']}"
        assert re.match(r"(g|p)\d", t["node_config"]["InstanceType"]), \
            f"{name}: {t['node_config']['InstanceType']} is not a GPU instance type"
    cpu = [n for n, t in types.items() if n != head and n not in gpu]
    assert cpu and all(types[n]["max_workers"] > 0 for n in cpu), "no CPU worker type for collection"
    assert prepared["max_workers"] >= max(t["max_workers"] for t in gpu.values()), \
        "the global max_workers caps the GPU workers below their own max_workers"


def test_launcher_installs_rayworld_on_every_node(launcher):
    _, prepared = launcher
    repo_mounts = [remote for remote, local in prepared["file_mounts"].items()
                   if (ROOT / local).resolve() == ROOT]
    assert repo_mounts, "file_mounts does not sync the repository root (run `ray up` from it)"
    targets = "|".join(map(re.escape, repo_mounts))
    installs_repo = re.compile(rf"\bpip install\b.*\s({targets})/?(\s|$)")
    per_node = {prepared["head_node_type"]: prepared["head_setup_commands"]}
    for name, t in prepared["available_node_types"].items():
        if name != prepared["head_node_type"]:
            per_node[name] = t.get("worker_setup_commands", prepared["worker_setup_commands"])
    for name, commands in per_node.items():
        assert any(installs_repo.search(c) for c in commands), \
            f"{name}: no setup command pip-installs the synced repository {repo_mounts}"


def test_launcher_mounts_the_shared_run_directory(launcher):
    _, prepared = launcher
    volumes = [opt.split(None, 1)[1] for opt in prepared["docker"]["run_options"]
               if opt.startswith("-v ")]
    assert f"{SHARED}:{SHARED}" in volumes, f"{SHARED} is not bind-mounted into the containers"
    mounts = [c for c in prepared["initialization_commands"]
              if re.search(rf"\bmount\b.*\s{re.escape(SHARED)}(\s|$)", c)]
    assert mounts, f"no initialization command mounts shared storage at {SHARED} on the host"


def test_launcher_commands_are_real_rayworld_commands(launcher):
    text = LAUNCHER.read_text()
    commands = rayworld_commands(text)
    assert commands, "the launcher YAML runs or documents no rayworld command"
    names = subcommands()
    full = 0
    for argv in commands:
        assert argv[1] in names, f"`{' '.join(argv)}`: {argv[1]!r} is not a rayworld subcommand"
        if "--help" in argv:
            continue
        args, cfg = check_rayworld_command(argv)
        assert args.out.startswith(SHARED + "/"), f"{args.out}: runs must be on the shared storage"
        assert args.address == "auto", "on a cluster node the command must join the cluster"
        types = launcher[1]["available_node_types"]
        capacities = [(t["resources"].get("CPU", 0), t["resources"].get("GPU", 0), t["max_workers"])
                      for name, t in types.items() if name != launcher[1]["head_node_type"]]
        check_demand_fits(cfg, capacities)
        full += 1
    assert full, "no complete rayworld command (with --config and --out) is documented"


# ---------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB, RAYJOB_S3], ids=lambda p: p.name)
def test_kuberay_manifest_keys_match_the_crds(path, fields):
    docs = load_docs(path)
    assert docs
    for doc in docs:
        assert check_manifest(doc, fields) == [], f"{path.name} ({doc.get('kind')})"


def _rename(obj, dotted, new_key):
    """Rename the key at a dotted path like 'spec.workerGroupSpecs.0.groupName'."""
    *parents, last = dotted.split(".")
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    obj[new_key] = obj.pop(last)


@pytest.mark.parametrize("path,kind,key,new_key,expected", [
    (RAYCLUSTER, "RayCluster", "spec.workerGroupSpecs", "workerGroupSpec",
     ["spec.workerGroupSpec: unknown field of RayClusterSpec (did you mean 'workerGroupSpecs'?)"]),
    (RAYCLUSTER, "RayCluster", "spec.headGroupSpec.rayStartParams", "rayStartParam",
     ["spec.headGroupSpec.rayStartParam: unknown field of HeadGroupSpec (did you mean 'rayStartParams'?)",
      "spec.headGroupSpec.rayStartParams: required field of HeadGroupSpec is missing"]),
    (RAYCLUSTER, "RayCluster", "spec.workerGroupSpecs.0.groupName", "name",
     ["spec.workerGroupSpecs[0].name: unknown field of WorkerGroupSpec",
      "spec.workerGroupSpecs[0].groupName: required field of WorkerGroupSpec is missing"]),
    (RAYCLUSTER, "PersistentVolumeClaim", "spec.accessModes", "accessMode",
     ["spec.accessMode: unknown field of PersistentVolumeClaimSpec"]),
    (RAYJOB, "RayJob", "spec.entrypoint", "entryPoint", ["spec.entryPoint: unknown field of RayJobSpec"]),
    (RAYJOB, "RayJob", "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.volumeMounts.0.mountPath",
     "mountpath",
     ["spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMounts[0].mountpath: "
      "unknown field of VolumeMount"]),
])
def test_checker_reports_a_misspelt_key_with_its_path(fields, path, kind, key, new_key, expected):
    doc = copy.deepcopy(find_doc(path, kind))
    _rename(doc, key, new_key)
    errors = check_manifest(doc, fields)
    for message in expected:
        assert any(e.startswith(message) for e in errors), (message, errors)


@pytest.mark.parametrize("edit,expected", [
    (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
     "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus: expected string, got 0"),
    (lambda s: s["workerGroupSpecs"][0].update({"maxReplicas": "64"}),
     "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas: expected integer"),
    (lambda s: s["headGroupSpec"]["template"]["spec"].update({"containers": {"name": "x"}}),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers: expected a list"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"),
     "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].name: required field"),
], ids=["int-param", "string-for-int", "map-for-list", "missing-name"])
def test_checker_reports_bad_values_and_missing_fields(fields, edit, expected):
    doc = copy.deepcopy(find_doc(RAYJOB, "RayJob"))
    edit(doc["spec"]["rayClusterSpec"])
    errors = check_manifest(doc, fields)
    assert any(e.startswith(expected) for e in errors), errors


def test_checker_reports_a_bad_enum_value(fields):
    doc = copy.deepcopy(find_doc(RAYJOB, "RayJob"))
    doc["spec"]["submissionMode"] = "K8sMode"
    assert any(e.startswith("spec.submissionMode: 'K8sMode' is not one of")
               for e in check_manifest(doc, fields))


def cluster_spec(owner):
    if owner == "RayCluster":
        return find_doc(RAYCLUSTER, "RayCluster")["spec"]
    return find_doc(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_kuberay_cluster_shape(owner):
    spec = cluster_spec(owner)
    version = _base_image_version()
    assert spec["rayVersion"] == version, f"{owner}: rayVersion {spec['rayVersion']} vs image {version}"
    groups = spec["workerGroupSpecs"]
    gpu = [g for g in groups if _pod_gpus(g["template"]) >= 1]
    assert gpu, f"{owner}: no worker group asks for nvidia.com/gpu"
    for g in gpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] >= MIN_GPU_WORKERS, g["groupName"]
    assert any(_pod_gpus(g["template"]) == 0 for g in groups), f"{owner}: no CPU worker group"
    if any(g["minReplicas"] < g["maxReplicas"] for g in groups):
        assert spec.get("enableInTreeAutoscaling") is True, f"{owner}: groups scale but no autoscaler"
    assert _pod_gpus(spec["headGroupSpec"]["template"]) == 0, f"{owner}: the head should be a CPU pod"


def _pod_gpus(template):
    return sum(quantity(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in template["spec"]["containers"])


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_every_pod_mounts_the_shared_volume_and_runs_our_image(path):
    docs = load_docs(path)
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for claim in claims.values():
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "pods on many nodes share the claim"
    spec = cluster_spec("RayCluster" if path == RAYCLUSTER else "RayJob")
    images = set()
    for name, template in pod_templates(spec):
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            images.add(container["image"])
            shared = [m for m in container.get("volumeMounts", []) if m["mountPath"] == SHARED]
            assert shared, f"{name}/{container['name']}: nothing mounted at {SHARED}"
            volume = volumes.get(shared[0]["name"])
            assert volume and "persistentVolumeClaim" in volume, f"{name}: {SHARED} is not a PVC"
            assert volume["persistentVolumeClaim"]["claimName"] in claims, \
                f"{name}: claim {volume['persistentVolumeClaim']['claimName']} is not defined in {path.name}"
    assert len(images) == 1, f"pods run different images: {images}"


def test_both_manifests_define_the_same_claim():
    claim = find_doc(RAYCLUSTER, "PersistentVolumeClaim")
    assert find_doc(RAYJOB, "PersistentVolumeClaim") == claim


def _rayjob_command():
    job = find_doc(RAYJOB, "RayJob")
    return shlex.split(job["spec"]["entrypoint"])


def kuberay_capacities(spec):
    """(cpus, gpus, max replicas) of each worker group, from its container limits."""
    capacities = []
    for group in spec["workerGroupSpecs"]:
        limits = [c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]]
        capacities.append((sum(quantity(lim.get("cpu", 0)) for lim in limits),
                           sum(quantity(lim.get("nvidia.com/gpu", 0)) for lim in limits),
                           group["maxReplicas"]))
    return capacities


def test_rayjob_entrypoint_is_a_real_rayworld_command():
    job = find_doc(RAYJOB, "RayJob")["spec"]
    argv = _rayjob_command()
    assert argv[1] == "pipeline"
    args, cfg = check_rayworld_command(argv)
    assert args.config == "tune_configs/carracing_small.yaml"
    assert args.out.startswith(SHARED + "/"), f"{args.out}: runs must be on the shared volume"
    assert cfg.ray.use_gpu is True
    assert job["shutdownAfterJobFinishes"] is True
    check_demand_fits(cfg, kuberay_capacities(job["rayClusterSpec"]))


def test_s3_rayjob_runs_in_a_bucket_with_no_shared_volume():
    """The object-storage RayJob: --out is a bucket URI rayworld reaches, no pod mounts a claim,
    and every pod (the submitter's driver included) runs as the account that reaches it."""
    from rayworld import storage

    job = find_doc(RAYJOB_S3, "RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    args, cfg = check_rayworld_command(argv)
    assert argv[1] == "pipeline" and args.out.startswith("s3://")
    assert storage.mirror_path(args.out).parts[-3:] == ("my-rayworld-bucket", "runs",
                                                        "carracing_small")
    assert not any(d.get("kind") == "PersistentVolumeClaim" for d in load_docs(RAYJOB_S3))
    pods = [t for _, t in pod_templates(job["rayClusterSpec"])] + [job["submitterPodTemplate"]]
    for pod in pods:
        assert pod["spec"]["serviceAccountName"] == "rayworld-s3"
        for volume in pod["spec"].get("volumes", []):
            assert "persistentVolumeClaim" not in volume
    check_demand_fits(cfg, kuberay_capacities(job["rayClusterSpec"]))
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] == _dockerfile_workdir()


def test_raycluster_documented_commands_fit_the_cluster():
    commands = rayworld_commands(RAYCLUSTER.read_text())
    assert commands, "raycluster.yaml documents no rayworld command to run on it"
    for argv in commands:
        args, cfg = check_rayworld_command(argv)
        assert args.out.startswith(SHARED + "/"), f"{args.out}: runs must be on the shared volume"
        check_demand_fits(cfg, kuberay_capacities(cluster_spec("RayCluster")))


def test_rayjob_runtime_env_is_valid_and_points_at_the_image_copy():
    from ray.runtime_env import RuntimeEnv

    job = find_doc(RAYJOB, "RayJob")["spec"]
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert isinstance(env, dict)
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"runtimeEnvYAML: unknown runtime_env fields {unknown}"
    assert env["working_dir"] == _dockerfile_workdir(), "working_dir is not where the image holds the repository"
    # the image's copy of the repository is this checkout: validate against it
    RuntimeEnv(**{**env, "working_dir": str(ROOT)})
    # a working_dir in the submitter pod can only be uploaded by the K8s Job submitter
    assert job["submissionMode"] == "K8sJobMode"
    argv = _rayjob_command()
    config = argv[argv.index("--config") + 1]
    assert config.split("/")[0] in _dockerfile_copies(), f"the image does not hold {config}"


# ---------------------------------------------------------------- Dockerfile


def _base_image_version():
    (base,) = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", base)
    assert match, f"FROM {base}: expected a rayproject/ray <version>-py3XX-gpu image"
    return match.group(1)


def _dockerfile_workdir():
    return [arg for op, arg in dockerfile_instructions() if op == "WORKDIR"][-1]


def _dockerfile_copies():
    """{destination name under WORKDIR: source} for every COPY."""
    copies = {}
    for op, arg in dockerfile_instructions():
        if op != "COPY":
            continue
        parts = [p for p in arg.split() if not p.startswith("--")]
        *sources, dest = parts
        for src in sources:
            copies[src if dest.endswith("/") else dest.removeprefix("./")] = src
    return copies


def test_dockerfile_base_image_matches_the_cluster_configs(launcher):
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    version = _base_image_version()
    (base,) = [arg for op, arg in dockerfile_instructions() if op == "FROM"]
    assert launcher[0]["docker"]["image"] == base, "the launcher runs another Ray image"
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_req = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert version in ray_req.specifier, f"image Ray {version} is outside pyproject's {ray_req}"


def test_dockerfile_copies_what_the_package_build_needs():
    tomllib = pytest.importorskip("tomllib")
    copies = _dockerfile_copies()
    for src in copies.values():
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    missing = needed - set(copies)
    assert not missing, f"the image build needs {sorted(missing)}, which the Dockerfile does not copy"
    steps = dockerfile_instructions()
    runs = [i for i, (op, _) in enumerate(steps) if op == "RUN"]
    first_copy = next(i for i, (op, _) in enumerate(steps) if op == "COPY")
    assert "torch" in steps[runs[0]][1] and runs[0] < first_copy, \
        "torch should be installed in its own layer before the code, so code changes keep it cached"
    install = re.search(r"pip install[^&]*\s\"?\.(\[([^\]]*)\])?\"?(\s|$)", steps[runs[-1]][1])
    assert install, "the last RUN does not install the package"
    extras = set(project["project"]["optional-dependencies"])
    for extra in filter(None, (install.group(2) or "").split(",")):
        assert extra in extras, f"the image installs extra {extra!r}, which pyproject does not define"
