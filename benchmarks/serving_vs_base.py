"""The serving benchmark on this checkout and on an earlier commit, in one run, side by side.

    .venv/bin/python benchmarks/serving_vs_base.py --base 1b8d368 [--duration 10] [--rounds 2]

Read-time window evaluation must not cost the prediction service more than a tenth of its
maximum calls/s (issue 13). Absolute figures on a shared two-core machine move 2-3x between
stretches of minutes, so the earlier commit is measured in the same run: a git worktree of
``--base`` (from this repository, no network) runs its own ``benchmarks/serving.py`` with this
checkout's virtualenv (the dependencies are the same), then this checkout runs its own, and the
two alternate for ``--rounds`` rounds; each side's best round counts.

Both sides run this checkout's ``benchmarks/serving.py`` (copied into the worktree: the driver,
data and load are the same, the server is each commit's own) on the same online data, made
once here: ``online_rows``, users and items whose last event lies anywhere in the week before
(most reads evaluate windows). This checkout's store holds each entity's update with its tiles,
as its stream writes it, and evaluates the windows at each read; the earlier commit's holds the
values those windows have at set-up (as a store rewritten the moment any window changed would:
the best the earlier commit could do), without tiles. So both serve the same values (the model,
the defaults for empty windows and the prediction events are the same work), and the difference
is what reading windows at read time costs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PASSES = (("max single", "calls_per_s"), ("batch 100", "items_per_s"), ("open 1000/s", "p99_ms"))
MAX_DROP = 0.10


def _worktree(base: str, into: Path) -> Path:
    tree = into / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), base], check=True)
    proto = "serving/api/v1/prediction.proto"  # its gRPC code, generated as infra/setup.sh does
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", proto],
        cwd=tree, check=True,
    )  # fmt: skip
    return tree


def _rows(into: Path) -> tuple[Path, Path]:
    """The online rows of both sides, pickled: (the earlier commit's, this checkout's)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.serving import bench_repository, online_rows
    from features.engine import evaluate_tiles

    end = time.time_ns() // 1_000_000 - 60_000
    rows = online_rows(bench_repository(), end)
    values = {
        fs: [(key, t, evaluate_tiles(tiles, end)[0]) for key, t, _values, _until, tiles in entities]
        for fs, entities in rows.items()
    }
    base, this = into / "rows-base.pkl", into / "rows-this.pkl"
    base.write_bytes(pickle.dumps(values))
    this.write_bytes(pickle.dumps(rows))
    return base, this


def _run(tree: Path, duration: float, out: Path, rows: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(
        [sys.executable, "benchmarks/serving.py", "--no-feast", "--duration", str(duration),
         "--json", str(out), "--rows", str(rows)],
        cwd=tree, env=env, check=False,  # it exits 1 when a target of its own fails: the figures count
    )  # fmt: skip
    if not out.exists():
        raise SystemExit(f"benchmarks/serving.py wrote no figures in {tree}: see its output above")
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="1b8d368", help="the earlier commit")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load pass")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hw-serving-vs-base-"))
    tree = _worktree(args.base, workdir)
    shutil.copy(ROOT / "benchmarks" / "serving.py", tree / "benchmarks" / "serving.py")
    rows = dict(zip(("base", "this"), _rows(workdir), strict=True))
    best: dict[str, dict[str, float]] = {"base": {}, "this": {}}
    try:
        for r in range(args.rounds):
            for side, where in (("base", tree), ("this", ROOT)):
                figures = _run(where, args.duration, workdir / f"{side}-{r}.json", rows[side])
                for name, key in PASSES:
                    value = figures[name][key]
                    kept = best[side].get(name)
                    if kept is None or (value < kept if key == "p99_ms" else value > kept):
                        best[side][name] = value
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nserving, best of {args.rounds} alternating rounds: {args.base} against this checkout")
    ok = True
    for name, key in PASSES:
        b, t = best["base"][name], best["this"][name]
        ratio = t / b
        line = f"  {name:<12} {key:<12} base {b:>12,.2f}   this {t:>12,.2f}   ratio {ratio:.3f}"
        if key != "p99_ms":
            passed = ratio >= 1 - MAX_DROP
            ok &= passed
            line += "  PASS" if passed else f"  FAIL (more than {MAX_DROP:.0%} below)"
        print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
