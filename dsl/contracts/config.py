"""One typed config tree for every DSL job.

Experiments live in ``configs/**/*.yaml``; any key can be overridden on the command line as
``section.key=value`` (the value is parsed as YAML, so ``data.batch_size=64`` is an int and
``model.s1_bands=[0,1]`` a list). An unknown key or a bad value is an error that names the
file and the dotted key, never a silent default.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the problem."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors and assignments are validated."""

    # extra="forbid" turns a typo into an error instead of a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Scene classification (SCL) classes of Sentinel-2 L2A that make a pixel unusable for pretraining:
# 0 no data, 1 saturated or defective, 3 cloud shadow, 8 cloud medium probability, 9 cloud high
# probability, 10 thin cirrus
SCL_SKIP = [0, 1, 3, 8, 9, 10]
# Asset keys of the Microsoft Planetary Computer collections (sentinel-2-l2a, sentinel-1-rtc);
# Earth Search names S2 assets by colour (blue, green ...): map them in ingest.stac.s2_assets
S2_ASSETS = {b: b if len(b) == 3 else f"B0{b[1]}" for b in
             ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")}


class StacConfig(Section):
    """``ingest.source=stac``: S2 L2A and S1 scenes from a STAC API, paired and cut into patches.

    ``ingest.input`` is a STAC API URL (searched with pystac-client), a stac-geoparquet item table
    (``*.parquet``) or a static catalogue (``catalog.json``/``collection.json``). Each S2 scene is
    paired with the S1 scene that overlaps it closest in time within ``pair_days``; patches are cut
    on the S2 10 m grid, S1 is warped onto each patch.
    """

    s2_collection: str = "sentinel-2-l2a"
    s1_collection: str = "sentinel-1-rtc"
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="area as lon/lat min_x, min_y, max_x, max_y (EPSG:4326)")
    intersects: str | None = Field(None, description="area as a GeoJSON geometry: inline JSON or a "
                                   "file path/URL; with bbox, both must hold")
    datetime: str | None = Field(None, description="RFC 3339 date or interval, e.g. 2020-06-01/2020-08-31")
    max_cloud_cover: float = Field(100.0, ge=0, le=100, description="S2 scenes with a larger "
                                   "eo:cloud_cover are not searched for")
    max_items: int | None = Field(None, ge=1, description="stop the search after this many S2 scenes")
    pair_days: float = Field(6.0, gt=0, description="an S1 scene pairs with an S2 scene when their "
                             "acquisitions are at most this many days apart")
    s2_assets: dict[str, str] = Field(default_factory=lambda: dict(S2_ASSETS), description="S2 band "
                                      "(B1..B12, B8A; no B10) -> asset key")
    scl_asset: str = "SCL"
    s1_assets: dict[str, str] = Field(default_factory=lambda: {"VV": "vv", "VH": "vh"},
                                      description="S1 polarisation -> asset key")
    s1_units: dict[str, Literal["linear", "db"]] = Field(
        default_factory=lambda: {"sentinel-1-rtc": "linear", "sentinel-1-grd": "linear"},
        description="backscatter units of each S1 collection's assets; a collection not listed here "
        "is refused (no guessing): linear power read as dB would pass every type check")
    scl_skip: list[int] = Field(default_factory=lambda: list(SCL_SKIP), description="SCL classes that "
                                "count against a patch (default: no data, saturated, cloud shadow, "
                                "cloud medium/high probability, thin cirrus)")
    max_scl_fraction: float = Field(0.05, ge=0, le=1, description="a patch with more of its pixels in "
                                    "scl_skip classes is skipped (counted by reason in the manifest)")
    max_nodata_fraction: float = Field(0.0, ge=0, le=1, description="a patch with more S1 or S2 nodata "
                                       "pixels than this is skipped; nodata left in a kept patch is "
                                       "filled (S2 0, S1 the patch's median dB)")
    block_patches: int = Field(8, ge=1, description="patches are listed, planned and read in blocks "
                               "of block_patches x block_patches of one scene: a task opens a scene's COGs "
                               "(their headers are ~100 KB each) once per block, not once per patch, and "
                               "the planner still scatters each scene's blocks over all shards")
    retries: int = Field(5, ge=0, description="a transient read error (HTTP 5xx/429, timeout) is "
                         "retried this often with exponential backoff before the scene is quarantined")
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry's wait; doubles per retry")


