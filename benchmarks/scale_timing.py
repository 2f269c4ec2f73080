#!/usr/bin/env python3
"""Time per update of the scale grid's sizes (benchmarks/scale.py), for sizing the grid.

Runs scripts/train.sh (the grid's recipe for that size: model, max-tokens, lr, dropout)
for a few updates without saving, and reads fairseq's train_inner lines (one per
--log-interval updates): seconds per update between the first logged interval and
the last (start-up, data loading and the first updates left out), target tokens per
second, and the batches of one epoch. Two ways of using the 2 cores:

  pair    vanilla and EA side by side, one thread each (scale.sh --jobs 2)
  single  vanilla, then EA, each alone with all the threads (scale.sh --jobs 1)

  python benchmarks/scale_timing.py --corpus tatoeba --size d256 --updates 200 --mode pair single
  python benchmarks/scale_timing.py --corpus multi30k --size d64 d128 d256 --updates 60 --mode pair

On a machine shared with other work, wall-clock time per update says little; the CPU
time the run's processes spent per update (fairseq-train and its data loader, read
from /proc at each train_inner line) is what one thread costs on a quiet machine, so
both are printed, with the load average before and after.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402

_INNER = re.compile(r"epoch (\d+):\s+(\d+) / (\d+) .*?wps=([\d.]+).*?wpb=([\d.]+).*?num_updates=(\d+)")


def _env(grid: scale.Grid, corpus: str, size: str, arm: str, updates: int, threads: int, save: Path) -> Dict:
    s, a = grid.size(size), grid.arm(arm)
    env = dict(os.environ)
    env.update({
        "MODEL": a.model, "DATA_BIN": str(scale._abs(grid.corpus(corpus).data_bin)), "SAVE_DIR": str(save),
        "MAX_UPDATE": str(updates), "LR": repr(s.lr), "WARMUP": str(s.warmup), "DROPOUT": repr(s.dropout),
        "MAX_TOKENS": str(s.max_tokens), "LOG_FORMAT": "simple", "LOG_INTERVAL": "10", "CPU": "1",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "EXTRA_ARGS": f"{s.model_args()} {a.args} --no-save --disable-validation",
    })
    env.pop("MAX_EPOCH", None)
    return env


def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process and its descendants so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


def _follow(procs: List) -> Dict[str, List]:
    """While the runs go on: (num_updates, CPU seconds, wall seconds) at each new
    train_inner line of each run's train.log."""
    seen: Dict[str, List] = {arm: [] for arm, *_ in procs}
    while any(p.poll() is None for _, p, *_ in procs):
        for arm, p, save, _ in procs:
            log = save / "train.log"
            if p.poll() is not None or not log.exists():
                continue
            ups = [int(u) for u in re.findall(r"num_updates=(\d+)", log.read_text(errors="replace"))]
            if ups and (not seen[arm] or ups[-1] > seen[arm][-1][0]):
                seen[arm].append((ups[-1], _cpu_seconds(p.pid), time.time()))
        time.sleep(0.1)
    return seen


def _parse(log: Path) -> Dict:
    """fairseq's wps is measured over each log interval: an interval of n updates of wpb
    target tokens on average took n * wpb / wps seconds (the first interval, with the
    start-up, is left out)."""
    rows = [m.groups() for m in _INNER.finditer(log.read_text(errors="replace"))]
    if len(rows) < 2:
        raise SystemExit(f"{log}: fewer than two train_inner lines (too few --updates?)")
    n = secs = tokens = 0.0
    for prev, row in zip(rows, rows[1:]):
        k = int(row[5]) - int(prev[5])
        wps, wpb = float(row[3]), float(row[4])
        n += k
        tokens += k * wpb
        secs += k * wpb / wps
    return {"batches_per_epoch": int(rows[0][2]), "updates_timed": int(n), "s_per_update": secs / n,
            "tokens_per_s": tokens / secs, "target_tokens_per_batch": tokens / n}


def measure(grid: scale.Grid, corpus: str, size: str, mode: str, updates: int, arms: List[str]) -> Dict:
    cpus = len(os.sched_getaffinity(0))
    out = {"corpus": corpus, "size": size, "mode": mode, "updates": updates,
           "load_before": os.getloadavg()[0], "arms": {}}
    train = str(scale.REPO / "scripts" / "train.sh")
    with tempfile.TemporaryDirectory() as tmp:
        procs, samples = [], {}
        start = time.time()
        for arm in arms:
            save = Path(tmp) / arm
            save.mkdir()
            env = _env(grid, corpus, size, arm, updates, 1 if mode == "pair" else cpus, save)
            logf = open(save / "stdout.log", "w")
            # train.sh ends in `exec fairseq-train`: the process is fairseq-train's
            p = subprocess.Popen(["bash", train, corpus], env=env, stdout=logf, stderr=subprocess.STDOUT)
            procs.append((arm, p, save, logf))
            if mode == "single":
                samples.update(_follow(procs[-1:]))
        if mode == "pair":
            samples.update(_follow(procs))
        for arm, p, save, logf in procs:
            p.wait()
            logf.close()
            if p.returncode != 0:
                raise SystemExit(f"{arm}: train.sh failed:\n{(save / 'stdout.log').read_text()[-3000:]}")
            out["arms"][arm] = _parse(save / "train.log")
            pts = samples[arm]
            if len(pts) >= 2:
                (u0, c0, w0), (u1, c1, w1) = pts[0], pts[-1]
                out["arms"][arm].update(cpu_s_per_update=(c1 - c0) / (u1 - u0), wall_s_per_update_sampled=(w1 - w0) / (u1 - u0))
        out["wall_s"] = time.time() - start
    out["load_after"] = os.getloadavg()[0]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", nargs="+", default=["multi30k", "tatoeba"])
    ap.add_argument("--size", nargs="+", default=["d64", "d128", "d256"])
    ap.add_argument("--mode", nargs="+", default=["pair"], choices=("pair", "single"))
    ap.add_argument("--arms", nargs="+", default=["vanilla", "ea"])
    ap.add_argument("--updates", type=int, default=60, help="updates per run (>= 30: the first 10 are not timed)")
    ap.add_argument("--grid", type=Path, help="a grid as JSON (default: scale.py's)")
    ap.add_argument("--json", type=Path, help="append the measurements here (JSON lines)")
    args = ap.parse_args(argv)
    grid = scale.load_grid(args.grid)
    print(f"{'corpus':<9} {'size':<5} {'mode':<7} {'arm':<8} {'wall s/up':>9} {'cpu s/up':>9} {'tok/s':>7} "
          f"{'batches/ep':>10} {'cpu min/ep':>10} {'load':>9}")
    for corpus in args.corpus:
        for size in args.size:
            for mode in args.mode:
                m = measure(grid, corpus, size, mode, args.updates, args.arms)
                for arm, r in m["arms"].items():
                    cpu = r.get("cpu_s_per_update", float("nan"))
                    print(f"{corpus:<9} {size:<5} {mode:<7} {arm:<8} {r['s_per_update']:>9.3f} {cpu:>9.3f} "
                          f"{r['tokens_per_s']:>7.0f} {r['batches_per_epoch']:>10} "
                          f"{cpu * r['batches_per_epoch'] / 60:>10.1f} "
                          f"{m['load_before']:>4.1f}/{m['load_after']:<4.1f}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(m) + "\n")


if __name__ == "__main__":
    main()
