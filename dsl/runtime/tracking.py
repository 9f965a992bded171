"""MLflow tracking for every job: experiments, the logged config, metrics.

Only rank 0 of a Ray Train job and the drivers write; the other ranks never touch MLflow.

Rank 0's in-loop logging (:class:`MetricLogger`) is best-effort: a tracking-server outage must
cost metric points, never the job. A synchronous request that raised on rank 0 left the other
ranks waiting in a collective and killed the run, and the MLflow client's own retries
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7 with backoff, ``MLFLOW_HTTP_REQUEST_TIMEOUT`` = 120 s:
minutes per request) would have stalled every rank instead. So ``log()`` only appends to a
bounded buffer, a background thread sends it in batches, one request at a time with our own
timeout and retry budget, and what cannot be sent is dropped, counted and reported.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

from dsl.contracts.config import Config, MLflowConfig, dump_config, flatten, redact_credentials

_log = logging.getLogger(__name__)

# MLflow's REST API (https://mlflow.org/docs/latest/rest-api.html)
LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
GET_RUN = "/api/2.0/mlflow/runs/get"
# the server refuses more metrics than this in one log-batch request
MAX_POINTS_PER_REQUEST = 1000
# waits between attempts at one batch: doubling from the first, at most the last; the retry
# budget (mlflow.retry_budget_s) bounds the total
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0
DROPPED_POINTS = "mlflow_dropped_points"
SYSTEM_PREFIX = "system/"


def client(tracking_uri: str):
    """Return an MlflowClient for ``tracking_uri``.

    The URI is also made the process default, as mlflow's artifact helpers read that.
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def experiment_id(mlflow_client, cfg: Config) -> str:
    """``mlflow.experiment``'s id, created (with ``mlflow.artifact_location``) when missing."""
    exp = mlflow_client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        return exp.experiment_id
    return mlflow_client.create_experiment(cfg.mlflow.experiment, artifact_location=cfg.mlflow.artifact_location)


def log_config(mlflow_client, run_id: str, cfg: Config) -> None:
    """The resolved config tree as the run's params (``section.key``), URL passwords as ``***``.

    Params are readable by everyone with access to the experiment: a tracking URI or a STAC API
    written with its password (``https://user:token@host``) keeps only the user there.
    """
    from mlflow.entities import Param

    items = [(k, "" if v is None else redact_credentials(str(v))[:6000])
             for k, v in flatten(dump_config(cfg)).items()]
    for i in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])


