"""Submitting a job on a fixed schedule.

Meant for a scheduler process (systemd, a Kubernetes Deployment, or a terminal) to keep running.

Each slot (start time rounded down to the interval) gets the submission id
``<name>-<slot epoch>``, so a restarted scheduler, or two of them, never run a slot twice:
the Jobs API refuses a duplicate id. A slot is skipped, not queued, while the previous job
of this schedule is still running (``overlap=False``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cluster import jobs
from dsl.contracts.config import ConfigError


def slot_id(name: str, now: float, every_s: float) -> str:
    """Return ``<name>-<slot epoch>``: ``now`` rounded down to a multiple of ``every_s``."""
    return f"{name}-{int(now // every_s * every_s)}"


def run_schedule(address: str, name: str, args: list[str], every_s: float, max_runs: int | None = None,
                 overlap: bool = False, ship_code: bool = True, clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] = print) -> list[str]:
    """Submit ``dsl <args>`` once per ``every_s`` seconds; returns the ids submitted."""
    submitted: list[str] = []
    last_slot = None
    while max_runs is None or len(submitted) < max_runs:
        now = clock()
        sid = slot_id(name, now, every_s)
        if sid != last_slot:
            last_slot = sid
            running = submitted and jobs.status(address, submitted[-1]) not in jobs.TERMINAL
            if running and not overlap:
                log(f"{sid}: skipped, {submitted[-1]} is still running")
            else:
                try:
                    jobs.submit(address, args, submission_id=sid, ship_code=ship_code)
                    submitted.append(sid)
                    log(f"{sid}: submitted dsl {' '.join(args)}")
                except Exception as e:  # duplicate id (another scheduler got the slot) or cluster down
                    log(f"{sid}: not submitted: {e}")
        time.sleep(max(0.05, min(every_s / 10, (now // every_s + 1) * every_s - clock())))
    return submitted


def seconds(text: str) -> float:
    """``30s``, ``15m``, ``6h``, ``1d`` or plain seconds -> seconds (finite, > 0).

    Raises:
        ConfigError: Not such a duration.
    """
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if not isinstance(text, str):  # argparse hands "--every=--" over as [] (it drops the "--")
        text = " ".join(map(str, text)) if isinstance(text, list) else str(text)
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"--every {text!r} is not a positive duration like 30s, 15m, 6h or 1d")
    return value


def command(cfg, args) -> int:
    """``dsl schedule``: submit the command after ``--`` once per ``--every``."""
    run_schedule(args.address, args.name, jobs.dsl_args(args.command_line), seconds(args.every),
                 max_runs=args.max_runs, ship_code=not args.no_ship_code)
    return 0
