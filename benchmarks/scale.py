#!/usr/bin/env python3
"""The scale grid (issues 24 and 27): does evolving attention's gain hold as models grow?

Vanilla fairseq against evolving attention (EA, the defaults), residual attention alone
(``--ea-alpha 0``: the link between layers without the convolution) and EA in the
cross-attention too (``--ea-cross-attn``), at three model sizes, on all of Multi30k
De-En (lowercased) and on Tatoeba De-En (cased), several seeds per point, each run
trained to convergence (or to the epoch cap of its size) by ``benchmarks/quality.sh``
with one recipe per size: early stopping on the valid loss (``--patience``), the last
epoch checkpoints averaged, beam 5, sacreBLEU and chrF against the raw test text.

  bash benchmarks/scale.sh plan                  # the grid, what is done, expected hours
  bash benchmarks/scale.sh run --jobs 2          # train what is missing, two runs at a time
  bash benchmarks/scale.sh run --only 'd64/'     # a part of the grid (regex on point names)
  bash benchmarks/scale.sh report                # results/scale.json and results/scale.png

A point's name is ``<corpus>/<size>/<arm>/seed<N>`` (e.g. ``tatoeba/d256/residual/seed2``).
Runs live in ``checkpoints/scale/<corpus>/<size>/<arm>/seed<N>/``. ``run`` is resumable:
started again, it skips finished points, evaluates trained ones and continues the others
from their ``checkpoint_last.pt`` (quality.sh's resume). As soon as a run is evaluated its
summary (quality_report.collect_run's record: BLEU, chrF, signatures, the valid curve,
updates and time, parameters, recipe) is written to
``results/scale/<corpus>/<size>/<arm>/seed<N>.json``, its detokenised test translations
beside it (``seed<N>.hyp.<lang>``, for the paired tests), and both are committed to git
(``--no-commit`` to leave them uncommitted): a session that ends mid-grid loses at most
the runs in progress. Checkpoints are never committed.

The grid and its recipe per size are ``default_grid()`` below (sizing and timings:
docs/scale.md); ``--grid FILE`` runs another one given as JSON in the same layout
(the CI test runs a toy grid this way).
"""

import argparse
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_report  # noqa: E402


# -------------------------------------------------------------------------- the grid

@dataclass
class Size:
    """A model size and its training recipe (the same for every arm and corpus)."""

    name: str
    dim: int  # d_model of encoder and decoder (embeddings shared: --share-all-embeddings)
    layers: int  # encoder layers = decoder layers
    ffn: int  # FFN inner size
    heads: int
    lr: float  # peak of the inverse-sqrt schedule
    warmup: int  # updates
    dropout: float
    max_tokens: int = 4096
    patience: int = 3  # epochs without a better valid loss before stopping
    max_epoch: Dict[str, int] = field(default_factory=dict)  # cap per corpus (absent: MAX_UPDATE only)
    max_update: int = 100000
    num_avg: int = 3  # last epoch checkpoints averaged for decoding
    extra_args: str = ""  # more fairseq-train arguments

    def model_args(self) -> str:
        d, f, h, n = self.dim, self.ffn, self.heads, self.layers
        args = (f"--encoder-layers {n} --decoder-layers {n} --encoder-embed-dim {d} --decoder-embed-dim {d} "
                f"--encoder-ffn-embed-dim {f} --decoder-ffn-embed-dim {f} "
                f"--encoder-attention-heads {h} --decoder-attention-heads {h}")
        return f"{args} {self.extra_args}".strip()


@dataclass
class Arm:
    name: str
    model: str  # ea | vanilla (scripts/train.sh's MODEL)
    args: str  # fairseq-train arguments on top of the recipe


@dataclass
class Corpus:
    name: str  # quality.sh's corpus (and train.sh / evaluate.sh's benchmark)
    data_bin: str  # relative to the repository, or absolute
    prepare: List[str]  # scripts/<recipe> [args]
    prepare_env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Block:
    """Which arms and seeds run at a size."""

    size: str
    arms: List[str]
    seeds: List[int]


