"""The Helm chart, rendered by a real helm: for its defaults and for the planner's values of
both presets, checked against KubeRay's CRD schema, the Kubernetes schemas, Ray Serve's own
config schema and our AppConfig."""

import base64
import importlib
import json
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_tool import CHART, ToolUnavailable, crd_schema, helm_binary, kuberay_crds

from cluster.serve import app_config

RELEASE, NAMESPACE = "mixtral", "llm"
NAME = "mixtral-moe-serve"
VALUES = ["default", "mixtral-8x7b", "mixtral-8x22b"]
KUBE_VERSIONS = ["1.25", kubernetes_validate.latest_version()]


@pytest.fixture(scope="session")
def helm():
    try:
        return str(helm_binary())
    except ToolUnavailable as e:
        pytest.skip(f"no helm binary: {e}")


@pytest.fixture(scope="session")
def values_files(tmp_path_factory) -> dict[str, list[str]]:
    """helm's -f arguments per case: none for the defaults, the planner's file for a preset."""
    out = {"default": []}
    for name in VALUES[1:]:
        path = tmp_path_factory.mktemp("plan") / f"{name}.yaml"
        context = "32768" if name == "mixtral-8x7b" else "65536"
        r = subprocess.run([sys.executable, "-m", "cluster.tools.cli", "plan", "--preset", name,
                            "--gpu-memory", "80GiB",
                            "--context", context, "--concurrency", "16", "--values-out", str(path)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out[name] = ["-f", str(path)]
    return out


def template(helm, *args) -> subprocess.CompletedProcess:
    return subprocess.run([helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
                          capture_output=True, text=True, timeout=60)


def render(helm, *args) -> dict[str, dict]:
    r = template(helm, *args)
    assert r.returncode == 0, r.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(r.stdout) if d}


@pytest.fixture(scope="session")
def rendered(helm, values_files) -> dict[str, dict[str, dict]]:
    return {case: render(helm, *args) for case, args in values_files.items()}


def serve_config(docs) -> dict:
    return yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])


