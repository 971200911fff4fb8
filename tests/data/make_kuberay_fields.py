"""Regenerate kuberay_v1_fields.json: the keys a RayCluster or RayJob (ray.io/v1) may hold.

Not run by the tests. It needs the Kubernetes Python client of the Kubernetes version that
KubeRay's API reference links to (1.28):

    pip install --target /tmp/k8s28 kubernetes==28.1.0
    PYTHONPATH=/tmp/k8s28 python tests/data/make_kuberay_fields.py > tests/data/kuberay_v1_fields.json

The ray.io/v1 types below are copied from KubeRay's generated API reference
(ray-project/kuberay, docs/reference/api.md at commit dc85903b61ab6068b752ea8f56db028c456c890a,
section "ray.io/v1"); the required fields are the json tags without `omitempty` in
ray-operator/apis/ray/v1/raycluster_types.go at 3275ee09f6a6c899c37e82ea6349785536de6bd4 (the
same API). The Kubernetes types they embed (PodTemplateSpec, Service, ResourceRequirements, ...)
are walked from the client's model classes: `attribute_map` gives the JSON names,
`openapi_types` the nested types, and a setter that rejects None marks a required field.
"""

import inspect
import json
import re
import sys

# type grammar: "string" "integer" "number" "boolean" "quantity" (int or string) "any",
# "[]T" a list of T, "map[T]" a mapping with free keys and T values, or a type name.
RAY_TYPES = {
    "RayCluster": {"apiVersion": "string", "kind": "string", "metadata": "ObjectMeta",
                   "spec": "RayClusterSpec"},
    "RayJob": {"apiVersion": "string", "kind": "string", "metadata": "ObjectMeta",
               "spec": "RayJobSpec"},
    "RayClusterSpec": {
        "suspend": "boolean", "managedBy": "string", "autoscalerOptions": "AutoscalerOptions",
        "headServiceAnnotations": "map[string]", "enableInTreeAutoscaling": "boolean",
        "gcsFaultToleranceOptions": "GcsFaultToleranceOptions", "headGroupSpec": "HeadGroupSpec",
        "rayVersion": "string", "workerGroupSpecs": "[]WorkerGroupSpec"},
    "HeadGroupSpec": {"template": "PodTemplateSpec", "headService": "Service",
                      "enableIngress": "boolean", "rayStartParams": "map[string]",
                      "serviceType": "string"},
    "WorkerGroupSpec": {
        "suspend": "boolean", "groupName": "string", "replicas": "integer",
        "minReplicas": "integer", "maxReplicas": "integer", "idleTimeoutSeconds": "integer",
        "rayStartParams": "map[string]", "template": "PodTemplateSpec",
        "scaleStrategy": "ScaleStrategy", "numOfHosts": "integer"},
    "ScaleStrategy": {"workersToDelete": "[]string"},
    "AutoscalerOptions": {
        "resources": "ResourceRequirements", "image": "string", "imagePullPolicy": "string",
        "securityContext": "SecurityContext", "idleTimeoutSeconds": "integer",
        "upscalingMode": "string", "env": "[]EnvVar", "envFrom": "[]EnvFromSource",
        "volumeMounts": "[]VolumeMount"},
    "GcsFaultToleranceOptions": {"redisUsername": "RedisCredential",
                                 "redisPassword": "RedisCredential",
                                 "externalStorageNamespace": "string", "redisAddress": "string"},
    "RedisCredential": {"valueFrom": "EnvVarSource", "value": "string"},
    "RayJobSpec": {
        "activeDeadlineSeconds": "integer", "backoffLimit": "integer",
        "rayClusterSpec": "RayClusterSpec", "submitterPodTemplate": "PodTemplateSpec",
        "metadata": "map[string]", "clusterSelector": "map[string]",
        "submitterConfig": "SubmitterConfig", "managedBy": "string", "deletionPolicy": "string",
        "entrypoint": "string", "runtimeEnvYAML": "string", "jobId": "string",
        "submissionMode": "string", "entrypointResources": "string",
        "entrypointNumCpus": "number", "entrypointNumGpus": "number",
        "ttlSecondsAfterFinished": "integer", "shutdownAfterJobFinishes": "boolean",
        "suspend": "boolean"},
    "SubmitterConfig": {"backoffLimit": "integer"},
}
RAY_REQUIRED = {
    "RayClusterSpec": ["headGroupSpec"],
    "HeadGroupSpec": ["rayStartParams", "template"],
    "WorkerGroupSpec": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
    "GcsFaultToleranceOptions": ["redisAddress"],
}
RAY_ENUMS = {
    "AutoscalerOptions": {"upscalingMode": ["Default", "Aggressive", "Conservative"]},
    "RayJobSpec": {"submissionMode": ["K8sJobMode", "HTTPMode", "InteractiveMode"],
                   "deletionPolicy": ["DeleteCluster", "DeleteWorkers", "DeleteSelf",
                                      "DeleteNone"]},
}
# Kubernetes objects written next to the Ray ones (the shared volume's claim).
EXTRA_ROOTS = ["PersistentVolumeClaim"]
# resource.Quantity fields: the client types them as str, the API takes ints too.
QUANTITY = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
            ("V1EmptyDirVolumeSource", "size_limit"), ("V1ResourceFieldSelector", "divisor")}