@dataclass
class Grid:
    corpora: List[Corpus]
    sizes: List[Size]
    arms: List[Arm]
    blocks: List[Block]
    env: Dict[str, str] = field(default_factory=dict)  # for every run (e.g. GEN_ARGS)
    # measured cost, for `plan`: "<corpus>/<size>" -> {"epoch_s": s, "epochs": expected epochs}
    # (one thread per run, two runs side by side; docs/scale.md)
    estimates: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def size(self, name: str) -> Size:
        return next(s for s in self.sizes if s.name == name)

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def corpus(self, name: str) -> Corpus:
        return next(c for c in self.corpora if c.name == name)

    def points(self) -> List["Point"]:
        """Every run of the grid, in the order they are started: seed by seed (the first
        seed of every point before any second seed), then size by size (smallest first),
        corpus by corpus, arm by arm. A grid stopped early so has whole curves with fewer
        seeds rather than some sizes with every seed and others with none."""
        out = []
        order = {s.name: i for i, s in enumerate(self.sizes)}
        blocks = sorted(self.blocks, key=lambda b: order[b.size])
        for k in range(max((len(b.seeds) for b in blocks), default=0)):
            for block in blocks:
                if k >= len(block.seeds):
                    continue
                for corpus in self.corpora:
                    for arm in block.arms:
                        out.append(Point(corpus.name, block.size, arm, block.seeds[k]))
        return out

    def validate(self) -> None:
        names = {s.name for s in self.sizes}
        arms = {a.name for a in self.arms}
        for b in self.blocks:
            if b.size not in names:
                raise SystemExit(f"grid: block size {b.size!r} is not one of the sizes {sorted(names)}")
            for a in b.arms:
                if a not in arms:
                    raise SystemExit(f"grid: arm {a!r} of size {b.size} is not one of the arms {sorted(arms)}")
        for s in self.sizes:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", s.name):
                raise SystemExit(f"grid: size name {s.name!r}: expected letters, digits, '.', '_' or '-'")
            if s.dim % s.heads:
                raise SystemExit(f"grid: size {s.name}: dim {s.dim} is not a multiple of heads {s.heads}")


@dataclass(frozen=True)
class Point:
    corpus: str
    size: str
    arm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.corpus}/{self.size}/{self.arm}/seed{self.seed}"


ARMS = [
    Arm("vanilla", "vanilla", ""),
    Arm("ea", "ea", ""),
    Arm("residual", "ea", "--ea-alpha 0"),  # M_l = (1 - beta) S_l + beta A_{l-1}, no conv (docs/realformer.md)
    Arm("ea-cross", "ea", "--ea-cross-attn"),
]


def default_grid() -> Grid:
    """The grid of issues 24 and 27, sized for about 30 hours of a 2-core CPU (docs/scale.md)."""
    sizes = [
        # today's converged CPU model (results/multi30k10k.json), the same recipe
        Size("d64", dim=64, layers=2, ffn=256, heads=4, lr=2e-3, warmup=200, dropout=0.2,
             max_epoch={"multi30k": 40, "tatoeba": 12}),
        # the quickstart's model
        Size("d128", dim=128, layers=3, ffn=512, heads=4, lr=1.5e-3, warmup=400, dropout=0.2,
             max_epoch={"multi30k": 30, "tatoeba": 10}),
        # transformer-base proportions at d=256 (FFN 4d, 4 heads of 64); Tatoeba's cap is the
        # ~2,600 updates Multi30k d256 levels off in, so that a run ends within one session
        Size("d256", dim=256, layers=3, ffn=1024, heads=4, lr=1e-3, warmup=500, dropout=0.3,
             max_epoch={"multi30k": 20, "tatoeba": 6}),
    ]
    corpora = [
        Corpus("multi30k", "data-bin/multi30k.de-en", ["prepare-multi30k.sh"]),
        Corpus("tatoeba", "data-bin/tatoeba.de-en", ["prepare-tatoeba.sh"]),
    ]
    every = [a.name for a in ARMS]
    blocks = [
        Block("d64", every, [1, 2, 3]),
        Block("d128", ["vanilla", "ea"], [1, 2]),
        Block("d256", every, [1, 2]),
    ]
    return Grid(corpora, sizes, list(ARMS), blocks, estimates=ESTIMATES)