def groups(docs) -> dict[str, dict]:
    return {g["groupName"]: g for g in docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_lint_strict(helm, values_files):
    for args in values_files.values():
        r = subprocess.run([helm, "lint", "--strict", str(CHART), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("case", VALUES)
def test_ray_cluster_layout(rendered, case):
    docs = rendered[case]
    assert set(docs) == {"RayService", "Service", "ConfigMap", "Secret"}
    rs = docs["RayService"]
    assert rs["apiVersion"] == "ray.io/v1" and rs["metadata"]["name"] == NAME
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (head_c,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in json.dumps(head_c.get("resources", {}))
    assert {(p["name"], p["containerPort"]) for p in head_c["ports"]} >= {
        ("serve", 8000), ("serve-grpc", 9000), ("dashboard", 8265), ("gcs", 6379), ("client", 10001)}
    for name, resource in (("attention", "attention_node"), ("experts", "expert_node")):
        g = groups(docs)[name]
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (c,) = g["template"]["spec"]["containers"]
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        # ray start gets --resources through a shell: a JSON object inside double quotes.
        raw = g["rayStartParams"]["resources"]
        assert raw.startswith('"') and json.loads(json.loads(raw)) == {resource: gpus}
        assert {p["name"] for p in c["ports"]} >= {"serve", "serve-grpc"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # Ray's pydantic models, not ours
@pytest.mark.parametrize("case", VALUES)
def test_serve_config_is_ours_and_rays(rendered, case):
    from cluster.serve.builder import GRPC_SERVICERS
    from cluster.serve.builder import serve_config as ours

    sc = serve_config(rendered[case])
    assert sc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert sc["grpc_options"] == {"port": 9000, "grpc_servicer_functions": GRPC_SERVICERS}
    (app,) = sc["applications"]
    cfg = app_config.decode(app["args"], "serveConfigV2 args")
    # The same application `moe-serve up` deploys (cluster.serve.builder.serve_config).
    want = ours(cfg, cfg.model or "/m")["applications"][0]
    assert (app["name"], app["route_prefix"]) == ("moe-serve", "/")
    assert app["import_path"] == want["import_path"] == "cluster.serve.builder:app_builder"
    assert set(app) == set(want)
    if "autoscaling_policy" in want:
        policy = app["autoscaling_policy"]
        assert policy["policy_function"] == want["autoscaling_policy"]["policy_function"]
        assert app_config.decode(policy["policy_kwargs"]["config"]) == cfg
    if case != "default":
        assert cfg.expert_device == "cuda" and cfg.attention.engine.kv_cache_bytes > 0
    from ray.serve.schema import ServeDeploySchema
    ServeDeploySchema.model_validate(sc)


@pytest.mark.parametrize("case", VALUES)
def test_worker_groups_hold_what_serve_asks_for(rendered, case):
    """Every replica asks for a resource its group offers, and the groups can grow to hold
    each deployment at its most replicas (the autoscaling policy's max where it is on)."""
    docs = rendered[case]
    cfg = app_config.decode(serve_config(docs)["applications"][0]["args"])
    offers = {name: json.loads(json.loads(g["rayStartParams"]["resources"])) for name, g in groups(docs).items()}
    auto = cfg.autoscaling if cfg.autoscaling.enabled else None

    att = cfg.attention
    assert set(att.resources) == set(offers["attention"]) and att.num_gpus >= 1
    most = max(att.replicas, auto.attention.max_replicas) if auto else att.replicas
    assert most * att.num_gpus <= groups(docs)["attention"]["maxReplicas"] * offers["attention"]["attention_node"]

    gpus = 0
    for spec in app_config.resolve_groups(cfg, 8):
        assert set(spec.resources) == set(offers["experts"]) and spec.num_gpus >= 1
        most = max(spec.replicas, app_config.group_scaling(cfg, spec).max_replicas) if auto else spec.replicas
        gpus += most * spec.num_gpus
    assert gpus <= groups(docs)["experts"]["maxReplicas"] * offers["experts"]["expert_node"]


def test_import_paths_resolve(rendered):
    (app,) = serve_config(rendered["default"])["applications"]
    names = [app["import_path"], app["autoscaling_policy"]["policy_function"],
             *serve_config(rendered["default"])["grpc_options"]["grpc_servicer_functions"]]
    for name in names:
        module, _, attr = name.replace(":", ".").rpartition(".")
        found = importlib.import_module(module)
        assert callable(getattr(found, attr, None)), name


def test_autoscaling_off_leaves_the_policy_out(helm):
    (app,) = serve_config(render(helm, "--set", "serve.config.autoscaling.enabled=false"))["applications"]
    assert "autoscaling_policy" not in app and app["args"]["autoscaling"]["enabled"] is False


def test_ports_move_together(helm):
    """serve.config may repeat the chart's ports (a config file shared with `moe-serve up`)."""
    docs = render(helm, "--set", "ports.http=8080", "--set", "serve.config.http_port=8080")
    assert serve_config(docs)["http_options"]["port"] == 8080
    (head,) = [c for c in docs["RayService"]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
               ["containers"] if c["name"] == "ray-head"]
    assert {"name": "serve", "containerPort": 8080} in head["ports"]


@pytest.mark.parametrize("case", VALUES)
def test_rayservice_matches_the_kuberay_crd(rendered, case):
    crds = kuberay_crds()
    if crds is None:
        pytest.skip("no KubeRay CRDs: set MOE_SERVE_KUBERAY_CRDS to a folder with ray.io_rayservices.yaml")
    validator = jsonschema.Draft7Validator(crd_schema(crds, "RayService"))
    rs = rendered[case]["RayService"]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rs)]
    assert errors == []
    # The check has teeth: a misspelt field and a wrong type are both caught.
    bad = json.loads(json.dumps(rs))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    assert len(list(validator.iter_errors(bad))) == 2


@pytest.mark.parametrize("case", VALUES)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_core_objects_and_pod_templates_validate(rendered, case, version):
    docs = rendered[case]
    for kind in ("Service", "ConfigMap", "Secret"):
        kubernetes_validate.validate(docs[kind], version, strict=True)
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    for spec in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        t = spec["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray", **t["metadata"]}, "spec": t["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)


def test_dashboards_ship_as_one_labelled_configmap(rendered):
    cm = rendered["default"]["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = sorted(p.name for p in (CHART / "dashboards").glob("*.json"))
    assert "moe-serve.json" in files and sorted(cm["data"]) == files
    for text in cm["data"].values():
        assert json.loads(text)["title"]


def pods(docs):
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    return [s["template"]["spec"] for s in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]


def test_weights_from_a_pvc_or_an_object_store(helm):
    docs = render(helm, "--set", "model.pvc.claimName=mixtral-weights", "--set", "model.subPath=Mixtral-8x7B-v0.1")
    assert serve_config(docs)["applications"][0]["args"]["model"] == "/models/Mixtral-8x7B-v0.1"
    for spec in pods(docs):
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "mixtral-weights", "readOnly": True}} \
            in spec["volumes"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in spec["containers"][0]["volumeMounts"]
        assert "initContainers" not in spec

    docs = render(helm, "--set", "model.uri=s3://weights/Mixtral-8x7B-v0.1", "--set", "model.subPath=m")
    for spec in pods(docs):
        (init,) = spec["initContainers"]
        env = {e["name"]: e.get("value") for e in init["env"]}
        assert env == {"MODEL_URI": "s3://weights/Mixtral-8x7B-v0.1", "MODEL_DIR": "/models/m"}
        assert "$(MODEL_URI)" in init["command"] and {"name": "model", "emptyDir": {}} in spec["volumes"]

    # A model the config names itself wins over the mount.
    docs = render(helm, "--set", "model.pvc.claimName=w", "--set", "serve.config.model=/models/x/y")
    assert serve_config(docs)["applications"][0]["args"]["model"] == "/models/x/y"


def test_monitors_scrape_the_front_door_once(helm):
    r = template(helm, "--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.podMonitor.enabled=true")
    assert r.returncode == 0, r.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(r.stdout) if d}
    sm, pm = docs["ServiceMonitor"], docs["PodMonitor"]
    assert sm["apiVersion"] == pm["apiVersion"] == "monitoring.coreos.com/v1"
    # KubeRay's labels on the <name>-serve-svc it creates.
    assert sm["spec"]["selector"]["matchLabels"] == {"ray.io/originated-from-cr-name": NAME,
                                                    "ray.io/serve": f"{NAME}-serve"}
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"]) == ("serve", "/metrics")
    assert ep["relabelings"][0]["regex"] == "head" and ep["relabelings"][0]["action"] == "keep"
    (pep,) = pm["spec"]["podMetricsEndpoints"]
    assert (pep["port"], pep["path"]) == ("serve", "/metrics")
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "head"
    assert {"ServiceMonitor", "PodMonitor"}.isdisjoint(render(helm))


@pytest.mark.parametrize("args,message", [
    (["--set", "workers.attention.gpusPerPod=two"], "gpusPerPod"),
    (["--set", "bogus=1"], "bogus"),
    (["--set", "workers.experts.minReplica=1"], "minReplica"),
    (["--set", "serve.config.attention.num_gpus=one"], "num_gpus"),
    (["--set-json", 'serve.config.expert_groups=[{"experts": []}]'], "expert_groups"),
    (["--set", "workers.experts.nodeResource=gpu_node"], 'offers "gpu_node"'),
    (["--set", "workers.experts.maxReplicas=1", "--set", "workers.experts.minReplicas=1",
      "--set", "workers.experts.replicas=1"], "grows to 1 pods"),
    (["--set", "model.uri=s3://w/m", "--set", "model.pvc.claimName=w"], "exclusive"),
    (["--set", "model.pvc.claimName=w"], "model.subPath"),
    (["--set", "serve.config.http_port=8080"], "serve.config.http_port is 8080 but ports.http is 8000"),
    (["--set", "serve.config.grpc_port=9001"], "serve.config.grpc_port is 9001 but ports.grpc is 9000"),
])
def test_bad_values_are_refused(helm, args, message):
    r = template(helm, *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_notes_say_how_to_call_it(helm):
    r = subprocess.run([helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"port-forward svc/{NAME}-serve-svc 8000:8000" in notes
    assert "curl http://127.0.0.1:8000/v1/completions" in notes and 'base_url="http://127.0.0.1:8000/v1"' in notes


def test_versions_agree():
    """The chart runs the image built from this package, on the Ray the package pins."""
    from importlib.metadata import version

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == version("moe-serve")
    ray_version = values["rayVersion"]
    assert f"rayproject/ray:{ray_version}-py311-gpu" in (CHART.parent.parent / "Dockerfile").read_text()
    assert version("ray").split(".")[:2] == ray_version.split(".")[:2]


def test_every_ray_container_starts_with_the_apps_ray_environment(helm):
    """The proxy and controller read these from the pod's environment; the user's env comes after."""
    from cluster.serve.builder import RAY_ENV

    docs = render(helm, "--set", "env[0].name=HF_HUB_OFFLINE", "--set-string", "env[0].value=1")
    for spec in pods(docs):
        env = [(e["name"], e.get("value")) for e in spec["containers"][0]["env"]]
        assert env == [*RAY_ENV.items(), ("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "4194304"), ("MOE_SERVE_API_KEY", None),
                       ("HF_HUB_OFFLINE", "1")]
    sized = render(helm, "--set", "serve.config.limits.max_body_bytes=1048576")
    for spec in pods(sized):
        assert {"name": "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", "value": "1048576"} in spec["containers"][0]["env"]


def test_the_api_key_comes_from_a_secret_in_every_pod_and_is_required(helm):
    """The proxies listen on every interface, so the app needs a key: the chart's Secret, or the user's."""
    docs = render(helm)
    secret = docs["Secret"]
    key = base64.b64decode(secret["data"]["api-key"]).decode()
    assert len(key) == 40 and key.isalnum()
    for spec in pods(docs):
        env = spec["containers"][0]["env"]
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in env if e["name"] == "MOE_SERVE_API_KEY"]
        assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    mine = render(helm, "--set", "apiKey.existingSecret=vault-synced", "--set", "apiKey.secretKey=token",
                  "--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.podMonitor.enabled=true")
    assert "Secret" not in mine
    for spec in pods(mine):
        assert {"name": "vault-synced", "key": "token"} in [e.get("valueFrom", {}).get("secretKeyRef")
                                                             for e in spec["containers"][0]["env"]]
    # /metrics is behind the key too: both monitors present it.
    for kind, endpoints in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        (ep,) = mine[kind]["spec"][endpoints]
        assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": "vault-synced", "key": "token"}}
    r = template(helm, "--set", "apiKey.create=false")
    assert r.returncode != 0 and "needs an API key" in r.stderr
    assert template(helm, "--set", "apiKey.create=false", "--set-json", 'serve.config.api_keys=["k"]').returncode == 0


def test_workers_are_probed_through_health_and_ready_and_the_head_is_left_to_kuberay(rendered):
    docs = rendered["default"]
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert not {"startupProbe", "livenessProbe", "readinessProbe"} & set(head)
    for g in cluster["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "serve"}
        assert c["livenessProbe"]["httpGet"] == c["startupProbe"]["httpGet"] == {"path": "/health", "port": "serve"}
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800


def test_readiness_can_probe_the_grpc_door_with_the_kubelets_own_grpc_check(helm):
    docs = render(helm, "--set", "probes.readiness.grpc=true", "--set", "ports.grpc=9100",
                  "--set", "serve.config.grpc_port=9100")
    cluster = docs["RayService"]["spec"]["rayClusterConfig"]
    for g in cluster["workerGroupSpecs"]:
        (c,) = g["template"]["spec"]["containers"]
        probe = c["readinessProbe"]
        assert probe["grpc"] == {"port": 9100, "service": "moe_serve.generation.v1.Generation"}
        assert "httpGet" not in probe and "grpc" not in c["livenessProbe"] and probe["periodSeconds"] == 5
    crds = kuberay_crds()
    if crds is not None:
        validator = jsonschema.Draft7Validator(crd_schema(crds, "RayService"))
        assert list(validator.iter_errors(docs["RayService"])) == []
    for version in KUBE_VERSIONS:
        (t := cluster["workerGroupSpecs"][0]["template"])
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ray", **t["metadata"]},
                                      "spec": t["spec"]}, version, strict=True)


def test_expert_groups_start_with_two_replicas_each(rendered):
    cfg = app_config.decode(serve_config(rendered["default"])["applications"][0]["args"])
    assert [g.replicas for g in cfg.expert_groups] == [2, 2] and cfg.autoscaling.experts.min_replicas == 2
    assert groups(rendered["default"])["experts"]["minReplicas"] == 4


def test_expert_tls_secret_is_mounted_and_configured(helm):
    docs = render(helm, "--set", "expertTLS.secretName=experts-tls")
    cfg = app_config.decode(serve_config(docs)["applications"][0]["args"])
    d = "/etc/moe-serve/expert-tls"
    assert (cfg.expert_tls.ca_file, cfg.expert_tls.cert_file, cfg.expert_tls.key_file) == (
        f"{d}/ca.crt", f"{d}/tls.crt", f"{d}/tls.key")
    assert cfg.expert_tls.mutual and cfg.expert_tls.server_name == "moe-serve-experts"
    for spec in pods(docs):
        (vol,) = [v for v in spec["volumes"] if v["name"] == "expert-tls"]
        assert vol["secret"]["secretName"] == "experts-tls"
        assert {"name": "expert-tls", "mountPath": d, "readOnly": True} in spec["containers"][0]["volumeMounts"]
    assert app_config.decode(serve_config(render(helm))["applications"][0]["args"]).expert_tls is None
