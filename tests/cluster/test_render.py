"""``dsl cluster render``: every definition checked by its consumer's own rules.

KubeRay manifests against the openAPIV3Schema of the pinned KubeRay release's CRDs
(tests/data/kuberay, made strict like ``kubectl apply``'s server-side field validation), the
``ray up`` config with Ray's own ``prepare_config`` + ``validate_config``, every ``dsl`` command
line with dsl's own parser and config loader. No cluster is started: all of it runs in-process.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from argparse import Namespace
from pathlib import Path

import jsonschema
import pytest
import yaml

import dsl.cli as cli
from cluster import render
from dsl.contracts.config import ClusterConfig, ConfigError, check_cron, load_config, quantity_value

KUBERAY = Path(__file__).resolve().parents[1] / "data" / "kuberay"
# KubeRay's own name limits (ray-operator/controllers/ray/utils/constant.go, v1.7.0)
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
PLURAL = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
PLANTED = "planted-Secret-Value-7f3a9c"

def _strict(node):
    """The schema with unknown fields refused where Kubernetes refuses them (strict field validation).

    A structural CRD schema prunes unknown fields silently; ``kubectl apply`` (server-side field
    validation, default Strict since Kubernetes 1.27) reports them as errors, as this does.
    """
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


_SCHEMAS: dict[str, dict] = {}


def crd_schema(kind: str) -> dict:
    """The vendored, strict openAPIV3Schema of ``kind``."""
    if kind not in _SCHEMAS:
        schema = json.loads((KUBERAY / f"{PLURAL[kind]}.schema.json").read_text())
        assert schema["x-dsl-source"]["kind"] == kind
        _SCHEMAS[kind] = _strict(schema)
    return _SCHEMAS[kind]


def crd_errors(doc: dict) -> list[str]:
    """Every way ``doc`` breaks its CRD's schema and KubeRay's object-name rule."""
    kind = doc["kind"]
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft4Validator(crd_schema(kind)).iter_errors(doc)]
    name = doc["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME[kind]:
        errors.append(f"metadata/name: {name!r} is not a DNS-1035 label of at most {MAX_NAME[kind]}")
    if doc["apiVersion"] != "ray.io/v1":
        errors.append(f"apiVersion {doc['apiVersion']}")
    return errors


def rich() -> ClusterConfig:
    """Every optional part switched on."""
    return ClusterConfig(name="nightly-pretrain-is-36-characters-ok", namespace="ml", image="ghcr.io/org/dsl:1.2",
                         service_account="dsl-runner", secret_name="dsl-credentials", time_zone="Europe/Berlin",
                         schedule="30 1 * * MON-FRI", active_deadline_s=86400,
                         command=["finetune", "--config", "configs/finetune/tiny.yaml", "finetune.seed=3"],
                         gpu_workers={"min_replicas": 1, "max_replicas": 8, "gpus_per_worker": 8, "cpu": "90",
                                      "memory": "1000Gi", "shm_size": "200Gi"},
                         launcher={"availability_zone": "us-west-2a,us-west-2b", "max_workers": 8})


CONFIGS = {"defaults": ClusterConfig, "rich": rich,
           "cpu-only": lambda: ClusterConfig(gpu_workers={"gpus_per_worker": 0}, head={"ray_cpus": None})}
K8S_KINDS = ("raycluster", "rayjob", "raycronjob")


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", K8S_KINDS)
def test_manifests_validate_against_the_kuberay_crds(kind, config):
    doc = render.render(CONFIGS[config](), kind)
    assert crd_errors(doc) == []
    assert yaml.safe_load(render.to_yaml(doc)) == doc  # the YAML is the dict


def test_the_crd_check_is_not_vacuous():
    doc = render.raycluster(rich())
    for path, value in [(("spec", "enableInTreeAutoScaling"), True),  # a typo'd key
                        (("spec", "workerGroupSpecs", 0, "maxReplicas"), "8"),  # a wrong type
                        (("spec", "headGroupSpec", "template", "spec", "containers", 0, "envFrom", 0, "secretRef",
                          "key"), "x")]:
        bad = copy.deepcopy(doc)
        node = bad
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        assert crd_errors(bad), path
    no_entrypoint = render.rayjob(rich())
    del no_entrypoint["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert crd_errors(no_entrypoint)
    too_long = render.raycronjob(rich())
    too_long["metadata"]["name"] += "x"
    assert any("DNS-1035" in e for e in crd_errors(too_long))


def test_the_raycluster_autoscales_gpu_workers_with_a_sized_dev_shm():
    spec = render.raycluster(rich())["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # the dashboard stays inside the cluster
    assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    (group,) = spec["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (1, 8, 1)
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"cpu": "90", "memory": "1000Gi", "nvidia.com/gpu": 8}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "200Gi"}}]
    assert container["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    for p in (pod, spec["headGroupSpec"]["template"]["spec"]):
        assert p["serviceAccountName"] == "dsl-runner"
        assert p["containers"][0]["envFrom"] == [{"secretRef": {"name": "dsl-credentials"}}]
        assert p["containers"][0]["image"] == "ghcr.io/org/dsl:1.2"
    defaults = render.raycluster(ClusterConfig())["spec"]
    assert "serviceAccountName" not in defaults["headGroupSpec"]["template"]["spec"]
    assert "envFrom" not in defaults["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_the_rayjob_runs_the_dsl_command_on_a_cluster_of_its_own():
    cfg = ClusterConfig(command=["pretrain", "--config", "my configs/it's.yaml", "data.shards=s3://b/x y"])
    spec = render.rayjob(cfg)["spec"]
    assert shlex.split(spec["entrypoint"]) == ["dsl", *cfg.command]  # quoting survives the shell
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    assert spec["rayClusterSpec"] == render.ray_cluster_spec(cfg)
    assert "activeDeadlineSeconds" not in spec and render.rayjob(rich())["spec"]["activeDeadlineSeconds"] == 86400
    cron = render.raycronjob(rich())["spec"]
    assert (cron["schedule"], cron["timeZone"]) == ("30 1 * * MON-FRI", "Europe/Berlin")
    assert cron["jobTemplate"] == render.ray_job_spec(rich())


def _dsl_commands(doc: dict) -> list[list[str]]:
    spec = doc["spec"].get("jobTemplate", doc["spec"])
    return [shlex.split(spec["entrypoint"])] if "entrypoint" in spec else []


@pytest.mark.parametrize("config", CONFIGS)
def test_every_dsl_command_parses_and_loads_its_config_with_dsl_itself(config):
    docs = [render.render(CONFIGS[config](), kind) for kind in K8S_KINDS]
    commands = [argv for doc in docs for argv in _dsl_commands(doc)]
    assert len(commands) == 2
    for argv in commands:
        assert argv[0] == "dsl"
        args = cli.build_parser().parse_args(argv[1:])
        command = cli.BY_NAME[args.command]
        assert callable(cli.resolve(command.run))  # the function it names exists
        cli.load(command, args)  # the config file and overrides of the command load


def test_a_command_dsl_does_not_know_is_caught_by_the_parser_check():
    argv = shlex.split(render.rayjob(ClusterConfig(command=["pretrian", "--config", "x.yaml"]))["spec"]["entrypoint"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("config", CONFIGS)
def test_the_launcher_config_passes_rays_own_validation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = CONFIGS[config]()
    doc = render.launcher(cfg)
    assert yaml.safe_load(render.to_yaml(doc)) == doc
    prepared = prepare_config(copy.deepcopy(doc))  # what `ray up` does before validating
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    gpu = prepared["available_node_types"][cfg.gpu_workers.group_name]
    assert (gpu["min_workers"], gpu["max_workers"]) == (cfg.gpu_workers.min_replicas, cfg.gpu_workers.max_replicas)
    assert prepared["docker"]["image"] == cfg.image
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # never on a public interface
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head  # else the head launches no workers
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert "--node-ip-address=" in commands[-1]
    size = next(o for o in prepared["docker"]["worker_run_options"] if o.startswith("--shm-size="))
    assert size == f"--shm-size={16 * 2**30 if config != 'rich' else 200 * 2**30}b"


def test_rays_validation_is_not_vacuous():
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = render.launcher(rich())
    doc["max_workers"] = 0  # below the GPU group's min_workers
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(doc))
    doc = render.launcher(rich())
    doc["docker"]["image_name"] = "x"
    with pytest.raises(Exception, match="image_name"):
        validate_config(prepare_config(doc))


def test_no_secret_value_reaches_any_definition(monkeypatch, capsys, tmp_path):
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "dsl-credentials"):
        monkeypatch.setenv(var, PLANTED)
    cfg = Namespace(cluster=rich())
    for kind in render.KINDS:
        assert render.command(cfg, Namespace(kind=kind, out=None)) == 0
        out = tmp_path / f"{kind}.yaml"
        assert render.command(cfg, Namespace(kind=kind, out=str(out))) == 0
        printed = capsys.readouterr().out
        assert printed == out.read_text() and printed.startswith(("apiVersion", "cluster_name"))
        assert PLANTED not in printed
        if kind != "launcher":
            assert "name: dsl-credentials" in printed  # only the Secret's name


@pytest.mark.parametrize("text", ["0 2 * * *", "*/15 * * * *", "0 0 1,15 * ?", "5-10/2 8-18 * JAN-MAR mon-fri",
                                  "59 23 31 12 6", "0 0 * * SUN"])
def test_good_cron_schedules(text):
    assert check_cron(text) == text


@pytest.mark.parametrize("text, says", [
    ("0 2 * *", "has 4 fields"), ("0 2 * * * *", "has 6 fields"), ("60 * * * *", "minute 60 is out of range 0-59"),
    ("0 24 * * *", "hour 24"), ("0 0 0 * *", "day-of-month 0"), ("0 0 * 13 *", "month 13"),
    ("0 0 * * 7", "day-of-week 7"), ("*/0 * * * *", "step '0'"), ("0 5-1 * * *", "runs backwards"),
    ("0 x * * *", "hour 'x' is not a number"), ("CRON_TZ=UTC 0 2 * * *", "cluster.time_zone"),
    ("? * * * *", "minute '?'"), ("", "has 0 fields")])
def test_bad_cron_schedules_are_one_line_naming_the_key(text, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"cluster.schedule={json.dumps(text)}"])
    (line,) = [line for line in str(e.value).splitlines() if "cluster.schedule" in line]
    assert says in line, line


@pytest.mark.parametrize("override, key, says", [
    ("cluster.gpu_workers.min_replicas=5", "cluster.gpu_workers", "min_replicas 5 is greater than max_replicas 4"),
    ("cluster.gpu_workers.max_replicas=-1", "cluster.gpu_workers.max_replicas", "greater than or equal to 0"),
    ("cluster.gpu_workers.shm_size=64Gi", "cluster.gpu_workers", "shm_size 64Gi must be less than memory 64Gi"),
    ("cluster.gpu_workers.memory=lots", "cluster.gpu_workers.memory", "not a Kubernetes quantity"),
    ("cluster.launcher.max_workers=0", "cluster", "launcher.max_workers 0 is less than gpu_workers.min_replicas 1"),
    ("cluster.command=[dsl,pretrain]", "cluster.command", "the arguments after `dsl`"),
    ("cluster.time_zone=Mars/Olympus", "cluster.time_zone", "not an IANA time zone"),
    ("cluster.name=Nightly_Run", "cluster.name", "should match pattern"),
])
def test_bad_cluster_values_are_one_line_naming_the_key(override, key, says):
    extra = ["cluster.gpu_workers.min_replicas=1"] if "launcher" in override else []
    with pytest.raises(ConfigError) as e:
        load_config(None, [*extra, override])
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(f"{key}: ") and says in lines[1], lines


def test_dsl_cluster_render_end_to_end(capsys, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("cluster:\n  name: nightly\n  secret_name: creds\n  gpu_workers: {max_replicas: 2}\n")
    # overrides before the options: argparse hands out all positionals of a run at once (below)
    assert cli.main(["cluster", "render", "cluster.schedule=0 3 * * *", "--kind", "raycronjob",
                     "--config", str(config)]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert crd_errors(doc) == [] and doc["spec"]["schedule"] == "0 3 * * *"
    assert doc["metadata"]["name"] == "nightly"
    assert doc["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] == 2
    assert cli.main(["cluster", "render", "--kind", "launcher", "--out", str(tmp_path / "up.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "up.yaml").read_text())["cluster_name"] == "dsl"
    assert cli.main(["cluster", "render", "cluster.schedule=0 2 * *", "--kind", "rayjob"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "cluster.schedule: Value error, '0 2 * *' has 4 fields" in err
    assert cli.main(["cluster", "render", "data.batch_size=3", "--kind", "rayjob"]) == 2  # not its section
    with pytest.raises(SystemExit):
        cli.main(["cluster", "render", "--kind", "rayservice"])


def test_overrides_after_the_options(capsys):
    """``dsl cluster render --kind K key=value``: argparse matches the positionals ``render`` and
    ``overrides`` (nargs="*", empty) together, so a later ``key=value`` is left over; dsl.cli.main
    adds leftover ``key=value`` tokens to the overrides, and refuses any other leftover."""
    assert cli.main(["cluster", "render", "--kind", "rayjob", "cluster.name=later"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["metadata"]["name"] == "later"
    with pytest.raises(SystemExit) as e:
        cli.main(["cluster", "render", "--kind", "rayjob", "cluster.name=x", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: cluster.name=x stray" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("500m", 0.5), ("16Gi", 16 * 2**30), ("1.5G", 1.5e9), ("2", 2.0),
                                         ("1e3", 1000.0), ("512Mi", 512 * 2**20), ("100k", 1e5)])
def test_quantities_read_as_kubernetes_reads_them(text, value):
    assert quantity_value(text) == pytest.approx(value)


def test_a_quantity_must_be_positive_and_shm_below_memory():
    assert ClusterConfig(gpu_workers={"memory": "1Gi", "shm_size": "512Mi", "cpu": "500m"}).gpu_workers.cpu == "500m"
    with pytest.raises(ValueError, match="must be more than 0"):
        ClusterConfig(head={"cpu": "0"})
    with pytest.raises(ValueError, match="shm_size 2000M must be less than memory 1Gi"):
        ClusterConfig(gpu_workers={"memory": "1Gi", "shm_size": "2000M"})