# seconds per epoch (training + validation, one thread, two runs side by side, glibc's heap
# kept: scripts/train.sh), expected epochs (the cap, or fewer where early stopping is
# expected first) and seconds to average and decode the test set, per corpus and size:
# docs/scale.md has the measurements behind them
ESTIMATES: Dict[str, Dict[str, float]] = {
    "multi30k/d64": {"epoch_s": 64, "epochs": 40, "eval_s": 120},
    "tatoeba/d64": {"epoch_s": 215, "epochs": 12, "eval_s": 360},
    "multi30k/d128": {"epoch_s": 136, "epochs": 25, "eval_s": 150},
    "tatoeba/d128": {"epoch_s": 510, "epochs": 10, "eval_s": 500},
    "multi30k/d256": {"epoch_s": 343, "epochs": 18, "eval_s": 300},
    "tatoeba/d256": {"epoch_s": 1285, "epochs": 6, "eval_s": 900},
}


def load_grid(path: Optional[Path]) -> Grid:
    if path is None:
        grid = default_grid()
    else:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        try:
            grid = Grid(
                corpora=[Corpus(**c) for c in raw["corpora"]],
                sizes=[Size(**s) for s in raw["sizes"]],
                arms=[Arm(**a) for a in raw.get("arms", [dataclasses.asdict(a) for a in ARMS])],
                blocks=[Block(**b) for b in raw["blocks"]],
                env={k: str(v) for k, v in raw.get("env", {}).items()},
                estimates=raw.get("estimates", {}),
            )
        except (KeyError, TypeError) as e:
            raise SystemExit(f"{path}: not a grid file ({e}); see default_grid() in benchmarks/scale.py")
    grid.validate()
    return grid


def grid_json(grid: Grid) -> Dict:
    return dataclasses.asdict(grid)


# ------------------------------------------------------------------ parameter counts

def count_params(size: Size, vocab: int, arm: Arm, kernel_size: int = 3) -> int:
    """Parameters the model trains (those that get a gradient), for fairseq's transformer
    at this size with --share-all-embeddings (sinusoidal positions, post-norm, biases
    everywhere; not the copy of each encoder layer's weights that fairseq 0.12.2 keeps
    for its fused inference path), plus EA's convolutions: one
    H x H x k x k conv with bias per layer after the first of each EA stack (none with
    --ea-alpha 0; encoder and decoder self-attention, and cross-attention with
    --ea-cross-attn). Checked against fairseq's own count by tests/test_scale.py."""
    d, f, n, h = size.dim, size.ffn, size.layers, size.heads
    attn = 4 * d * d + 4 * d  # q, k, v, out projections with biases
    ffn = 2 * d * f + d + f
    ln = 2 * d
    enc = n * (attn + ffn + 2 * ln)
    dec = n * (2 * attn + ffn + 3 * ln)
    total = vocab * d + enc + dec
    if arm.model == "ea" and not re.search(r"--ea-alpha\s+0(\.0*)?(\s|$)", arm.args):
        stacks = 2 + ("--ea-cross-attn" in arm.args)
        total += stacks * (n - 1) * (h * h * kernel_size * kernel_size + h)
    return total


def dictionary_size(data_bin: Path) -> Optional[int]:
    """fairseq's dictionary size for a joined dictionary: 4 specials + the entries of
    dict.<lang>.txt, padded to a multiple of 8 (fairseq-preprocess's padding_factor)."""
    prepared = data_bin / "PREPARED"
    if not prepared.exists():
        return None
    info = dict(line.split("=", 1) for line in prepared.read_text().splitlines() if "=" in line)
    d = data_bin / f"dict.{info.get('target', 'en')}.txt"
    if not d.exists():
        return None
    n = 4 + sum(1 for line in d.read_text(encoding="utf-8").splitlines() if line.strip())
    return n + (-n) % 8


_PARAMS = re.compile(r"num\. shared model params: ([\d,]+)")


