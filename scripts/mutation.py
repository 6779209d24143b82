"""`make mutation`: a mutation score for the modules that hold the mathematics.

mutmut (configured in pyproject.toml, [tool.mutmut]) changes one expression at a time in the modules
below (an operator, a constant, an argument dropped) and runs the fast tests that reach the changed
function; a mutant the tests do not notice "survives". This script runs it, then scores each module:
killed / all mutants, and lists every survivor with its diff. A survivor that cannot change what the
code computes (an equivalent mutant) is listed in scripts/mutation_equivalent/<group>.txt with the reason;
the report marks it so. Writes outputs/mutation/mutation.json and the table of docs/mutation.md.

    python scripts/mutation.py                # run mutmut, then report
    python scripts/mutation.py --report-only  # report on the last run's results (mutants/)
    python scripts/mutation.py --only "text23d.geometry.*"   # only these modules' mutants (mutmut's names)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.85  # of the mutants of each module, killed
# The groups the issue names, and the modules in each (pyproject.toml's only_mutate lists the same).
GROUPS = {
    "guidance": ["text23d/guidance/base.py", "text23d/guidance/sds.py", "text23d/guidance/vsd.py",
                 "text23d/guidance/cfg.py"],
    "geometry": ["text23d/geometry/grid.py", "text23d/geometry/hashgrid.py", "text23d/geometry/hashenc.py",
                 "text23d/geometry/dmtet.py", "text23d/geometry/base.py"],
    "renderers": ["text23d/renderers/volume.py", "text23d/renderers/rasterize.py"],
    "prior": ["text23d/prior/prior.py"],
    "export": ["text23d/export/threshold.py", "text23d/export/mesh.py", "text23d/export/texture.py"],
}
CUDA_ONLY = "CUDA only:"  # a listed survivor whose reason starts so: code this machine cannot run, not equivalent
EQUIVALENT = Path(__file__).with_name("mutation_equivalent")  # <group>.txt: module || old line || new line || reason


def run_mutmut(children: int, only: list[str]) -> float:
    """mutmut run, from a fresh copy (mutants/ is rebuilt: results from older code do not count)."""
    import shutil

    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = ROOT / "outputs" / "mutation" / "mutmut.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:  # mutmut's progress line redraws itself: kept in the log, not the console
        rc = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(children), *only],
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"mutmut run failed (exit {rc}); its output: {log}")
    return time.monotonic() - start


def results() -> dict[str, str]:
    """{mutant name: status} of the last run, from mutmut's own files."""
    os.chdir(ROOT)  # mutmut reads its config and mutants/ from the project root
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in (ROOT / "mutants").rglob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = "not run" if code is None else status_by_exit_code[code]
    return out


def diff_of(name: str) -> list[str]:
    """The changed lines of a mutant ("- old", "+ new"), whitespace stripped (mutmut's own diff)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    text = get_diff_for_mutant(name, path=Path(module_of(name)))
    return [f"{line[0]} {line[1:].strip()}" for line in text.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def equivalents() -> dict[tuple[str, str, str], str]:
    """(module, old line, new line) -> why the mutant cannot change a result."""
    table = {}
    lines = [line for f in sorted(EQUIVALENT.glob("*.txt")) for line in f.read_text().splitlines()]
    for line in lines:
        if line.strip() and not line.startswith("#"):
            parts = [part.strip() for part in line.split(" || ")]  # " | " is Python's or: not a separator
            if len(parts) != 4:
                raise SystemExit(f"{line!r}: an equivalent mutant is 'module || old line || new line || reason' "
                                 f"(4 fields, {len(parts)} here). Fix: the line in scripts/mutation_equivalent/.")
            module, old, new, reason = parts
            table[(module, old, new)] = reason
    return table


def module_of(name: str) -> str:
    return name.split(".x")[0].replace(".", "/") + ".py"


def report(seconds: float | None, only: list[str]) -> dict:
    import fnmatch

    status = {n: s for n, s in results().items() if not only or any(fnmatch.fnmatch(n, g) for g in only)}
    known = equivalents()
    modules, survivors = {}, []
    for name, s in sorted(status.items()):
        m = modules.setdefault(module_of(name), {"mutants": 0, "killed": 0, "survived": 0, "equivalent": 0, "cuda_only": 0})
        m["mutants"] += 1
        if s in ("killed", "timeout"):
            m["killed"] += 1
            continue
        d = diff_of(name)
        old = next((x[2:] for x in d if x.startswith("-")), "")
        new = next((x[2:] for x in d if x.startswith("+")), "")
        reason = known.get((module_of(name), old, new))
        m["survived" if not reason else "cuda_only" if reason.startswith(CUDA_ONLY) else "equivalent"] += 1
        survivors.append({"mutant": name, "status": s, "old": old, "new": new, "equivalent": reason})
    groups = {}
    for group, files in GROUPS.items():
        rows = [modules.get(f, {"mutants": 0, "killed": 0, "survived": 0, "equivalent": 0, "cuda_only": 0}) for f in files]
        if only and not any(f in modules for f in files):
            continue  # a group outside --only: not run
        total = {k: sum(r[k] for r in rows) for k in rows[0]}
        total["score"] = round(total["killed"] / max(total["mutants"], 1), 4)
        groups[group] = total
    for m in modules.values():
        m["score"] = round(m["killed"] / max(m["mutants"], 1), 4)
    return {"goal": GOAL, "seconds": None if seconds is None else round(seconds), "groups": groups,
            "modules": modules, "survivors": survivors,
            "met": all(g["score"] >= GOAL for g in groups.values())
            and all(s["equivalent"] for s in survivors)}


def table(rep: dict) -> str:
    lines = ["| group | module | mutants | killed | survived: equivalent (listed) | survived: CUDA only (listed) "
             "| survived, not yet killed | score |", "|---|---|---|---|---|---|---|---|"]
    for group, files in GROUPS.items():
        if group not in rep["groups"]:
            continue
        for f in files:
            m = rep["modules"].get(f)
            if m:
                lines.append(f"| {group} | `{f.split('/', 1)[1]}` | {m['mutants']} | {m['killed']} | {m['equivalent']} | "
                             f"{m['cuda_only']} | {m['survived']} | {100 * m['score']:.1f} % |")
        g = rep["groups"][group]
        lines.append(f"| **{group}** | | **{g['mutants']}** | **{g['killed']}** | **{g['equivalent']}** | "
                     f"**{g['cuda_only']}** | **{g['survived']}** | **{100 * g['score']:.1f} %** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="report on the mutants/ a run left")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "mutation" / "mutation.json"))
    parser.add_argument("--only", nargs="*", default=[], metavar="GLOB",
                        help="mutmut mutant names to run and report, e.g. 'text23d.geometry.*'")
    args = parser.parse_args()
    seconds = None if args.report_only else run_mutmut(args.children, args.only)
    rep = report(seconds, args.only)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1) + "\n")
    print(table(rep))
    for s in rep["survivors"]:
        if not s["equivalent"]:
            print(f"survived: {s['mutant']} ({s['status']}): {s['old']!r} -> {s['new']!r}")
    print(f"{'met' if rep['met'] else 'NOT met'}: every group ≥ {GOAL:.0%} killed and every survivor listed as "
          f"equivalent; report: {args.out}" + (f"; {rep['seconds']} s" if seconds else ""))
    sys.exit(0 if rep["met"] else 1)


if __name__ == "__main__":
    main()