class IngestConfig(Section):
    """``dsl ingest``: raw rasters -> WebDataset shards + manifest.json."""

    source: Literal["sen12ms", "dfc2020", "bigearthnet", "zarr", "table", "manifest", "stac"] = Field(
        "sen12ms", description="table: a CSV/Parquet pair table of raster URLs (formerly 'manifest'); "
        "stac: Sentinel scenes from a STAC API or item table (ingest.stac)")
    input: str = ""
    output: str = "work/shards"
    prefix: str = Field("pairs", pattern=r"^[A-Za-z0-9_]+$")
    workers: int = Field(2, ge=1, description="Ray tasks run at once")
    address: str | None = Field(None, description="Ray address; None starts a local Ray")
    shard_size_mb: float = Field(256.0, gt=0)
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="0 disables the split")
    shuffle_seed: int = Field(0, description="scatters each split's items over its shards by a hash "
                              "of (seed, key), so no shard is one scene or region; part of the plan")
    hashed_prefixes: bool | None = Field(None, description="shards go under a short hashed folder "
                                         "(<4 hex>/<shard>) to spread object-store request rates over key "
                                         "prefixes; None: on for object stores, off for local paths")
    tile_size: int = Field(256, ge=8, description="samples are cut into non-overlapping tiles of this "
                           "edge (keys <key>_r<row>_c<col>, edges that do not fill a tile dropped); a "
                           "sample smaller than one tile is kept whole")
    encoding: Literal["compact", "plain"] = Field(
        "compact", description="compact: s1.blosc (int16 fixed-point dB, within 0.01 dB) and s2.blosc "
        "(lossless); plain: float32 s1.npy and uint16 s2.npy as format 1 wrote them")
    progress: bool = True
    stac: StacConfig = StacConfig()


class DataConfig(Section):
    """Streaming pairs from shards for training."""

    shards: str = "work/shards"
    split: str | None = Field(None, description="train/val when ingested with a split")
    batch_size: int = Field(64, ge=1, description="per worker (rank)")
    crop_size: int = Field(128, ge=8)
    shuffle_block: int = Field(262_144, ge=1, description="training order: shards in a seeded order, "
                               "their samples shuffled within blocks of this many (a global batch draws "
                               "from one block); the order is the same for any ranks, workers and batch size")
    loader_workers: int = Field(2, ge=0)
    read_retries: int = Field(6, ge=0, description="a failed shard read is retried this often (reopened "
                              "at its offset, exponential backoff) before its shard is skipped for the job")
    read_backoff_s: float = Field(0.5, ge=0, description="first retry's wait; doubles per retry")
    read_max_backoff_s: float = Field(20.0, ge=0, description="longest wait between retries")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="samples dropped as bad (a shard that "
                                    "fails its checks, an undecodable sample, non-finite or out-of-range "
                                    "values) beyond this fraction of those read stop the job with an error")
    s1_range: tuple[float, float] = Field((-100.0, 60.0), description="valid S1 backscatter in dB; a "
                                          "sample with values outside is dropped as bad (linear power or "
                                          "a broken conversion)")
    s2_range: tuple[float, float] = Field((-1000.0, 65535.0), description="valid S2 values (digital "
                                          "numbers, L2A offset removed); outside: dropped as bad")
    normalisation: Literal["manifest", "clip"] = "manifest"
    s1_bands: list[int] | None = None
    s2_bands: list[int] | None = None
    samples_per_epoch: int | None = Field(None, ge=1, description="default: manifest count")
    seed: int = 0
    # Host -> device transfer (pretraining). The defaults keep the CPU path as it was; on GPUs
    # normalise_on_device=true halves the bytes copied and frees the loader workers' CPU.
    normalise_on_device: bool = Field(False, description="pretraining: the loader ships raw values "
                                      "(S2 uint16, S1 float16 dB: half the bytes of float32) and the "
                                      "training loop normalises them on its device with the same maths; "
                                      "fine-tuning always normalises in its loader")
    pin_memory: bool = Field(True, description="page-locked host batches, so host-to-GPU copies run "
                             "asynchronously; only where CUDA is available")
    device_prefetch: int = Field(1, ge=0, description="pretraining: batches copied to the device ahead "
                                 "of the step (on a side CUDA stream); 0 copies each when it is needed")


    @model_validator(mode="after")
    def _ranges_ordered(self) -> DataConfig:
        for key in ("s1_range", "s2_range"):
            low, high = getattr(self, key)
            if not low < high:  # also refuses NaN bounds
                raise ValueError(f"{key}: the low end {low} must be below the high end {high}")
        return self


