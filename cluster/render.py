"""Cluster definitions rendered from the ``cluster`` config section, the ecosystem's way.

One section (:class:`~dsl.contracts.config.ClusterConfig`), four outputs, all plain dicts
dumped as YAML by ``dsl cluster render --kind KIND``:

- ``raycluster``: a KubeRay ``RayCluster``: a head pod and one autoscaling GPU worker group
  (``enableInTreeAutoscaling``), each worker with a memory-backed ``/dev/shm`` of
  ``gpu_workers.shm_size`` (Docker's and Kubernetes' default is 64 MB: too small for the loader's
  shared memory and Ray's object store);
- ``rayjob``: a ``RayJob`` that creates such a cluster, runs one ``dsl`` command on it
  (``submissionMode: K8sJobMode``, KubeRay's default) and deletes the cluster when it ends;
- ``raycronjob``: a ``RayCronJob`` (``ray.io/v1``, KubeRay >= 1.6, alpha: the operator needs
  ``--feature-gates=RayCronJob=true``, Helm value ``featureGates``) creating that RayJob on
  ``cluster.schedule``;
- ``launcher``: a ``ray up`` cluster config for a cloud (AWS): head and GPU worker node types,
  the same image run in Docker on every node.

Credentials never appear in any of them: pods get the keys of the Secret ``cluster.secret_name``
as environment variables (``envFrom``) and act as ``cluster.service_account`` (e.g. IRSA); ``ray
up`` nodes use their instance role. Nothing here reads the environment.

The dashboard (and with it the Jobs API) is never exposed publicly: on Kubernetes the head's
Service is ``ClusterIP`` (reach it with ``kubectl port-forward svc/<name>-head-svc 8265``); a
``ray up`` head binds the dashboard to 127.0.0.1 (``--dashboard-host=127.0.0.1``; reach it with
``ray dashboard cluster.yaml``, an SSH tunnel, then ``dsl submit --address
http://127.0.0.1:8265``), and every node announces its private address (``--node-ip-address``),
so Ray's ports are used inside the VPC only.
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from dsl.contracts.config import ClusterConfig, quantity_value

KINDS = ("raycluster", "rayjob", "raycronjob", "launcher")
API_VERSION = "ray.io/v1"
# Ray's ports: GCS, dashboard (and Jobs API), Ray client
HEAD_PORTS = ({"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
              {"containerPort": 10001, "name": "client"})
# a node's private address: the first of the host's addresses (the primary interface; Docker's
# bridge comes later). Ray's containers run with --net=host, so this is the VM's.
PRIVATE_IP = "$(hostname -I | awk '{print $1}')"


def entrypoint(argv: list[str]) -> str:
    """The shell command line ``dsl <argv>``, each argument quoted."""
    return shlex.join(["dsl", *argv])


def _metadata(c: ClusterConfig) -> dict[str, Any]:
    return {"name": c.name, "namespace": c.namespace,
            "labels": {"app.kubernetes.io/name": "dsl", "app.kubernetes.io/instance": c.name}}


def _container(c: ClusterConfig, name: str, resources: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": c.image,
        # requests = limits: KubeRay derives Ray's CPU/GPU/memory from them; equal values keep the pod
        # Guaranteed, so the kubelet does not evict a training worker first under node pressure
        "resources": {"requests": dict(resources), "limits": dict(resources)},
    }
    if c.secret_name:
        container["envFrom"] = [{"secretRef": {"name": c.secret_name}}]
    return container


def _pod(c: ClusterConfig, container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": [container], **spec}
    if c.service_account:
        pod["serviceAccountName"] = c.service_account
    return {"metadata": {"labels": {"app.kubernetes.io/name": "dsl", "app.kubernetes.io/instance": c.name}},
            "spec": pod}


def _head(c: ClusterConfig) -> dict[str, Any]:
    h = c.head
    container = _container(c, "ray-head", {"cpu": h.cpu, "memory": h.memory})
    container["ports"] = [dict(p) for p in HEAD_PORTS]
    start = {} if h.ray_cpus is None else {"num-cpus": str(h.ray_cpus)}
    return {"serviceType": "ClusterIP", "rayStartParams": start, "template": _pod(c, container)}


def _gpu_workers(c: ClusterConfig) -> dict[str, Any]:
    w = c.gpu_workers
    resources: dict[str, Any] = {"cpu": w.cpu, "memory": w.memory}
    spec: dict[str, Any] = {}
    if w.gpus_per_worker:
        resources[w.gpu_resource] = w.gpus_per_worker
        # GPU node pools are commonly tainted so that only pods asking for GPUs land there
        spec["tolerations"] = [{"key": w.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    container = _container(c, "ray-worker", resources)
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": w.shm_size}}]
    return {"groupName": w.group_name, "replicas": w.min_replicas, "minReplicas": w.min_replicas,
            "maxReplicas": w.max_replicas, "rayStartParams": {}, "template": _pod(c, container, **spec)}


def ray_cluster_spec(c: ClusterConfig) -> dict[str, Any]:
    """The ``RayClusterSpec``: head, autoscaling GPU workers, the Ray version of the image."""
    return {
        "rayVersion": c.ray_version,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": c.gpu_workers.idle_timeout_s},
        "headGroupSpec": _head(c),
        "workerGroupSpecs": [_gpu_workers(c)],
    }


def raycluster(c: ClusterConfig) -> dict[str, Any]:
    """A KubeRay ``RayCluster`` that stays up (``dsl submit`` jobs to it)."""
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _metadata(c), "spec": ray_cluster_spec(c)}


def ray_job_spec(c: ClusterConfig) -> dict[str, Any]:
    """The ``RayJobSpec``: ``dsl <cluster.command>`` on a cluster of its own, deleted when it ends."""
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(c.command),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": c.ttl_seconds_after_finished,
        # a failed dsl job is not retried on a fresh cluster: training resumes from its checkpoints
        # when the schedule (or a person) runs it again
        "backoffLimit": 0,
        "rayClusterSpec": ray_cluster_spec(c),
    }
    if c.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = c.active_deadline_s
    return spec


def rayjob(c: ClusterConfig) -> dict[str, Any]:
    """A KubeRay ``RayJob`` running ``dsl <cluster.command>`` once."""
    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(c), "spec": ray_job_spec(c)}


def raycronjob(c: ClusterConfig) -> dict[str, Any]:
    """A KubeRay ``RayCronJob`` creating the RayJob on ``cluster.schedule``."""
    spec: dict[str, Any] = {"schedule": c.schedule}
    if c.time_zone is not None:
        spec["timeZone"] = c.time_zone
    spec["jobTemplate"] = ray_job_spec(c)
    return {"apiVersion": API_VERSION, "kind": "RayCronJob", "metadata": _metadata(c), "spec": spec}


def _node_config(instance_type: str, disk_gb: int) -> dict[str, Any]:
    return {"InstanceType": instance_type,
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": disk_gb, "VolumeType": "gp3"}}]}


def launcher(c: ClusterConfig) -> dict[str, Any]:
    """A ``ray up`` cluster config: the head and the autoscaling GPU workers on AWS, in the image."""
    lc, w = c.launcher, c.gpu_workers
    provider: dict[str, Any] = {"type": lc.provider, "region": lc.region, "cache_stopped_nodes": False}
    if lc.availability_zone:
        provider["availability_zone"] = lc.availability_zone
    ulimit = "ulimit -n 65536"
    return {
        "cluster_name": c.name,
        "max_workers": w.max_replicas if lc.max_workers is None else lc.max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": max(1, math.ceil(w.idle_timeout_s / 60)),
        "provider": provider,
        "auth": {"ssh_user": lc.ssh_user},
        "docker": {
            "image": c.image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
            # the same /dev/shm as on Kubernetes (Ray would otherwise size it from free memory)
            "worker_run_options": [f"--shm-size={int(quantity_value(w.shm_size))}b"],
        },
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {} if c.head.ray_cpus is None else {"CPU": c.head.ray_cpus},
                     "node_config": _node_config(lc.head_instance_type, lc.disk_gb)},
            w.group_name: {"min_workers": w.min_replicas, "max_workers": w.max_replicas, "resources": {},
                           "node_config": _node_config(lc.gpu_instance_type, lc.disk_gb)},
        },
        "file_mounts": {},
        "setup_commands": [],  # the image has everything
        "head_start_ray_commands": [
            "ray stop",
            f"{ulimit}; ray start --head --port=6379 --object-manager-port=8076 "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml --node-ip-address={PRIVATE_IP} "
            "--dashboard-host=127.0.0.1",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"{ulimit}; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076 "
            f"--node-ip-address={PRIVATE_IP}",
        ],
    }


RENDERERS = {"raycluster": raycluster, "rayjob": rayjob, "raycronjob": raycronjob, "launcher": launcher}


def render(c: ClusterConfig, kind: str) -> dict[str, Any]:
    """The definition of ``kind`` (one of :data:`KINDS`) as a plain dict."""
    return RENDERERS[kind](c)


def to_yaml(doc: dict[str, Any]) -> str:
    """``doc`` as YAML, keys in the order written (apiVersion, kind, metadata, spec)."""
    # no line folding: a shell command stays on one line (folded, it is the same string, but hard to read)
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=2**31 - 1)


def command(cfg, args) -> int:
    """``dsl cluster render --kind KIND [--out FILE]``: the definition on stdout or in FILE."""
    text = to_yaml(render(cfg.cluster, args.kind))
    if getattr(args, "out", None):
        Path(args.out).write_text(text)
        print(f"wrote {args.kind} {cfg.cluster.name} to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
