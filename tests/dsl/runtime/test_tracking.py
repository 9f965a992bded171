"""Rank 0's best-effort MLflow logging: a tracking-server outage costs metric points, never time.

Against a real ``mlflow server`` (stopped and started again), a fault-injecting TCP proxy in
front of it, a port nobody listens on and a socket that accepts connections but never answers.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

import pytest
from fixtures.services import MlflowServer, free_port
from mlflow import MlflowClient

from dsl.contracts.config import Config, ConfigError, MLflowConfig, load_config
from dsl.runtime.tracking import DROPPED_POINTS, MetricLogger

TRACKING = "dsl.runtime.tracking"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One real server for the module (a start costs ~20 s on a busy machine)."""
    srv = MlflowServer(tmp_path_factory.mktemp("tracking") / "server").start()
    try:
        yield srv
    finally:
        srv.stop()


def new_run(uri: str) -> str:
    client = MlflowClient(uri)
    return client.create_run(client.create_experiment(f"tracking-{uuid.uuid4().hex[:8]}")).info.run_id


def settings(uri: str, **mlflow) -> Config:
    return Config(mlflow=MLflowConfig(tracking_uri=uri, **{"system_metrics": False, **mlflow}))


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not (value := condition()):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def timed_logs(logger: MetricLogger, steps) -> float:
    """Log loss and lr at ``steps``; the longest a single log() call took."""
    worst = 0.0
    for step in steps:
        t = time.perf_counter()
        logger.log({"loss": float(step), "lr": 0.1}, step)
        worst = max(worst, time.perf_counter() - t)
    return worst


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == TRACKING and r.levelno == logging.WARNING]


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of a real server; while ``broken`` it cuts every connection."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.broken, self.refused = False, 0
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.broken:
                self.refused += 1
                conn.close()
                continue
            up = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.open |= {conn, up}
            threading.Thread(target=self._pump, args=(conn, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def cut(self) -> None:
        """Break: close the connections open now, refuse new ones."""
        self.broken = True
        with self.lock:
            for s in self.open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self.open.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.slow
def test_outage_costs_points_not_time_and_recovery_reports_them(server, caplog):
    caplog.set_level(logging.WARNING, logger=TRACKING)
    run_id = new_run(server.uri)
    logger = MetricLogger(settings(server.uri, buffer_points=6, retry_budget_s=1.0, request_timeout_s=2,
                                   flush_timeout_s=15), run_id)
    logger.log({"loss": 1.0, "lr": 0.1}, 1)
    wait_for(lambda: history(server.uri, run_id, "loss"), 30, "step 1 on the server")

    server.stop()
    worst = timed_logs(logger, range(2, 12))  # 20 points: 6 fit the buffer, the rest are dropped
    assert worst < 0.05, f"log() took {worst:.3f} s with the server down"
    # the buffered ones are dropped once their retry budget is spent
    wait_for(lambda: logger.dropped == 20, 30, "20 dropped points")
    logs = warnings_of(caplog)
    assert any("the buffer of 6 points is full" in m for m in logs), logs
    assert any("s of failed attempts" in m and "points dropped so far" in m for m in logs), logs

    server.start()
    # a first answer from the restarted server (its first requests can outlast the 2 s request
    # timeout on a loaded machine, which would drop steps 12 and 13 too)
    wait_for(lambda: history(server.uri, run_id, "loss"), 60, "the restarted server")
    timed_logs(logger, (12, 13))
    t = time.perf_counter()
    logger.close()
    assert time.perf_counter() - t < 15
    assert [s for s, _ in history(server.uri, run_id, "loss")] == [1, 12, 13]  # logged after recovery
    dropped = history(server.uri, run_id, DROPPED_POINTS)
    assert dropped[-1][1] == 20 and dropped[-1][0] in (12, 13), dropped
    logs = warnings_of(caplog)
    assert any("20 points (loss, lr; steps 2..11) dropped since the last report; 20 in total, logged as "
               "mlflow_dropped_points" in m for m in logs), logs
    assert not any("close() gave up" in m for m in logs), logs


@pytest.mark.slow
def test_outage_shorter_than_the_retry_budget_loses_nothing(server, caplog):
    caplog.set_level(logging.WARNING, logger=TRACKING)
    proxy = FaultProxy(server.port)
    try:
        run_id = new_run(server.uri)
        logger = MetricLogger(settings(proxy.uri, retry_budget_s=30, flush_timeout_s=15), run_id)
        logger.log({"loss": 1.0, "lr": 0.1}, 1)
        wait_for(lambda: history(server.uri, run_id, "loss"), 30, "step 1 on the server")
        proxy.cut()
        assert timed_logs(logger, (2, 3)) < 0.05
        wait_for(lambda: proxy.refused >= 2, 10, "two refused attempts")  # it did retry
        proxy.broken = False
        wait_for(lambda: len(history(server.uri, run_id, "loss")) == 3, 30, "steps 2, 3 after the fault")
        logger.close()
        assert logger.dropped == 0 and not warnings_of(caplog)
        assert [s for s, _ in history(server.uri, run_id, "lr")] == [1, 2, 3]
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_batch_the_server_rejects_is_dropped_at_once(server, caplog):
    caplog.set_level(logging.WARNING, logger=TRACKING)
    logger = MetricLogger(settings(server.uri, retry_budget_s=60, flush_timeout_s=5), uuid.uuid4().hex)  # no such run
    logger.log({"loss": 1.0, "lr": 0.1}, 7)
    wait_for(lambda: logger.dropped == 2, 10, "the rejected points dropped without retries")
    logger.close()
    assert any("dropped 2 points (loss, lr; steps 7..7), the server rejected" in m for m in warnings_of(caplog))


@pytest.mark.slow
def test_system_metrics_are_sampled_and_continue_their_steps(server):
    run_id = new_run(server.uri)
    cfg = settings(server.uri, system_metrics=True, system_metrics_interval_s=0.2)
    key = "system/cpu_utilization_percentage"
    for _ in range(2):  # a restarted worker group builds a new logger for the same run
        before = len(history(server.uri, run_id, key))
        logger = MetricLogger(cfg, run_id)
        wait_for(lambda n=before: len(history(server.uri, run_id, key)) >= n + 2, 30, "system metrics")
        logger.close()
    steps = [s for s, _ in history(server.uri, run_id, key)]
    assert steps == list(range(len(steps))), steps  # the second logger went on where the first stopped


class HungServer:
    """Accepts connections on 127.0.0.1, reads nothing, answers nothing: a server that hangs."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return  # closed

    def close(self) -> None:
        self.listener.close()
        for s in self.held:
            s.close()


@pytest.mark.parametrize("fault", ["refused", "hung"])
def test_close_is_bounded_and_log_never_waits_when_the_server_is_dead(fault, caplog):
    caplog.set_level(logging.WARNING, logger=TRACKING)
    hung = HungServer() if fault == "hung" else None
    uri = hung.uri if hung else f"http://127.0.0.1:{free_port()}"  # refused: nobody listens there
    try:
        logger = MetricLogger(settings(uri, system_metrics=True, system_metrics_interval_s=0.1,
                                       retry_budget_s=60, request_timeout_s=30, flush_timeout_s=1.0),
                              uuid.uuid4().hex)
        assert timed_logs(logger, (1, 2, 3)) < 0.05
        logger.log({"loss": "not a number"}, 4)  # costs its point, raises nothing
        if hung:  # the sender's request (30 s timeout) and the sampler's are on their way
            wait_for(lambda: len(hung.held) >= 2, 10, "two hung requests")
        t = time.perf_counter()
        logger.close()
        took = time.perf_counter() - t
        assert took < 1.5, f"close() took {took:.2f} s for a 1 s flush timeout"
        logger.close()  # twice is harmless
    finally:
        if hung:
            hung.close()
    logs = warnings_of(caplog)
    # said by the sender (its last attempt fell on the deadline) or by close() (a request hangs)
    assert any("close() gave up after 1.0 s" in m and "6 points (loss, lr; steps 1..3)" in m for m in logs), logs
    assert logger.dropped >= 6


def test_outage_settings_are_validated():
    with pytest.raises(ConfigError, match="mlflow.buffer_points"):
        load_config(None, ["mlflow.buffer_points=0"])
    with pytest.raises(ConfigError, match="mlflow.request_timeout_s"):
        load_config(None, ["mlflow.request_timeout_s=0"])
    assert load_config(None, ["mlflow.flush_timeout_s=0"]).mlflow.flush_timeout_s == 0


def test_logged_params_carry_no_url_password(tmp_path):
    from dsl.runtime.tracking import log_config

    cfg = load_config(None, ["mlflow.tracking_uri=https://ci:hunter2@mlflow.example:5000",
                             "data.shards=s3://bucket/shards"])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a real store: what it keeps is read back
    run = client.create_run(client.create_experiment("params"))
    log_config(client, run.info.run_id, cfg)
    params = client.get_run(run.info.run_id).data.params
    assert params["mlflow.tracking_uri"] == "https://ci:***@mlflow.example:5000"
    assert params["data.shards"] == "s3://bucket/shards"
    assert not any("hunter2" in v for v in params.values()) and len(params) > 50
    assert b"hunter2" not in (tmp_path / "mlflow.db").read_bytes()