class ModelConfig(Section):
    """The encoders: per-modality backbones, their norm layers and the projection heads."""

    backbone: str = "resnet18"
    s1_backbone: str | None = None
    s2_backbone: str | None = None
    norm: Literal["batch", "group", "syncbatch"] = "batch"
    proj_hidden_dim: int = Field(512, ge=1)
    proj_dim: int = Field(128, ge=1)
    head_norm: bool = True


class LossConfig(Section):
    """The contrastive objective, its temperature and how embeddings are gathered across ranks."""

    name: Literal["dual_ntxent", "clip", "simclr", "mma"] = "dual_ntxent"
    temperature: float = Field(0.07, gt=0)
    learnable_temperature: bool = False
    gather_with_grad: bool = True
    local_loss: bool = True


class OptimConfig(Section):
    """AdamW settings and the linear-warmup + cosine learning-rate schedule."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(1000, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    max_nonfinite_steps: int = Field(10, ge=1, description="a step whose loss or gradients are not "
                                     "finite is skipped and counted; this many in a row stop the job")


class DeepSpeedConfig(Section):
    """DeepSpeed engine: ZeRO stage, mixed precision, gradient accumulation and clipping."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = Field(1, ge=1, description="K micro-batches of data.batch_size per optimizer step, "
                            "trained as ONE contrastive batch of K x batch_size x ranks (GradCache, every "
                            "loss): one extra forward per micro-batch")
    grad_clip: float = Field(1.0, ge=0)