def log_metrics(mlflow_client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` in one request."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


class _Transport:
    """One attempt per call at the tracking store: no hidden retries, a bounded wait.

    An ``http(s)://`` server is called through mlflow's REST helper with ``max_retries=0`` and
    our timeout, per request, leaving the process-wide ``MLFLOW_HTTP_*`` settings (which the
    driver's calls use) alone. Other stores (sqlite, files) are local: the plain client.
    """

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        self.rest = tracking_uri.startswith(("http://", "https://"))
        self._client = None
        self._lock = threading.Lock()

    def _mlflow_client(self):
        with self._lock:  # the sender and the system-metrics threads share it
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(self.uri)
            return self._client

    def _request(self, endpoint: str, method: str, timeout_s: float, **kwargs):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        response = http_request(get_default_host_creds(self.uri), endpoint, method, max_retries=0,
                                backoff_factor=0, timeout=timeout_s, **kwargs)
        return verify_rest_response(response, endpoint)

    def log_batch(self, run_id: str, points: list, timeout_s: float) -> None:
        """Send ``points`` (mlflow Metric entities) in one request; raises on any failure."""
        if not self.rest:
            self._mlflow_client().log_batch(run_id, metrics=points)
            return
        from mlflow.protos.service_pb2 import LogBatch
        from mlflow.utils.proto_json_utils import message_to_json

        body = json.loads(message_to_json(LogBatch(run_id=run_id, metrics=[p.to_proto() for p in points])))
        self._request(LOG_BATCH, "POST", timeout_s, json=body)

    def next_step(self, run_id: str, prefix: str, timeout_s: float) -> int:
        """One past the largest step of the run's metrics named ``prefix...`` (0 when none)."""
        if self.rest:
            response = self._request(GET_RUN, "GET", timeout_s, params={"run_id": run_id})
            metrics = response.json()["run"]["data"].get("metrics", [])
            steps = [int(m.get("step", 0)) for m in metrics if m["key"].startswith(prefix)]
        else:
            data = self._mlflow_client().get_run(run_id).data.to_proto()
            steps = [m.step for m in data.metrics if m.key.startswith(prefix)]
        return max(steps) + 1 if steps else 0


def _permanent(error: BaseException) -> bool:
    """Whether the server answered with a client error: sending the same batch again cannot help.

    Connection errors and timeouts reach us as MlflowException with INTERNAL_ERROR (500):
    transient, like 5xx, 408 and 429.
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class _Tally:
    """What was dropped: how many points, which keys, which training steps (for a warning)."""

    def __init__(self, points: Iterable = ()):
        self.points = self.system = 0
        self.keys: dict[str, None] = {}  # ordered as first seen
        self.steps: tuple[int, int] | None = None
        self.add(points)

    def add(self, points: Iterable) -> None:
        """Count ``points`` (mlflow Metric entities) in."""
        for p in points:
            if p.key.startswith(SYSTEM_PREFIX):  # sample counters, not training steps
                self.system += 1
                continue
            self.points += 1
            self.keys[p.key] = None
            lo, hi = self.steps or (p.step, p.step)
            self.steps = (min(lo, p.step), max(hi, p.step))

    def __bool__(self) -> bool:
        return bool(self.points or self.system)

    def __str__(self) -> str:
        parts = []
        if self.points:
            keys = list(self.keys)
            names = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
            lo, hi = self.steps
            parts.append(f"{self.points} points ({names}; steps {lo}..{hi})")
        if self.system:
            parts.append(f"{self.system} system-metric points")
        return " and ".join(parts) or "no points"


class BufferedMetricWriter:
    """Metric points for one run: a bounded buffer drained by a background thread in batches.

    :meth:`put` appends and returns; it never touches the network and never raises. The sender
    thread takes up to :data:`MAX_POINTS_PER_REQUEST` points at a time and retries each batch with
    backoff for ``retry_budget_s`` (the last attempt starts then), each request waiting at most
    ``request_timeout_s``. A batch
    that outlives its budget, or that the server rejects, is dropped; so are new points while the
    buffer holds ``buffer_points``. Every drop is counted and warned about, and the count is sent
    as ``mlflow_dropped_points`` with the next batch the server takes.

    Args:
        tracking_uri: Where the run lives.
        run_id: The MLflow run to log to.
        settings: The ``mlflow`` config section (buffer size, retry budget, timeouts).
    """

    def __init__(self, tracking_uri: str, run_id: str, settings: MLflowConfig):
        self.transport = _Transport(tracking_uri)
        self.run_id, self.settings = run_id, settings
        self.dropped = 0  # points dropped so far, all reasons
        self._reported = 0  # the last count the server took as mlflow_dropped_points
        self._since_report = _Tally()  # dropped since then, for the next warning
        self._buffer_full_warned = False
        self._queue: deque = deque()
        self._in_flight: list = []
        self._last_step = 0
        self._server_answers = True  # the last request succeeded (or none was made yet)
        self._closing = self._abandoned = False
        self._close_deadline = float("inf")
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._drain, daemon=True, name="dsl-mlflow-sender")
        self._thread.start()

    def put(self, metrics: dict[str, float], step: int, training: bool = True) -> None:
        """Queue ``metrics`` at ``step``; dropped (and counted) when the buffer is full.

        Args:
            metrics: Key -> value.
            step: The step they belong to.
            training: A training step (the dropped count is logged at the latest one), not a
                system-metrics sample counter.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # when it happened, not when the server got it
        points = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        with self._cond:
            if self._closing:
                return
            if training:
                self._last_step = max(self._last_step, int(step))
            room = self.settings.buffer_points - len(self._queue)
            self._queue.extend(points[:max(room, 0)])
            rejected = points[max(room, 0):]
            if rejected:
                self._drop(rejected)
                if not self._buffer_full_warned:
                    self._buffer_full_warned = True
                    _log.warning("MLflow logging to %s: the buffer of %d points is full (the server "
                                 "is slow or down); dropping new points until it drains, first %s",
                                 self.transport.uri, self.settings.buffer_points, _Tally(rejected))
            self._cond.notify()

    def _drop(self, points: list) -> None:
        """Count ``points`` as lost (the caller holds the lock)."""
        self.dropped += len(points)
        self._since_report.add(points)

    def _count_due(self) -> bool:
        """Whether the server has yet to take the current dropped count (the caller holds the lock)."""
        return self.dropped > self._reported

    def _drain(self) -> None:
        """The sender thread's body; a bug in it costs the metrics, never the job."""
        try:
            self._drain_batches()
        except Exception:  # noqa: BLE001 - put() keeps working (and drops once the buffer is full)
            _log.warning("MLflow logging to %s: the sender thread failed; metrics are no longer sent",
                         self.transport.uri, exc_info=True)

    def _drain_batches(self) -> None:
        """Send batches out of the buffer until closed and empty, or out of time."""
        from mlflow.entities import Metric

        while True:
            with self._cond:
                while not (self._queue or self._closing or (self._count_due() and self._server_answers)):
                    self._cond.wait()
                if self._abandoned or time.monotonic() >= self._close_deadline:
                    return
                if not self._queue and not self._count_due():
                    return  # closing, and everything is out
                n = min(len(self._queue), MAX_POINTS_PER_REQUEST - 1)
                self._in_flight = [self._queue.popleft() for _ in range(n)]
                count = self.dropped if self._count_due() else None
                extra = [Metric(DROPPED_POINTS, float(count), int(time.time() * 1000), self._last_step)] if count else []
            ok, error, waited = self._send(self._in_flight + extra)
            with self._cond:
                if self._abandoned:
                    return  # close() gave up on us and has reported what was left
                batch, self._in_flight = self._in_flight, []
                self._server_answers = ok
                if ok:
                    self._buffer_full_warned = False
                    if count is not None:
                        self._reported = count
                        _log.warning("MLflow logging to %s: %s dropped since the last report; %d in "
                                     "total, logged as %s", self.transport.uri, self._since_report, count,
                                     DROPPED_POINTS)
                        self._since_report = _Tally()
                    continue
                if not batch:  # only the count failed: it goes again with the next batch
                    if self._closing:
                        return  # nothing else to send: no point hammering a dead server
                    continue
                self._drop(batch)
                if _permanent(error):
                    why = "the server rejected them"
                elif time.monotonic() >= self._close_deadline:
                    why = f"unsent when close() gave up after {self.settings.flush_timeout_s:.1f} s"
                else:
                    why = f"after {waited:.1f} s of failed attempts"
                _log.warning("MLflow logging to %s: dropped %s, %s (%s); training continues, %d points "
                             "dropped so far", self.transport.uri, _Tally(batch), why,
                             str(error).splitlines()[0][:300] if str(error) else type(error).__name__,
                             self.dropped)

    def _send(self, points: list) -> tuple[bool, BaseException | None, float]:
        """Send one batch, retrying with backoff for the retry budget, stopping at the close deadline.

        Returns:
            (sent, the last error, seconds spent).
        """
        start = time.monotonic()
        deadline = start + self.settings.retry_budget_s
        backoff, error = BACKOFF_FIRST_S, None
        while True:
            # the budget bounds when attempts start, not their length: an attempt cut short while
            # the server was still writing would be reported dropped although it arrived; the
            # close deadline bounds both
            timeout = max(0.05, min(self.settings.request_timeout_s, self._close_deadline - time.monotonic()))
            try:
                self.transport.log_batch(self.run_id, points, timeout)
                return True, None, time.monotonic() - start
            except Exception as e:  # noqa: BLE001 - any failure is a lost attempt, never the job's end
                error = e
            left = min(deadline, self._close_deadline) - time.monotonic()  # close() may have moved it
            if _permanent(error) or left <= 0 or self._abandoned:
                return False, error, time.monotonic() - start
            time.sleep(min(backoff, left))  # the last attempt falls on the deadline
            backoff = min(2 * backoff, BACKOFF_MAX_S)

    def close(self) -> None:
        """Send what is buffered, waiting at most ``flush_timeout_s``; never raises.

        What is still unsent then is given up on and warned about.
        """
        try:
            with self._cond:
                if self._closing:
                    return
                self._closing = True
                self._close_deadline = time.monotonic() + self.settings.flush_timeout_s
                self._cond.notify()
            self._thread.join(max(0.0, self._close_deadline - time.monotonic()))
            with self._cond:
                self._abandoned = True
                left = [*self._in_flight, *self._queue]
                self._queue.clear()
                self._drop(left)
                unreported = self.dropped > self._reported
            if left:
                _log.warning("MLflow logging to %s: close() gave up after %.1f s (mlflow.flush_timeout_s); "
                             "%s not sent (or not confirmed)", self.transport.uri, self.settings.flush_timeout_s,
                             _Tally(left))
            if unreported:
                _log.warning("MLflow logging to %s: %d points were dropped in all; the server never "
                             "took that count as %s", self.transport.uri, self.dropped, DROPPED_POINTS)
        except Exception:  # noqa: BLE001 - the end of training must not fail on its logging
            _log.warning("MLflow logging: close() failed", exc_info=True)


class _SystemMetricsSampler:
    """Samples the node's CPU, memory, disk, network (and GPU) into a writer, in a thread.

    mlflow's own ``SystemMetricsMonitor`` thread stops for good at its first failed request, and
    its ``finish()`` joins that thread and flushes with the client's long retries, unbounded; so
    only its collectors are used here and the samples go through the same best-effort buffer.
    Steps continue after the run's last ``system/`` step, as ``resume_logging`` would.
    """

    def __init__(self, writer: BufferedMetricWriter, interval_s: float):
        self.writer, self.interval_s = writer, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dsl-mlflow-system-metrics")
        self._thread.start()

    def _run(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            w = self.writer
            # never started: its collectors only (resume_logging=False: it makes no request)
            monitor = SystemMetricsMonitor(w.run_id, sampling_interval=self.interval_s,
                                           tracking_uri=w.transport.uri)
            prefix = SYSTEM_PREFIX + (f"{monitor.node_id}/" if monitor.node_id else "")
            try:
                step = w.transport.next_step(w.run_id, prefix, w.settings.request_timeout_s)
            except Exception as e:  # noqa: BLE001 - an outage at start: count from 0
                _log.warning("MLflow system metrics: could not read the run's last step (%s); from 0", e)
                step = 0
            while not self._stop.wait(self.interval_s):
                monitor.collect_metrics()
                metrics = monitor.aggregate_metrics()
                for m in monitor.monitors:
                    m.clear_metrics()
                w.put({prefix + k: v for k, v in metrics.items()}, step, training=False)
                step += 1
        except Exception:  # noqa: BLE001 - losing system metrics must not touch training
            _log.warning("MLflow system metrics: sampling stopped", exc_info=True)

    def stop(self) -> None:
        """Stop sampling (the thread ends at its next wake-up; nothing waits for it)."""
        self._stop.set()


class MetricLogger:
    """Rank 0's MLflow writer: metrics every N steps and the node's system metrics, best-effort.

    ``log()`` queues and returns at once, whatever the server does; ``close()`` waits at most
    ``mlflow.flush_timeout_s``; neither raises. See :class:`BufferedMetricWriter` for what an
    outage costs. Built with ``run_id=None`` (every other rank) it does nothing.
    """

    def __init__(self, cfg: Config, run_id: str | None):
        self.run_id = run_id
        self.writer: BufferedMetricWriter | None = None
        self.sampler: _SystemMetricsSampler | None = None
        if run_id is None:
            return
        self.writer = BufferedMetricWriter(cfg.mlflow.tracking_uri, run_id, cfg.mlflow)
        if cfg.mlflow.system_metrics:
            self.sampler = _SystemMetricsSampler(self.writer, cfg.mlflow.system_metrics_interval_s)

    @property
    def dropped(self) -> int:
        """Points dropped so far (buffer full, retry budget spent, rejected, or left at close)."""
        return self.writer.dropped if self.writer is not None else 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; a no-op on ranks other than 0. Never blocks or raises."""
        if self.writer is None:
            return
        try:
            self.writer.put(metrics, step)
        except Exception:  # noqa: BLE001 - a bad value costs its point, not the run
            _log.warning("MLflow logging: could not queue %s at step %s", list(metrics), step, exc_info=True)

    def close(self) -> None:
        """Stop sampling system metrics and flush the buffer within ``mlflow.flush_timeout_s``."""
        if self.sampler is not None:
            self.sampler.stop()
        if self.writer is not None:
            self.writer.close()
