"""The files under cluster/: workflow configs, runtime_env, Dockerfile, cluster launcher YAMLs, KubeRay manifests.

KubeRay manifests are checked against a small JSON schema written from the KubeRay ray.io/v1 API reference
(https://ray-project.github.io/kuberay/reference/api/): the fields this project uses, their types, and no unknown
fields where a typo would otherwise pass silently. Launcher YAMLs are checked against Ray's own schema
(ray/autoscaler/ray-schema.json). Serve configs must load as ray.serve.schema.ServeDeploySchema.
"""

from __future__ import annotations

import json
import re
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from lesion.config import Config, load_config
from lesion.models import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
IMAGE = "REGISTRY/lesion:0.1.0"  # the image built from cluster/Dockerfile, named the same everywhere

# --- a JSON schema for the KubeRay resources used here -----------------------------------------------------------

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_QUANTITY = {"type": ["string", "integer", "number"]}
_RESOURCES = {
    "type": "object",
    "properties": {"limits": {"type": "object", "additionalProperties": _QUANTITY},
                   "requests": {"type": "object", "additionalProperties": _QUANTITY}},
    "additionalProperties": False,
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {"name": _NAME, "image": {"type": "string", "minLength": 1}, "resources": _RESOURCES,
                   "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}}},
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {"spec": {"type": "object", "required": ["containers"],
                            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}}}},
}
_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # values are strings in the CRD
_HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "properties": {"rayStartParams": _START_PARAMS, "template": _POD_TEMPLATE,
                   "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}},
    "additionalProperties": False,
}
_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "template"],
    "properties": {"groupName": _NAME, "replicas": {"type": "integer", "minimum": 0},
                   "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
                   "numOfHosts": {"type": "integer", "minimum": 1}, "rayStartParams": _START_PARAMS,
                   "template": _POD_TEMPLATE, "suspend": {"type": "boolean"}},
    "additionalProperties": False,
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object"},
        "authOptions": {"type": "object", "properties": {"mode": {"enum": ["disabled", "token"]}},
                        "additionalProperties": False},
        "headServiceAnnotations": {"type": "object"},
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
    },
    "additionalProperties": False,
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}


def _resource(kind: str, spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


KUBERAY_SCHEMAS = {
    "RayCluster": _resource("RayCluster", _CLUSTER_SPEC),
    "RayJob": _resource("RayJob", {
        "type": "object",
        "required": ["entrypoint", "rayClusterSpec"],
        "properties": {
            "entrypoint": {"type": "string", "minLength": 1},
            "runtimeEnvYAML": {"type": "string"},
            "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
            "shutdownAfterJobFinishes": {"type": "boolean"},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
            "backoffLimit": {"type": "integer", "minimum": 0},
            "entrypointNumCpus": {"type": "number"},
            "entrypointNumGpus": {"type": "number"},
            "rayClusterSpec": _CLUSTER_SPEC,
            "clusterSelector": {"type": "object"},
            "suspend": {"type": "boolean"},
        },
        "additionalProperties": False,
    }),
    "RayService": _resource("RayService", {
        "type": "object",
        "required": ["serveConfigV2", "rayClusterConfig"],
        "properties": {"serveConfigV2": {"type": "string"}, "rayClusterConfig": _CLUSTER_SPEC,
                       "upgradeStrategy": {"type": "object"}, "excludeHeadPodFromServeSvc": {"type": "boolean"}},
        "additionalProperties": False,
    }),
}
KUBERAY_FILES = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService",
                 "rayservice-registry.yaml": "RayService"}


def _kuberay(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "kuberay" / name).read_text())


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
            "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


# --- workflow configs --------------------------------------------------------------------------------------------


def test_demo_config_is_the_embedded_default():
    assert load_config(CLUSTER / "configs" / "demo.yaml") == Config()