class ScaleConfig(Section):
    """How many Ray Train workers and what each gets."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    torch_threads: int | None = Field(None, ge=1)
    address: str | None = None
    storage_path: str = "work/ray_results"
    name: str = "pretrain"
    checkpoint_every: int = Field(50, ge=1)
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(2, ge=0)
    resume: bool = Field(True, description="continue the latest checkpoint of a run of this name")
    stop_at_step: int | None = Field(None, ge=1, description="end the job here (as if preempted); "
                                     "the LR schedule still runs to optim.max_steps")
    # GPU speed settings (pretraining); channels_last and cudnn_benchmark are ignored on CPU.
    channels_last: bool = Field(True, description="GPU: model weights and inputs in NHWC memory "
                                "(channels_last), the layout tensor-core convolutions run in")
    cudnn_benchmark: bool = Field(True, description="GPU: cuDNN times its convolution algorithms on "
                                  "the first steps and keeps the fastest (crop and batch are fixed)")
    compile: bool = Field(False, description="GPU only: torch.compile the objective's model in place "
                          "before DeepSpeed wraps it; the first steps then spend minutes compiling")


class MLflowConfig(Section):
    """Where runs are tracked and under which registered-model name and alias they land."""

    tracking_uri: str = "sqlite:///work/mlflow.db"
    artifact_location: str | None = None
    experiment: str = "dsl-pretrain"
    registered_model: str = "dsl-dual-backbone"
    alias: str = "candidate"
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(5.0, gt=0, description="rank 0 samples CPU/GPU/disk/network")
    # Rank 0's in-loop logging is best-effort (dsl/runtime/tracking.py): an outage of the
    # tracking server costs metric points, never the job. These bound what it may cost.
    buffer_points: int = Field(10_000, ge=1, description="metric points held while the server is "
                               "slow or down; new points beyond are dropped")
    retry_budget_s: float = Field(60.0, ge=0, description="how long one batch is retried (its last "
                                  "attempt starts then) before its points are dropped")
    request_timeout_s: float = Field(10.0, gt=0, description="connect/read timeout of one request")
    flush_timeout_s: float = Field(30.0, ge=0, description="the most the end of training waits "
                                   "for buffered points")


FinetuneMethod = Literal["dual", "s1", "s2", "early_fusion", "late_fusion"]
Metric = Literal["average_accuracy", "overall_accuracy", "macro_f1", "micro_f1"]


def _check_backbone(method: str, backbone: str, key: str) -> None:
    """``dual`` fine-tunes a pretrained model; the supervised baselines start from scratch."""
    if method == "dual" and backbone == "scratch":
        raise ValueError(f"{key}: method 'dual' fine-tunes a pretrained backbone (models:/<name>@<alias>, "
                         "models:/<name>/<version> or a folder); two backbones from scratch is 'late_fusion'")
    if method != "dual" and backbone != "scratch":
        raise ValueError(f"{key}: method '{method}' is a supervised baseline trained from scratch; "
                         f"set it to 'scratch' (got '{backbone}')")


class FinetuneConfig(Section):
    """``dsl finetune``: train on a label fraction of ``data.split``, test on ``test_split``.

    The head sits on the concatenated pooled features of the backbones. ``dual`` loads a
    registered model (its crop size, bands and normalisation come with it); the baselines
    (``s1``, ``s2``, ``early_fusion``: all bands in one backbone, ``late_fusion``: two backbones)
    build ``model.*`` from scratch.
    """

    backbone: str = Field("models:/dsl-dual-backbone@candidate", min_length=1,
                          description="models:/<name>@<alias>, models:/<name>/<version>, a folder, or scratch")
    method: FinetuneMethod = "dual"
    task: Literal["single", "multi"] = "single"
    label_fraction: float = Field(0.1, gt=0, le=1, description="per class, chosen from the seed")
    mode: Literal["linear", "full"] = Field("full", description="linear: frozen backbones (probe)")
    epochs: int = Field(10, ge=1, description="passes over the selected labels")
    steps: int | None = Field(None, ge=1, description="optimizer steps whatever the fraction; overrides epochs")
    lr: float = Field(1e-3, gt=0)
    backbone_lr_scale: float = Field(1.0, gt=0, description="full mode: a pretrained backbone's lr is "
                                     "lr x this (scratch backbones train at lr)")
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = Field(0, ge=0, description="label selection, head init, crops and order")
    test_split: str = Field("test", description="held out: only evaluated, never used for selection")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        _check_backbone(self.method, self.backbone, "finetune.backbone")
        return self


class EvaluateMethod(Section):
    """One line of the evaluation grid: a fine-tuning method, its backbone and mode."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.+-]+$", description="label in the table and plot")
    method: FinetuneMethod
    backbone: str = "scratch"
    mode: Literal["linear", "full"] = "full"

    @model_validator(mode="after")
    def _check(self) -> EvaluateMethod:
        _check_backbone(self.method, self.backbone, f"evaluate.methods[{self.name}].backbone")
        return self