READ_ONLY = {"status"}  # written by the cluster, never by us
PRIMITIVES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
              "datetime": "string", "date": "string", "object": "any"}


def k8s_types(models, roots):
    """Walk the client's models from `roots`; return {name: {"fields", "required"}}."""
    out, todo = {}, list(roots)

    def convert(owner, attr, tp):
        if (owner, attr) in QUANTITY:
            return "map[quantity]" if tp.startswith("dict(") else "quantity"
        if tp.startswith("list["):
            return "[]" + convert(owner, None, tp[5:-1])
        if tp.startswith("dict("):
            return "map[" + convert(owner, None, tp[tp.index(",") + 1:-1].strip()) + "]"
        if tp in PRIMITIVES:
            return PRIMITIVES[tp]
        todo.append(tp)
        return tp.removeprefix("V1")

    while todo:
        cls_name = todo.pop()
        name = cls_name.removeprefix("V1")
        if name in out:
            continue
        cls = getattr(models, cls_name)
        fields, required = {}, []
        for attr, tp in cls.openapi_types.items():
            key = cls.attribute_map[attr]
            if key in READ_ONLY:
                continue
            fields[key] = convert(cls_name, attr, tp)
            setter = inspect.getsource(getattr(cls, attr).fset)
            if re.search(rf"\b{attr} is None", setter) and "must not be `None`" in setter:
                required.append(key)
        out[name] = {"fields": fields, "required": sorted(required)}
    return out


def main():
    from kubernetes import __version__ as k8s_version
    from kubernetes.client import models

    referenced = {t.lstrip("[]").removeprefix("map[").rstrip("]")
                  for fields in RAY_TYPES.values() for t in fields.values()}
    embedded = sorted("V1" + t for t in referenced - set(RAY_TYPES)
                      if t not in PRIMITIVES.values())
    types = {name: {"fields": fields, "required": RAY_REQUIRED.get(name, []),
                    **({"enums": RAY_ENUMS[name]} if name in RAY_ENUMS else {})}
             for name, fields in RAY_TYPES.items()}
    types.update(k8s_types(models, embedded + ["V1" + r for r in EXTRA_ROOTS]))
    doc = {
        "source": {
            "kuberay": "ray-project/kuberay docs/reference/api.md @ dc85903b61ab6068b752ea8f56db028c456c890a "
                       "(ray.io/v1, KubeRay 1.3 API); required fields from "
                       "ray-operator/apis/ray/v1/raycluster_types.go @ 3275ee09f6a6c899c37e82ea6349785536de6bd4",
            "kubernetes": f"kubernetes Python client {k8s_version} (Kubernetes 1.28 API)",
            "generator": "tests/data/make_kuberay_fields.py",
            "pruned": "descriptions, validation patterns and read-only status fields dropped; "
                      "only types reachable from the roots kept",
        },
        "roots": {"RayCluster": "RayCluster", "RayJob": "RayJob",
                  **{r: r for r in EXTRA_ROOTS}},
        "types": dict(sorted(types.items())),
    }
    # one type per line keeps diffs readable
    lines = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in doc.items()
             if k != "types"]
    body = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in doc["types"].items())
    sys.stdout.write("{\n" + ",\n".join(lines) + ',\n  "types": {\n' + body + "\n  }\n}\n")


if __name__ == "__main__":
    main()