def test_study_configs_load_and_name_their_study():
    ham = load_config(CLUSTER / "configs" / "ham10000.yaml")
    assert ham.data.source == "ham10000" and ham.data.task == "multiclass"
    assert {ham.model_config(v).arch for v in ham.train.models} == set(MODEL_NAMES)  # every architecture
    for arch in ("custom_cnn", "resnet50", "densenet121"):  # the first study's grid: balanced and imbalanced
        balances = {ham.model_config(v).balance for v in ham.variants_of(arch)}
        assert balances == {"oversample", "none"}, (arch, balances)
    assert ham.tune.model == "custom_cnn" and len(ham.variants_of("custom_cnn")) == 2  # tuned, both variants
    assert ham.data.image_size > ham.train.input_size >= 224
    assert ham.train.gpus_per_worker >= 1 and ham.workflow.tune
    assert ham.model_config("efficientnet_lite0").pretrained is True  # the one offline set of ImageNet weights
    assert ham.train.balance != "none"

    binary = load_config(CLUSTER / "configs" / "isic-binary.yaml")
    assert binary.data.source == "isic-binary" and binary.data.task == "binary"
    assert list(binary.train.models) == ["scratch_cnn", "mobilenetv2", "efficientnet_b0"]
    assert not binary.workflow.tune  # tune.model (custom_cnn) is not in this study

    for path in (ROOT / "benchmarks" / "configs" / "ham10000-laptop.yaml",
                 CLUSTER / "configs" / "ham10000-laptop-unweighted.yaml"):
        laptop = load_config(path)
        assert (laptop.data.source, laptop.data.task) == ("ham10000", "multiclass")
        assert laptop.train.gpus_per_worker == 0 and laptop.train.workers * laptop.train.cpus_per_worker < 2
        assert laptop.model_config("efficientnet_lite0").pretrained is True
    assert laptop.train.balance == "none" and laptop.evaluate.prior_correction == "fit"  # the fitted adjustment balances

    binary_laptop = load_config(CLUSTER / "configs" / "ham10000-binary-laptop.yaml")
    assert (binary_laptop.data.source, binary_laptop.data.task) == ("ham10000", "binary")
    assert {"scratch_cnn", "mobilenetv2", "efficientnet_b0"} <= set(binary_laptop.train.models)  # the study's three
    assert binary_laptop.train.gpus_per_worker == 0
    assert binary_laptop.train.workers * binary_laptop.train.cpus_per_worker < 2


def test_cluster_configs_hold_only_what_a_user_runs_and_every_benchmark_config_loads():
    users = {p.name for p in (CLUSTER / "configs").glob("*.yaml")}
    assert users == {"demo.yaml", "ham10000-laptop-unweighted.yaml", "ham10000-binary-laptop.yaml",
                     "ham10000.yaml", "isic-binary.yaml"}  # demo, laptop 7-class and binary, full 7-class and binary
    experiments = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))
    assert experiments
    for path in experiments:
        load_config(path)  # an ablation or candidate config must stay valid as the config classes change


# --- runtime_env and image ---------------------------------------------------------------------------------------


def test_runtime_env_uploads_the_code_but_not_venv_runs_or_data(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert {".venv/", ".venv-mlflow/", "/runs/", ".git/", "test-artifacts/"} <= set(env["excludes"])
    package = tmp_path / "working_dir.zip"
    # What `ray job submit --working-dir .` would upload (without .gitignore's help, so the excludes alone count).
    create_package(str(ROOT), package, include_gitignore=False, excludes=env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {".venv", "runs", ".git", "test-artifacts"}.isdisjoint(tops)
    assert {"lesion", "pipelines", "cluster", "pyproject.toml"} <= tops
    assert "lesion/data/shards.py" in names  # the /data/ exclude must not swallow the lesion.data package
    assert not any("__pycache__" in name for name in names)
    assert package.stat().st_size < 20 * 1024**2


def test_pip_runtime_env_matches_pyproject_and_the_plain_one():
    plain = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    pip = yaml.safe_load((CLUSTER / "runtime_env.pip.yaml").read_text())
    assert pip["excludes"] == plain["excludes"]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pip["pip"]["packages"] == [d for d in dependencies if not d.startswith("ray")]


def test_dockerfile_builds_on_the_ray_version_and_copies_existing_paths():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{_ray_version()}-py3") and base.endswith("-gpu")
    copies = re.findall(r"^COPY(?:\s+--\S+)*\s+(.+?)\s+\S+$", text, re.MULTILINE)
    sources = [source for line in copies for source in line.split()]
    assert {"pyproject.toml", "lesion", "pipelines", "cluster"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"cluster/Dockerfile copies {source}, which does not exist"
    assert "pip install --no-cache-dir ." in text
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored


# --- cluster launcher --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_follows_rays_schema_with_a_cpu_head_and_gpu_workers(name):
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / name).read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in config, f"{name}: {key} missing"
    assert config["provider"]["type"] == name.split(".")[0]
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert config["docker"]["image"] == IMAGE

    def gpus(node: dict) -> int:
        node_config = node["node_config"]
        if "guestAccelerators" in node_config:  # GCP
            return sum(a["acceleratorCount"] for a in node_config["guestAccelerators"])
        instance = node_config.get("InstanceType", "")  # AWS: GPU families g*/p*
        return node.get("resources", {}).get("GPU", 1 if re.match(r"^[gp]\d", instance) else 0)

    assert gpus(head) == 0
    assert workers and all(gpus(w) >= 1 for w in workers)
    assert sum(w["max_workers"] for w in workers) <= config["max_workers"]
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands",
                                                                      "worker_start_ray_commands"))


