"""docs/carla.md against the code: its shell commands parse and load, its Kubernetes manifests
match the KubeRay CRD, and its server pool gives actor i server i."""

import json
import re
import shlex
from pathlib import Path

import yaml

from rayworld.config import load_config
from rayworld.envs import make_env

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "tune_configs" / "carla.yaml"


def _doc_blocks(lang):
    text = (ROOT / "docs" / "carla.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_docs_kuberay_sidecar_cluster_matches_the_crd():
    from test_cluster_configs import check_manifest

    fields = json.loads((ROOT / "tests" / "data" / "kuberay_v1_fields.json").read_text())
    docs = [d for block in _doc_blocks("yaml") for d in yaml.safe_load_all(block)]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1 and check_manifest(clusters[0], fields) == []
    group = clusters[0]["spec"]["workerGroupSpecs"][0]
    assert group["rayStartParams"]["num-cpus"] == "1"
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"carla": 1}
    kinds = sorted(d["kind"] for d in docs if "kind" in d)
    assert kinds == ["RayCluster", "Service", "StatefulSet"]


def test_docs_commands_parse_and_their_configs_load():
    from test_cluster_configs import check_rayworld_command

    lines = [line.strip() for block in _doc_blocks("sh") for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("rayworld ")]
    assert [argv[1] for argv in commands] == ["pipeline", "collect"]
    for argv in commands:
        check_rayworld_command(argv)
    pool = next(yaml.safe_load(b) for b in _doc_blocks("yaml") if b.startswith("env:"))
    cfg = load_config(PRESET, [f"env.kwargs={json.dumps(pool['env']['kwargs'])}"])
    assert make_env(cfg.env.id, worker_index=3, **cfg.env.kwargs).address == "carla-3.carla:2000"