class EvaluateConfig(Section):
    """``dsl evaluate``: fine-tune every method x label fraction x seed.

    ``finetune.*`` supplies the other settings. The job then writes the mean +- std table
    (markdown, CSV) and the label-fraction plot.
    """

    methods: list[EvaluateMethod] = Field(default_factory=lambda: [
        EvaluateMethod(name="dual-simclr", method="dual", backbone="models:/dsl-dual-backbone@candidate"),
        *(EvaluateMethod(name=m, method=m) for m in ("late_fusion", "early_fusion", "s1", "s2")),
    ], min_length=1)
    label_fractions: list[float] = Field([0.01, 0.1, 0.5, 1.0], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    metric: Metric = Field("average_accuracy", description="the plotted metric")
    output: str = Field("work/evaluate", description="local folder for the table and plot")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate.methods: names must be unique, got {names}")
        bad = [f for f in self.label_fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"evaluate.label_fractions: {bad[0]} is not in (0, 1]")
        return self


class PromoteConfig(Section):
    """``dsl promote``/``rollback``: the gate a candidate must pass to take the champion alias.

    A version's score is the mean of ``test_<metric>`` over its finished fine-tuning runs with
    this task, label fraction and method; the candidate wins when it beats the champion's score
    by more than ``margin``.
    """

    metric: str = Field("average_accuracy", min_length=1, description="scored as test_<metric>")
    task: Literal["single", "multi"] = "single"
    label_fraction: float = Field(0.1, gt=0, le=1)
    margin: float = Field(0.0, ge=0)
    method: str = Field("dual", min_length=1, description="fine-tuning method whose runs count")
    experiment: str | None = Field(None, description="experiment of the fine-tuning runs; None: all")
    from_alias: str = Field("candidate", pattern=r"^[A-Za-z0-9_-]+$")
    to_alias: str = Field("champion", pattern=r"^[A-Za-z0-9_-]+$")
    lock: Literal["auto", "file", "registry"] = Field(
        "auto", description="auto: a file lock beside a local store, else a lock tag in the registry")
    lock_timeout_s: float = Field(120.0, gt=0, description="give up waiting for the lock after this")
    lock_ttl_s: float = Field(300.0, gt=0, description="registry lock: a holder silent this long has died")
    lock_settle_s: float = Field(1.0, ge=0, description="registry lock: wait before verifying the write")


# ---------------------------------------------------------------- cluster definitions
# `dsl cluster render` turns this section into a KubeRay RayCluster, RayJob or RayCronJob, or a
# `ray up` launcher config (cluster/render.py).

# Kubernetes resource quantity, as the CRDs' own pattern writes it (resources.limits/requests).
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
            r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": 1e-9, "u": 1e-6,
           "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
# DNS-1035 label, the name rule KubeRay applies to RayCluster/RayJob names. 36 characters: the
# shortest limit of the three (a RayCronJob's child RayJob adds 11, a RayJob's RayCluster 6, to 53).
NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
MAX_NAME = 36
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# cron fields as KubeRay's RayCronJob reads them (robfig/cron ParseStandard): name, low, high, names
_CRON_FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day-of-month", 1, 31, ()),
                ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
                ("day-of-week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")))