# --- KubeRay -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KUBERAY_FILES))
def test_kuberay_manifest_matches_the_crd_shape(name):
    doc = _kuberay(name)
    jsonschema.validate(doc, KUBERAY_SCHEMAS[KUBERAY_FILES[name]])
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"]["mode"] == "token"
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    assert {c["image"] for pod in pods for c in pod["spec"]["containers"]} == {IMAGE}
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    for group in spec["workerGroupSpecs"]:
        assert group.get("minReplicas", 0) <= group["replicas"] <= group.get("maxReplicas", group["replicas"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}: worker group {group['groupName']} has no GPU"


def test_kuberay_schema_rejects_a_misspelt_field():
    doc = _kuberay("raycluster.yaml")
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")
    with pytest.raises(jsonschema.ValidationError, match="workerGroupSpec"):
        jsonschema.validate(doc, KUBERAY_SCHEMAS["RayCluster"])


def test_rayjob_runs_the_ham10000_workflow_on_the_shared_volume():
    entrypoint = _kuberay("rayjob.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["lesion", "run"]
    config = entrypoint[entrypoint.index("--config") + 1]
    assert config == "/home/ray/lesion/cluster/configs/ham10000.yaml"  # where cluster/Dockerfile puts the project
    assert entrypoint[entrypoint.index("--run") + 1].startswith("/mnt/lesion/")
    load_config(CLUSTER / "configs" / "ham10000.yaml")


def test_rayservice_serves_the_lesion_application_of_the_serve_config():
    from ray.serve.schema import ServeDeploySchema

    service = _kuberay("rayservice.yaml")
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    source = ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / "serve" / "lesion.yaml").read_text()))
    (app,), (source_app,) = embedded.applications, source.applications
    assert (app.name, app.import_path, app.route_prefix) == (source_app.name, source_app.import_path,
                                                             source_app.route_prefix)
    assert set(app.args) <= set(source_app.args) | {"config", "gpus_per_replica"}
    served = app.args["models"]
    assert set(served) == set(load_config(CLUSTER / "configs" / "ham10000.yaml").train.models)
    names = {d.name for d in app.deployments}
    assert names == {"LesionApi", "GradCamDeployment"} | {f"model_{m}" for m in served}
    assert all(d.ray_actor_options.num_gpus > 0 for d in app.deployments if d.name.startswith("model_"))
    assert app.args["run"] == _kuberay("rayjob.yaml")["spec"]["entrypoint"].split("--run ")[1].split()[0]


def test_registry_rayservice_serves_a_registered_model_with_the_serve_configs_application():
    from ray.serve.schema import ServeDeploySchema

    from lesion.mlflow_model import REGISTRY_URI
    from pipelines.serve import app_builder

    service = _kuberay("rayservice-registry.yaml")
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications
    (source_app,) = ServeDeploySchema.model_validate(
        yaml.safe_load((CLUSTER / "serve" / "lesion.yaml").read_text())).applications
    assert (app.name, app.import_path, app.route_prefix) == (source_app.name, source_app.import_path,
                                                             source_app.route_prefix)
    assert REGISTRY_URI.fullmatch(app.args["model_uri"]) and "run" not in app.args
    with pytest.raises(ValueError, match="unknown \\[\\]"):  # the builder takes these args (and needs one source)
        app_builder({**app.args, "run": "also-a-run"})
    assert any(p.startswith("mlflow") for p in app.runtime_env["pip"])  # the image carries no mlflow client
    assert {d.name for d in app.deployments} <= {"LesionApi", "GradCamDeployment"}
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod, where replicas download the model, knows the registry
        env = {e["name"] for c in pod["spec"]["containers"] for e in c.get("env", [])}
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN"} <= env
