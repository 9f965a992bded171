"""Kill rate per module of the last ``make mutate`` run (mutmut's result files, JSON only).

mutmut 3 keeps one ``mutants/<source path>.meta`` JSON file per mutated module; its
``exit_code_by_key`` maps every mutant to the exit code of the tests run against it. This
script turns those codes into statuses (mutmut's own table), prints one line per module and
then a JSON summary on the last line::

    module                   killed  total    rate  survived  timeout  no-tests  other
    dsl/finetune/metrics.py     252    255   98.8%         3        0         0      0

``rate`` is killed / total. Every other status counts against the module: ``survived`` (the
tests passed with the mutant in place), ``timeout`` (the tests ran past mutmut's limit: an
endless loop the tests did catch, or a slow run on a busy machine, so it is listed apart and
worth a rerun), ``no-tests`` (no fast test calls the mutated function), ``other`` (not run yet,
interrupted, segfault, suspicious). The JSON also gives ``rate_with_timeouts``, (killed +
timeout) / total, mutmut's own score. ``--survivors`` lists the surviving mutants' names,
for ``mutmut show <name>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit-code -> status table (mutmut/stats.py, pinned in pyproject.toml's dev extra)
KILLED_CODES = {1, 3}
SURVIVED_CODES = {0}
NO_TESTS_CODES = {5, 33}
TIMEOUT_CODES = {36, -24, 24, 152, 255}
NOT_CHECKED = None


def status(exit_code: int | None) -> str:
    """The mutant's status for an exit code, as mutmut names it (coarser for the rare ones).

    Args:
        exit_code: The tests' exit code recorded for the mutant (None: not run yet).

    Returns:
        ``killed``, ``survived``, ``timeout``, ``no tests``, ``not checked`` or ``other``.
    """
    if exit_code is NOT_CHECKED:
        return "not checked"
    if exit_code in KILLED_CODES:
        return "killed"
    if exit_code in SURVIVED_CODES:
        return "survived"
    if exit_code in TIMEOUT_CODES:
        return "timeout"
    if exit_code in NO_TESTS_CODES:
        return "no tests"
    return "other"


def module_of(meta: Path, root: Path) -> str:
    """``dsl/finetune/metrics.py`` for ``<root>/dsl/finetune/metrics.py.meta``."""
    return meta.relative_to(root).as_posix().removesuffix(".meta")


def read_results(root: Path) -> dict[str, dict[str, int | None]]:
    """Mutant name -> exit code, per module, from every ``*.meta`` file under ``root``.

    Raises:
        FileNotFoundError: ``root`` holds no result file (mutmut has not run).
        ValueError: A result file is not mutmut's JSON.
    """
    metas = sorted(p for p in root.rglob("*.py.meta") if p.is_file())
    if not metas:
        raise FileNotFoundError(f"no mutmut results (*.py.meta) under {root}: run `make mutate` first")
    out = {}
    for meta in metas:
        try:
            codes = json.loads(meta.read_text())["exit_code_by_key"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{meta}: not a mutmut result file ({e})") from None
        if not isinstance(codes, dict):
            raise ValueError(f"{meta}: exit_code_by_key is not a mapping")
        out[module_of(meta, root)] = codes
    return out


def summarise(codes: dict[str, int | None]) -> dict:
    """Counts and kill rate of one module's mutants.

    Args:
        codes: Mutant name -> exit code (None: not run).

    Returns:
        ``killed``, ``timeout``, ``survived``, ``no_tests``, ``other`` (not checked,
        interrupted, crashed), ``total``, ``rate`` (killed / total, 1.0 for a module without
        mutants), ``rate_with_timeouts`` ((killed + timeout) / total) and the sorted
        ``survivors``.
    """
    counts = Counter(status(c) for c in codes.values())
    total = len(codes)
    caught = counts["killed"] + counts["timeout"]
    return {
        "killed": counts["killed"],
        "timeout": counts["timeout"],
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "other": counts["not checked"] + counts["other"],
        "total": total,
        "rate": counts["killed"] / total if total else 1.0,
        "rate_with_timeouts": caught / total if total else 1.0,
        "survivors": sorted(k for k, c in codes.items() if status(c) == "survived"),
    }


def report(results: dict[str, dict[str, int | None]], survivors: bool = False) -> tuple[list[str], dict]:
    """The table lines and the JSON summary of all modules.

    Args:
        results: Per module, mutant name -> exit code (:func:`read_results`).
        survivors: Add each surviving mutant's name under its module's line.

    Returns:
        The lines to print, and ``{"modules": {module: counts}, "total": counts}`` where counts
        are :func:`summarise`'s without the survivor names.
    """
    width = max(len(m) for m in results)
    lines = [f"{'module':<{width}}  killed  total    rate  survived  timeout  no-tests  other"]
    modules, all_codes = {}, {}
    for module, codes in sorted(results.items()):
        s = summarise(codes)
        lines.append(f"{module:<{width}}  {s['killed']:>6}  {s['total']:>5}  {s['rate']:>6.1%}  "
                     f"{s['survived']:>8}  {s['timeout']:>7}  {s['no_tests']:>8}  {s['other']:>5}")
        if survivors:
            lines += [f"    survived: {name}" for name in s["survivors"]]
        modules[module] = {k: v for k, v in s.items() if k != "survivors"}
        all_codes.update(codes)
    total = {k: v for k, v in summarise(all_codes).items() if k != "survivors"}
    t = total
    lines.append(f"{'all':<{width}}  {t['killed']:>6}  {t['total']:>5}  {t['rate']:>6.1%}  "
                 f"{t['survived']:>8}  {t['timeout']:>7}  {t['no_tests']:>8}  {t['other']:>5}")
    return lines, {"modules": modules, "total": total}


def main(argv: list[str] | None = None) -> int:
    """Print the per-module table and the JSON summary.

    Returns:
        0; 1 when ``--fail-under`` is given and a module's rate is below it; 2 without results.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's folder (default: mutants)")
    parser.add_argument("--survivors", action="store_true", help="list the surviving mutants per module")
    parser.add_argument("--fail-under", type=float, metavar="PERCENT",
                        help="exit 1 if a module's kill rate is below PERCENT")
    args = parser.parse_args(argv)
    try:
        results = read_results(args.mutants)
    except (FileNotFoundError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    lines, summary = report(results, args.survivors)
    print("\n".join(lines))
    print(json.dumps(summary, sort_keys=True))
    if args.fail_under is not None:
        low = [m for m, s in summary["modules"].items() if s["rate"] * 100 < args.fail_under]
        if low:
            print(f"kill rate below {args.fail_under}%: {', '.join(low)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