def quantity_value(text: str) -> float:
    """A Kubernetes quantity (``16Gi``, ``500m``, ``2``) as a number (bytes, cores)."""
    m = re.fullmatch(r"([+-]?[0-9.]+)([eE][+-]?[0-9.]+|[A-Za-z]*)", text)
    if not m or not re.match(QUANTITY, text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity like 16Gi, 512Mi, 4 or 500m")
    number, suffix = m.groups()
    if suffix[:1] in ("e", "E"):
        return float(number) * 10 ** float(suffix[1:])
    return float(number) * _SUFFIX.get(suffix, 1)


def _positive_quantity(text: str) -> str:
    if quantity_value(text) <= 0:
        raise ValueError(f"{text!r} must be more than 0")
    return text


Quantity = Annotated[str, AfterValidator(_positive_quantity)]


def _cron_value(text: str, field: tuple) -> int:
    name, low, high, names = field
    if text.upper() in names:
        return low + names.index(text.upper())
    if not text.isdigit():
        raise ValueError(f"{name} {text!r} is not a number" + (f" or one of {', '.join(names)}" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is out of range {low}-{high}")
    return value


def check_cron(text: str) -> str:
    """Validate a 5-field cron schedule (minute hour day-of-month month day-of-week).

    Each field is ``*`` (or ``?`` in the day fields), or a comma list of ``N``, ``N-M``, each
    optionally ``/STEP``; months and weekdays also by name (JAN, MON). ``TZ=`` prefixes are
    refused: the time zone is ``cluster.time_zone``.

    Raises:
        ValueError: Not 5 fields, or a field out of its range; the message names the field.
    """
    if "TZ" in text:
        raise ValueError(f"{text!r}: give the time zone in cluster.time_zone, not in the schedule")
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"{text!r} has {len(parts)} fields; a cron schedule has 5: minute hour day-of-month "
                         "month day-of-week (e.g. '0 2 * * *': 02:00 every day)")
    for part, field in zip(parts, _CRON_FIELDS, strict=True):
        name = field[0]
        for item in part.split(","):
            span, slash, step = item.partition("/")
            if slash and not (step.isdigit() and int(step) > 0):
                raise ValueError(f"{text!r}: {name} step {step!r} must be a whole number above 0")
            if span == "*" or (span == "?" and name in ("day-of-month", "day-of-week")):
                continue
            lo, dash, hi = span.partition("-")
            try:
                first, last = _cron_value(lo, field), _cron_value(hi, field) if dash else None
            except ValueError as e:
                raise ValueError(f"{text!r}: {e}") from None
            if last is not None and last < first:
                raise ValueError(f"{text!r}: {name} range {span!r} runs backwards")
    return text


class ClusterHead(Section):
    """The head pod (KubeRay) / head node (``ray up``): GCS, dashboard, Jobs API, the job's driver."""

    cpu: Quantity = Field("4", description="Kubernetes CPU quantity (request = limit)")
    memory: Quantity = Field("16Gi", description="Kubernetes memory quantity (request = limit)")
    ray_cpus: int | None = Field(0, ge=0, description="logical CPUs Ray schedules tasks on at the head; 0 "
                                 "keeps work off it (KubeRay's advice once there are workers), None: its cpu")


class ClusterGpuWorkers(Section):
    """The autoscaling GPU worker group: where training and data loading run."""

    group_name: str = Field("gpu", pattern=DNS1123_LABEL, max_length=63)
    min_replicas: int = Field(0, ge=0, description="workers kept even when idle")
    max_replicas: int = Field(4, ge=0, description="the autoscaler adds workers up to this many")
    gpus_per_worker: int = Field(1, ge=0)
    gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource name of the GPUs")
    cpu: Quantity = "8"
    memory: Quantity = "64Gi"
    shm_size: Quantity = Field("16Gi", description="/dev/shm (tmpfs) of each worker: the data loader's shared "
                          "memory and Ray's object store live there. It counts against memory, so it "
                          "must be smaller")
    idle_timeout_s: int = Field(300, ge=0, description="an idle worker is removed after this long")

    @model_validator(mode="after")
    def _check(self) -> ClusterGpuWorkers:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is greater than max_replicas {self.max_replicas}")
        if quantity_value(self.shm_size) >= quantity_value(self.memory):
            raise ValueError(f"shm_size {self.shm_size} must be less than memory {self.memory}: a memory-backed "
                             "/dev/shm counts against the worker's memory limit")
        return self


class ClusterLauncher(Section):
    """``ray up`` on a cloud: the instance types of the head and of the GPU workers."""

    provider: Literal["aws"] = "aws"
    region: str = Field("us-west-2", pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    availability_zone: str | None = Field(None, description="comma-separated zones; None: the provider's")
    head_instance_type: str = "m5.2xlarge"
    gpu_instance_type: str = "g5.2xlarge"
    max_workers: int | None = Field(None, ge=0, description="cap on all workers; None: gpu_workers.max_replicas")
    disk_gb: int = Field(200, ge=8, description="root volume of every node (the image is large)")
    ssh_user: str = "ubuntu"


class ClusterConfig(Section):
    """``dsl cluster render``: a KubeRay RayCluster/RayJob/RayCronJob or a ``ray up`` config.

    Credentials are never part of a rendered definition: the pods take the keys of the
    Kubernetes Secret ``secret_name`` as environment variables (envFrom) and/or act as
    ``service_account``; ``ray up`` nodes use their instance role.
    """

    name: str = Field("dsl", pattern=NAME, max_length=MAX_NAME, description="name of the RayCluster, RayJob, "
                      "RayCronJob and launcher cluster (DNS-1035 label)")
    namespace: str = Field("default", pattern=DNS1123_LABEL, max_length=63)
    image: str = Field("dsl:latest", min_length=1, description="image with this repository installed "
                       "(`dsl` on PATH) and as its working directory, built FROM rayproject/ray:<ray_version>-gpu")
    ray_version: str = Field("2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$", description="the image's Ray")
    service_account: str | None = Field(None, pattern=DNS1123_SUBDOMAIN, max_length=253)
    secret_name: str | None = Field(None, pattern=DNS1123_SUBDOMAIN, max_length=253, description="a Secret "
                                    "whose keys become the pods' environment variables (e.g. AWS_*, MLFLOW_*)")
    command: list[str] = Field(default_factory=lambda: ["pretrain", "--config", "configs/pretrain/paper.yaml"],
                               min_length=1, description="the dsl command line (after `dsl`) a RayJob runs")
    schedule: Annotated[str, AfterValidator(check_cron)] = Field(
        "0 2 * * *", description="cron schedule of the RayCronJob: minute hour day-of-month month day-of-week")
    time_zone: str | None = Field(None, min_length=1, description="IANA zone of schedule; None: the operator's")
    ttl_seconds_after_finished: int = Field(600, ge=0, description="a finished RayJob's cluster is deleted "
                                            "after this long")
    active_deadline_s: int | None = Field(None, ge=1, description="a RayJob running longer is stopped")
    head: ClusterHead = ClusterHead()
    gpu_workers: ClusterGpuWorkers = ClusterGpuWorkers()
    launcher: ClusterLauncher = ClusterLauncher()

    @field_validator("command")
    @classmethod
    def _command(cls, argv: list[str]) -> list[str]:
        if argv[0] in ("dsl", "python"):
            raise ValueError(f"give the arguments after `dsl` (e.g. [pretrain, --config, FILE]), not {argv[0]!r}")
        if any(not a for a in argv):
            raise ValueError("an empty argument")
        return argv

    @field_validator("time_zone")
    @classmethod
    def _time_zone(cls, zone: str | None) -> str | None:
        if zone is not None:
            try:
                zoneinfo.ZoneInfo(zone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{zone!r} is not an IANA time zone like Europe/Berlin or UTC") from None
        return zone

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        cap = self.launcher.max_workers
        if cap is not None and cap < self.gpu_workers.min_replicas:
            raise ValueError(f"launcher.max_workers {cap} is less than gpu_workers.min_replicas "
                             f"{self.gpu_workers.min_replicas}")
        return self


class Config(Section):
    """The whole tree; each command reads the sections it needs."""

    ingest: IngestConfig = IngestConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scale: ScaleConfig = ScaleConfig()
    mlflow: MLflowConfig = MLflowConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promote: PromoteConfig = PromoteConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.data.crop_size % 8:
            raise ValueError(f"data.crop_size must be a multiple of 8, got {self.data.crop_size}")
        if self.deepspeed.precision == "fp16" and not self.scale.use_gpu:
            raise ValueError("deepspeed.precision fp16 needs GPUs (scale.use_gpu=true): DeepSpeed's CPU "
                             "accelerator has no fp16; use bf16 or fp32 on CPU")
        if self.scale.compile and not self.scale.use_gpu:
            raise ValueError("scale.compile needs GPUs (scale.use_gpu=true): on CPU compiling costs more "
                             "than it saves in a test-sized run; set scale.compile=false")
        if self.model.norm == "syncbatch" and not self.scale.use_gpu:
            raise ValueError("model.norm syncbatch needs GPUs (scale.use_gpu=true): torch's SyncBatchNorm "
                             "refuses CPU tensors; use batch or group on CPU")
        return self


# Values quoted in errors: a YAML alias bomb expands to billions of items under repr (a hang),
# a huge document to megabytes of message; reprlib (then a cut) keeps each to a short line.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60
_MAX_DEPTH = 64  # brackets: the tree needs 3; PyYAML scans deep flow nesting in quadratic time


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _safe_load(text: str) -> Any:
    """``yaml.safe_load``, refusing bracket nesting deeper than :data:`_MAX_DEPTH` first.

    Raises:
        ValueError: Too deep (PyYAML would take seconds, then hit the recursion limit).
    """
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    if deepest > _MAX_DEPTH:
        raise ValueError(f"brackets nested {deepest} deep (at most {_MAX_DEPTH})")
    return yaml.safe_load(text)


# the lines of a validation error listed, whatever the number of bad items
_MAX_PROBLEMS = 10
# what YAML parsing raises besides YAMLError: ints over Python's 4300-digit limit (ValueError),
# nesting deeper than the recursion limit (RecursionError)
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def _unknown_key(path: str, key: Any, allowed: list[str], origin: str) -> ConfigError:
    close = difflib.get_close_matches(str(key), allowed, n=1)  # YAML keys may be ints, null ...
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{origin}: unknown key '{path}'{hint}; allowed: {', '.join(sorted(allowed))}")


def _merge(base: dict, update: dict, model: type[BaseModel], origin: str, prefix: str = "") -> dict:
    """Deep-merge ``update`` into ``base``, rejecting keys the model does not define."""
    fields = model.model_fields
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(path, key, list(fields), origin)
        sub = fields[key].annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
            old = base.get(key)
            if old is not None and not isinstance(old, dict):  # e.g. `data: 5`, then data.batch_size=3
                raise ConfigError(f"{origin}: '{path}' is a section, but the config gives it {_short(old)}")
            base[key] = _merge(dict(old or {}), value, sub, origin, path + ".")
        else:
            base[key] = value
    return base


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (["a", "b"], 1); the value is YAML so types come out right."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = _safe_load(raw) if raw != "" else None
    except _YAML_ERRORS as e:
        raise ConfigError(f"override '{text}': value is not valid YAML: {e}") from None
    return key.split("."), value


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document of a file a user wrote (a config, a pipeline), read safely.

    Raises:
        ConfigError: Unreadable, not UTF-8, or not YAML (an alias bomb or a too-deep document
            included); one line naming the file.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read {what} {path}: not UTF-8 text (byte {e.start})") from None
    try:
        return _safe_load(text)
    except _YAML_ERRORS as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config file, apply ``key=value`` overrides and validate the whole tree.

    Args:
        path: A YAML file with any subset of the tree; None starts from the defaults.
        overrides: ``section.key=value`` strings applied after the file.

    Raises:
        ConfigError: Unknown key, unreadable file or invalid value; the message names which.
    """
    raw: dict = {}
    origin = str(path) if path else "<defaults>"
    if path is not None:
        loaded = read_yaml(path, "config") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        raw = _merge({}, loaded, Config, origin)
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        raw = _merge(raw, nested, Config, f"override '{text}'")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = []
        errors = e.errors()
        for err in errors[:_MAX_PROBLEMS]:
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            problems.append(f"{loc}: {err['msg']} (got {_short(err.get('input'))})")
        if len(errors) > _MAX_PROBLEMS:
            problems.append(f"... and {len(errors) - _MAX_PROBLEMS} more")
        raise ConfigError(f"{origin}: invalid config:\n  " + "\n  ".join(problems)) from None


def dump_config(cfg: Config) -> dict[str, Any]:
    """The resolved tree as plain data (for MLflow params and the manifest)."""
    return cfg.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# a password in a URL's userinfo (scheme://user:password@host): config values logged where a
# run's viewers read them (MLflow params) keep the user and drop the password
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):[^/\s@]*@")


def redact_credentials(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    ``https://user:tok@host/x`` -> ``https://user:***@host/x``, as SQLAlchemy prints database
    URLs; a URL without a password is unchanged.
    """
    return _URL_PASSWORD.sub(r"\1:***@", text)
