"""Wall time of ``distillery demo``: cold (a fresh workdir) then warm (everything reused).

    python -m benchmarks.demo [--preset tiny|full] [--workdir DIR]

Both runs are separate processes, as a user runs them: the cold one with ``--fresh``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_demo(preset: str, workdir: Path, fresh: bool) -> float:
    cmd = [sys.executable, "-m", "distillery.cli", "demo", "--preset", preset, "--workdir", str(workdir)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd + (["--fresh"] if fresh else []), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "full"], default="full")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="distillery-bench-demo-") as tmp:
        workdir = args.workdir or Path(tmp) / "demo"
        cold = run_demo(args.preset, workdir, fresh=True)
        warm = run_demo(args.preset, workdir, fresh=False)
    out = {"cold_s": round(cold, 1), "warm_s": round(warm, 1), "preset": args.preset}
    print(f"distillery demo --preset {args.preset}: cold {out['cold_s']} s (goal <= 900), "
          f"warm {out['warm_s']} s (goal <= 180)")
    return out


if __name__ == "__main__":
    main()