def logged_params(run: Path) -> Optional[int]:
    for name in ("train.log", "run.log"):
        p = run / name
        if p.exists():
            m = _PARAMS.search(p.read_text(encoding="utf-8", errors="replace"))
            if m:
                return int(m.group(1).replace(",", ""))
    return None


# ----------------------------------------------------------------------- the runner

def log(msg: str, level: str = "INFO") -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {level} | scale | {msg}", file=sys.stderr, flush=True)


@dataclass
class Layout:
    runs: Path  # checkpoints/scale
    results: Path  # results/scale

    def run_dir(self, p: Point) -> Path:
        return self.runs / p.corpus / p.size / p.arm / f"seed{p.seed}"

    def result_json(self, p: Point) -> Path:
        return self.results / p.corpus / p.size / p.arm / f"seed{p.seed}.json"

    def result_hyp(self, p: Point, tgt: str) -> Path:
        return self.results / p.corpus / p.size / p.arm / f"seed{p.seed}.hyp.{tgt}"


def _abs(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def _prepared_info(data_bin: Path) -> Dict[str, str]:
    text = (data_bin / "PREPARED").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def state(grid: Grid, layout: Layout, p: Point) -> str:
    """done | evaluated (not collected) | started (epochs so far) | todo"""
    if layout.result_json(p).exists():
        return "done"
    run = layout.run_dir(p)
    if (run / "eval" / "test.json").exists():
        return "evaluated"
    if (run / "checkpoint_last.pt").exists() or (run / "TRAINED").exists():
        return "started"
    return "todo"


def epochs_logged(run: Path) -> int:
    log_file = run / "train.log"
    if not log_file.exists():
        return 0
    return len(set(re.findall(r"epoch (\d+) \| valid on 'valid' subset", log_file.read_text(errors="replace"))))


def prepare_corpora(grid: Grid, corpora: Sequence[str]) -> None:
    """Prepare each corpus the runs need, one at a time, before any run starts (two runs
    must not prepare the same corpus at once)."""
    for name in corpora:
        c = grid.corpus(name)
        data_bin = _abs(c.data_bin)
        if (data_bin / "PREPARED").exists():
            continue
        log(f"preparing {name} -> {data_bin}")
        env = {**os.environ, **c.prepare_env, "DEST": str(data_bin)}
        cmd = ["bash", str(REPO / "scripts" / c.prepare[0]), *c.prepare[1:]]
        if subprocess.run(cmd, env=env).returncode != 0:
            raise SystemExit(f"preparing {name} failed: {' '.join(cmd)}")


def point_env(grid: Grid, layout: Layout, p: Point, threads: int, jobs: int) -> Dict[str, str]:
    size, arm, corpus = grid.size(p.size), grid.arm(p.arm), grid.corpus(p.corpus)
    env = dict(os.environ)
    env.update(grid.env)
    env.update({
        "MODE": "scale", "ONLY": arm.name, "SEEDS": str(p.seed),
        "RUNS_DIR": str(layout.runs / p.corpus / p.size), "DATA_BIN": str(_abs(corpus.data_bin)),
        "MODEL_ARGS": size.model_args(), "PATIENCE": str(size.patience), "MAX_UPDATE": str(size.max_update),
        "NUM_AVG": str(size.num_avg), "LR": repr(size.lr), "WARMUP": str(size.warmup),
        "DROPOUT": repr(size.dropout), "MAX_TOKENS": str(size.max_tokens), "PRUNE": "1", "CPU": "1",
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "SCALE_JOBS": str(jobs),
    })
    cap = size.max_epoch.get(p.corpus)
    if cap:
        env["MAX_EPOCH"] = str(cap)
    else:
        env.pop("MAX_EPOCH", None)
    # the arm's own arguments come from quality.sh's MODE=scale settings (checked equal)
    return env


def collect(grid: Grid, layout: Layout, p: Point, threads: int, jobs: int) -> Path:
    """Write the point's summary and hypotheses under results/ (atomically)."""
    corpus, size, arm = grid.corpus(p.corpus), grid.size(p.size), grid.arm(p.arm)
    data_bin = _abs(corpus.data_bin)
    tgt = _prepared_info(data_bin)["target"]
    refs = quality_report._read(data_bin / f"test.raw.{tgt}")
    run = layout.run_dir(p)
    rec = quality_report.collect_run(run, tgt, refs)
    if (rec.get("args") or "") != arm.args:
        raise SystemExit(f"{run}: trained with arguments {rec.get('args')!r}, the grid's arm {arm.name} has "
                         f"{arm.args!r} (quality.sh's MODE=scale settings and scale.py's ARMS disagree)")
    hyp_src = REPO / rec["hypotheses"] if not Path(rec["hypotheses"]).is_absolute() else Path(rec["hypotheses"])
    out_json, out_hyp = layout.result_json(p), layout.result_hyp(p, tgt)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hyp_src, out_hyp.with_name(out_hyp.name + ".tmp"))
    os.replace(out_hyp.with_name(out_hyp.name + ".tmp"), out_hyp)
    secs = (run / "train_seconds").read_text().split() if (run / "train_seconds").exists() else []
    vocab = dictionary_size(data_bin)
    # how it was trained (run.json, written by quality.sh when training started), else how it is collected now
    given = json.loads((run / "run.json").read_text()).get("train_env", {}) if (run / "run.json").exists() else {}
    rec.update({
        "point": p.name, "corpus": p.corpus, "size": p.size, "arm": p.arm,
        # the parameters the model uses; fairseq's own log line counts, for vanilla, the second copy
        # of each encoder layer's weights that fairseq 0.12.2 keeps for its fused inference path
        "params": count_params(size, vocab, arm) if vocab else None,
        "params_fairseq_log": logged_params(run),
        "size_spec": dataclasses.asdict(size),
        "recipe": {"lr": size.lr, "warmup": size.warmup, "dropout": size.dropout, "max_tokens": size.max_tokens,
                   "patience": size.patience, "max_epoch": size.max_epoch.get(p.corpus), "num_avg": size.num_avg,
                   "beam": 5},
        "threads": int(given.get("OMP_NUM_THREADS", threads)), "jobs": int(given.get("SCALE_JOBS", jobs)),
        "invocations": len(secs) or None,
        "data_bin": quality_report._rel(data_bin), "prepared": _prepared_info(data_bin),
        "hypotheses": quality_report._rel(out_hyp),
        "run_dir": quality_report._rel(run),
        "collected": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    tmp = out_json.with_name(out_json.name + ".tmp")
    tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out_json)
    return out_json


def git_commit(paths: Sequence[Path], message: str, tries: int = 60, wait: float = 2.0) -> bool:
    """git add -f PATHS && git commit -m MESSAGE -- PATHS in the work tree holding them
    (results/ is git-ignored but for the summaries: -f), retrying while another
    process holds the index lock. Only these paths are committed, whatever else is
    staged. False (with a warning) where there is no work tree or git fails."""
    where = Path(paths[0]).parent
    top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        log(f"{where} is not in a git work tree: not committed", "WARNING")
        return False
    root = top.stdout.strip()
    files = [str(Path(p).resolve()) for p in paths]
    err = ""
    for _ in range(tries):
        add = subprocess.run(["git", "-C", root, "add", "-f", "--", *files], capture_output=True, text=True)
        if add.returncode == 0:
            staged = subprocess.run(["git", "-C", root, "diff", "--cached", "--quiet", "--", *files])
            if staged.returncode == 0:
                return True  # already committed as they are
            done = subprocess.run(["git", "-C", root, "commit", "-q", "-m", message, "--", *files],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return True
            err = done.stderr + done.stdout
        else:
            err = add.stderr
        if "index.lock" not in err:
            break
        time.sleep(wait)
    log(f"git commit of {', '.join(files)} failed: {err.strip()[-500:]}", "WARNING")
    return False


class Runner:
    def __init__(self, grid: Grid, layout: Layout, jobs: int, threads: int, commit: bool):
        self.grid, self.layout, self.jobs, self.threads, self.commit = grid, layout, jobs, threads, commit
        self.running: Dict[subprocess.Popen, Point] = {}
        self.failed: List[Point] = []
        self.finished: List[Point] = []

    def _start(self, p: Point) -> None:
        run = self.layout.run_dir(p)
        run.mkdir(parents=True, exist_ok=True)
        corpus = self.grid.corpus(p.corpus)
        out = open(run / "scale.log", "a", encoding="utf-8")
        cmd = ["bash", str(REPO / "benchmarks" / "quality.sh"), corpus.name, "--runs-only"]
        proc = subprocess.Popen(cmd, env=point_env(self.grid, self.layout, p, self.threads, self.jobs), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.running[proc] = p
        log(f"{p.name}: started ({self.threads} thread(s); log: {quality_report._rel(run)}/scale.log)")

    def _finish(self, proc: subprocess.Popen, p: Point) -> None:
        run = self.layout.run_dir(p)
        if proc.returncode != 0 or not (run / "eval" / "test.json").exists():
            log(f"{p.name}: failed (exit {proc.returncode}; see {quality_report._rel(run)}/scale.log and run.log)",
                "ERROR")
            self.failed.append(p)
            return
        self._collect(p)

    def _collect(self, p: Point) -> None:
        out = collect(self.grid, self.layout, p, self.threads, self.jobs)
        rec = json.loads(out.read_text())
        hours = (rec.get("train_seconds_measured") or 0) / 3600
        msg = (f"results/scale: {p.corpus} {p.size} {p.arm} seed {p.seed}: sacreBLEU {rec['sacrebleu']}, "
               f"chrF {rec['chrf']} ({rec['epochs']} epochs, stopped by {rec['stopped_by']}, {hours:.2f} h)")
        log(f"{p.name}: sacreBLEU {rec['sacrebleu']}, chrF {rec['chrf']} -> {quality_report._rel(out)}")
        if self.commit:
            hyp = REPO / rec["hypotheses"] if not Path(rec["hypotheses"]).is_absolute() else Path(rec["hypotheses"])
            if git_commit([out, hyp], msg):
                log(f"{p.name}: committed")
        self.finished.append(p)

    def stop(self, signum, _frame) -> None:
        log(f"signal {signum}: stopping {len(self.running)} run(s); they resume from checkpoint_last.pt next time",
            "WARNING")
        for proc in self.running:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for proc in self.running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(130)

    def lock(self) -> None:
        """One runner per run folder: a second `scale.sh run` would train the same points."""
        self.layout.runs.mkdir(parents=True, exist_ok=True)
        path = self.layout.runs / ".runner.lock"
        self._lock = open(path, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            raise SystemExit(f"another scale.sh run is using {self.layout.runs} (process {self._lock.read().strip()}); "
                             "wait for it to end, or stop it: it resumes where it stopped")
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def run(self, points: List[Point]) -> None:
        self.lock()
        todo = []
        for p in points:
            st = state(self.grid, self.layout, p)
            if st == "evaluated":
                self._collect(p)
            elif st != "done":
                todo.append(p)
        if not todo:
            log("nothing to train: every selected point is done")
            return
        prepare_corpora(self.grid, sorted({p.corpus for p in todo}, key=[c.name for c in self.grid.corpora].index))
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        log(f"{len(todo)} run(s) to train, {self.jobs} at a time with {self.threads} thread(s) each")
        queue = list(todo)
        while queue or self.running:
            while queue and len(self.running) < self.jobs:
                self._start(queue.pop(0))
            time.sleep(1.0)
            for proc in [q for q in self.running if q.poll() is not None]:
                self._finish(proc, self.running.pop(proc))


# ------------------------------------------------------------------------------ CLI

def select(points: List[Point], only: Optional[str]) -> List[Point]:
    if not only:
        return points
    try:
        rx = re.compile(only)
    except re.error as e:
        raise SystemExit(f"--only {only!r}: not a regular expression ({e})")
    return [p for p in points if rx.search(p.name)]


def plan(grid: Grid, layout: Layout, points: List[Point]) -> None:
    total_h = left_h = 0.0
    print(f"{'point':<34} {'state':<10} {'params':>9} {'epochs':>7} {'est. h':>7}")
    for p in points:
        st = state(grid, layout, p)
        run = layout.run_dir(p)
        vocab = dictionary_size(_abs(grid.corpus(p.corpus).data_bin))
        params = count_params(grid.size(p.size), vocab, grid.arm(p.arm)) if vocab else None
        est = grid.estimates.get(f"{p.corpus}/{p.size}")
        hours = est["epoch_s"] * est["epochs"] / 3600 + est.get("eval_s", 0) / 3600 if est else None
        done_epochs = epochs_logged(run)
        if hours is not None:
            total_h += hours
            if st not in ("done", "evaluated"):
                left_h += max(0.0, hours - done_epochs * est["epoch_s"] / 3600)
        shown = f"{st}" + (f" ({done_epochs})" if st == "started" else "")
        print(f"{p.name:<34} {shown:<10} {params or '-':>9} {done_epochs or '-':>7} "
              f"{'-' if hours is None else f'{hours:.2f}':>7}")
    if total_h:
        print(f"{len(points)} runs; expected {total_h:.1f} run-hours (one thread each), {left_h:.1f} left: "
              f"about {left_h / 2:.1f} h of wall time at --jobs 2 on 2 cores")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scale.sh", description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("plan", "run", "report", "grid"),
                    help="plan: list the points and their state; run: train and evaluate what is missing; "
                         "report: write the results from the finished points; grid: print the grid as JSON")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (run)")
    ap.add_argument("--threads", type=int, help="threads per run (OMP/MKL; default: the CPUs divided by --jobs)")
    ap.add_argument("--only", help="regular expression on point names <corpus>/<size>/<arm>/seed<N> (searched)")
    ap.add_argument("--no-commit", dest="commit", action="store_false",
                    help="leave the per-run summaries uncommitted (default: commit each as soon as it is written)")
    ap.add_argument("--no-report", dest="report", action="store_false", help="run: do not write the report at the end")
    ap.add_argument("--grid", type=Path, help="a grid as JSON (the layout of `scale.sh grid`)")
    ap.add_argument("--runs", type=Path, default=REPO / "checkpoints" / "scale", help="run folders")
    ap.add_argument("--results", type=Path, default=REPO / "results" / "scale", help="per-run summaries")
    ap.add_argument("--json", type=Path, default=REPO / "results" / "scale.json", help="report: the results file")
    ap.add_argument("--png", type=Path, default=REPO / "results" / "scale.png", help="report: the picture")
    ap.add_argument("--paired-bs-n", type=int, default=1000, help="report: bootstrap resamples")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: expected 1 or more")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: expected 1 or more")
    grid = load_grid(args.grid)
    layout = Layout(args.runs.resolve(), args.results.resolve())
    points = select(grid.points(), args.only)
    if args.command == "grid":
        print(json.dumps(grid_json(grid), indent=1))
        return 0
    if args.command == "plan":
        plan(grid, layout, points)
        return 0
    if args.command == "run":
        if not points:
            raise SystemExit(f"--only {args.only!r} selects no point of the grid (see: scale.sh plan)")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = args.threads or max(1, cpus // args.jobs)
        runner = Runner(grid, layout, args.jobs, threads, args.commit)
        runner.run(points)
        if runner.failed:
            log(f"{len(runner.failed)} run(s) failed: {', '.join(p.name for p in runner.failed)} "
                "(started again, scale.sh resumes them)", "ERROR")
        if not args.report:
            return 1 if runner.failed else 0
    import scale_report

    scale_report.write_report(grid, layout, args.json, args.png, args.paired_bs_n)
    if args.command == "run" and args.commit and runner.finished:
        # the README's and docs' tables of results/scale.json go with it (tests/test_results_tables.py)
        sys.path.insert(0, str(REPO / "scripts"))
        import results_tables

        tables = results_tables.update(results_tables.default_files()) \
            if args.json.resolve() == (REPO / "results" / "scale.json").resolve() else []
        git_commit([args.json, args.png, *tables], f"results/scale.json, scale.png: the report after "
                                                   f"{len(runner.finished)} more run(s) of the scale grid")
    return 1 if args.command == "run" and runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
