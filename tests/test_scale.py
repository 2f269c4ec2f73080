"""The scale grid (benchmarks/scale.py, scale_report.py, scale.sh): the grid holds what
issues 24 and 27 ask for; parameter counts match the models; residual attention alone
(--ea-alpha 0) builds no convolution anywhere; the report on a synthetic, partly
finished grid; committing with a held index lock; and the whole pipeline at toy size
(the Tatoeba recipe on a slice, two tiny runs side by side through quality.sh, per-run
summaries committed, the report and its picture, a second call that trains nothing)."""

import json
import os
import random
import re
import shlex
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import BIN
from helpers import REPO, DummyTask, make_dictionary, parse_model_args
from test_tatoeba_recipe import slice_tatoeba

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import scale  # noqa: E402
import scale_report  # noqa: E402
import scale_timing  # noqa: E402


# ------------------------------------------------------------------------ the grid

def test_default_grid_is_the_one_the_issues_ask_for():
    grid = scale.default_grid()
    sizes = {s.name: s for s in grid.sizes}
    small, large = grid.sizes[0], grid.sizes[-1]
    assert (small.dim, small.layers, small.ffn, small.heads) == (64, 2, 256, 4)  # today's converged model
    assert large.dim >= 256 and large.layers >= 3
    for s in grid.sizes:
        assert s.ffn == 4 * s.dim and s.heads in (4, s.dim // 64), s.name  # transformer-base proportions
        assert set(s.max_epoch) <= {c.name for c in grid.corpora}
    assert [s.dim for s in grid.sizes] == sorted(s.dim for s in grid.sizes) and len(sizes) == 3
    assert [c.name for c in grid.corpora] == ["multi30k", "tatoeba"]
    assert {(a.name, a.model, a.args) for a in grid.arms} == {
        ("vanilla", "vanilla", ""), ("ea", "ea", ""), ("residual", "ea", "--ea-alpha 0"),
        ("ea-cross", "ea", "--ea-cross-attn")}
    blocks = {b.size: b for b in grid.blocks}
    every = {"vanilla", "ea", "residual", "ea-cross"}
    assert set(blocks[small.name].arms) == every and set(blocks[large.name].arms) == every
    assert {"vanilla", "ea"} <= set(blocks[grid.sizes[1].name].arms)
    assert len(blocks[small.name].seeds) >= 3 and all(len(b.seeds) >= 2 for b in grid.blocks)
    points = grid.points()
    assert len(points) == len(set(points))
    # the residual arm has the seeds of vanilla and EA wherever it runs
    for corpus in ("multi30k", "tatoeba"):
        for size in sizes:
            seeds = {a: {p.seed for p in points if (p.corpus, p.size, p.arm) == (corpus, size, a)} for a in every}
            if seeds["residual"]:
                assert seeds["residual"] == seeds["vanilla"] == seeds["ea"]


def test_quality_sh_scale_settings_are_the_grids_arms():
    """scale.py runs each arm through quality.sh's MODE=scale settings: the two lists agree."""
    text = (Path(REPO) / "benchmarks" / "quality.sh").read_text()
    block = re.search(r"\n  scale\)\n(.*?)\n    ;;", text, re.S).group(1)
    settings = re.findall(r'"([\w.-]+)\|(ea|vanilla)\|([^"]*)"', block)
    assert settings == [(a.name, a.model, a.args) for a in scale.ARMS]


def test_grid_file_round_trips_and_is_checked(tmp_path):
    grid = scale.default_grid()
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(scale.grid_json(grid)))
    assert scale.grid_json(scale.load_grid(path)) == scale.grid_json(grid)
    bad = scale.grid_json(grid)
    bad["blocks"][0]["arms"].append("conv-only")
    path.write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="arm 'conv-only' of size d64 is not one of the arms"):
        scale.load_grid(path)
    path.write_text(json.dumps({"sizes": []}))
    with pytest.raises(SystemExit, match="not a grid file"):
        scale.load_grid(path)


def test_only_selects_points_by_name():
    points = scale.default_grid().points()
    assert {p.arm for p in scale.select(points, "/residual/")} == {"residual"}
    assert {(p.corpus, p.size) for p in scale.select(points, "^tatoeba/d256/")} == {("tatoeba", "d256")}
    with pytest.raises(SystemExit, match="not a regular expression"):
        scale.select(points, "(")


# ---------------------------------------------------------------------- the models

TINY_SIZE = scale.Size("t", dim=16, layers=3, ffn=32, heads=4, lr=1e-3, warmup=1, dropout=0.0)


def _trained_params(arm: scale.Arm, size: scale.Size = TINY_SIZE):
    """The model train.sh would build for this arm (fairseq's argument parsing, shared
    embeddings), and the number of parameter entries that get a gradient in a
    forward and backward pass."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    arch = "ea_transformer" if arm.model == "ea" else "transformer"
    d = make_dictionary(24)
    args = parse_model_args(arch, shlex.split(size.model_args()) + ["--share-all-embeddings"] + shlex.split(arm.args))
    torch.manual_seed(0)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, DummyTask(d)).train()
    src = torch.randint(4, len(d), (2, 7))
    src[:, -1] = d.eos()
    prev = torch.randint(4, len(d), (2, 6))
    prev[:, 0] = d.eos()
    out, _ = model(src, torch.tensor([7, 7]), prev)
    out.sum().backward()
    used = sum(p.numel() for p in model.parameters() if p.grad is not None)
    return model, used, len(d)


@pytest.mark.parametrize("arm", scale.ARMS, ids=lambda a: a.name)
def test_parameter_count_is_the_models(arm):
    model, used, vocab = _trained_params(arm)
    assert scale.count_params(TINY_SIZE, vocab, arm) == used


def test_residual_arm_builds_no_convolution_in_any_layer():
    """--ea-alpha 0 (the residual arm): no conv in any layer of any EA stack, and
    exactly vanilla's trained parameters; EA's defaults build one conv per layer
    after the first of each stack (so that the check can fail)."""
    arms = {a.name: a for a in scale.ARMS}
    residual, _, _ = _trained_params(scale.Arm("residual+cross", "ea", "--ea-alpha 0 --ea-cross-attn"))
    assert not [n for n, m in residual.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert not [n for n, _ in residual.named_parameters() if "conv" in n]
    assert _trained_params(arms["residual"])[1] == _trained_params(arms["vanilla"])[1]
    ea, _, _ = _trained_params(scale.Arm("ea+cross", "ea", "--ea-cross-attn"))
    convs = [n for n, m in ea.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 * (TINY_SIZE.layers - 1), convs


# ---------------------------------------------------------- the report, synthetic

def _sentences(n: int, rng: random.Random):
    words = "a dog runs on the grass while two men in red shirts play ball near a small lake".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n)]


def _degrade(refs, rate: float, rng: random.Random):
    out = []
    for r in refs:
        w = r.split()
        out.append(" ".join(x if rng.random() > rate else "xyz" for x in w))
    return out


def _write_point(layout, p, refs, hyps, params, epochs=4):
    from sacrebleu.metrics import BLEU, CHRF

    layout.result_json(p).parent.mkdir(parents=True, exist_ok=True)
    hyp = layout.result_hyp(p, "en")
    hyp.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    curve = [{"epoch": e, "updates": 10 * e, "valid_loss": 8.0 - e * 0.5 + 0.01 * p.seed, "wall_s": 60.0 * e}
             for e in range(1, epochs + 1)]
    rec = {"seed": p.seed, "sacrebleu": round(BLEU().corpus_score(hyps, [refs]).score, 2),
           "chrf": round(CHRF().corpus_score(hyps, [refs]).score, 2), "tokenized_bleu": 1.0,
           "sacrebleu_signature": "nrefs:1|synthetic", "chrf_signature": "nrefs:1|synthetic",
           "epochs": epochs, "best_epoch": epochs, "updates": 10 * epochs, "updates_to_best": 10 * epochs,
           "best_valid_loss": curve[-1]["valid_loss"], "wall_s": 60.0 * epochs, "wall_s_to_best": 60.0 * epochs,
           "train_seconds_measured": 60 * epochs, "stopped_by": "patience", "params": params, "curve": curve,
           "hypotheses": str(hyp), "prepared": {"target": "en"}}
    layout.result_json(p).write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Two corpora, two sizes (all four arms at s1, vanilla and EA at s2), two seeds:
    at c1/s1 vanilla and EA have both seeds, residual only seed 1, EA + cross none; the
    rest is not run. EA's translations are better than vanilla's by construction."""
    root = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    refs = _sentences(300, rng)
    c1 = root / "c1-bin"
    c1.mkdir()
    (c1 / "PREPARED").write_text("source=de\ntarget=en\n")
    (c1 / "test.raw.en").write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    (c1 / "dict.en.txt").write_text("".join(f"w{i} 1\n" for i in range(52)))
    grid = scale.Grid(
        corpora=[scale.Corpus("c1", str(c1), ["prepare-x.sh"]), scale.Corpus("c2", str(root / "c2-bin"), ["x"])],
        sizes=[scale.Size("s1", 16, 2, 64, 4, 1e-3, 10, 0.1), scale.Size("s2", 32, 2, 128, 4, 1e-3, 10, 0.1)],
        arms=list(scale.ARMS),
        blocks=[scale.Block("s1", [a.name for a in scale.ARMS], [1, 2]), scale.Block("s2", ["vanilla", "ea"], [1, 2])])
    layout = scale.Layout(root / "runs", root / "results")
    rates = {"vanilla": 0.45, "ea": 0.15, "residual": 0.3}
    done = [("vanilla", 1), ("vanilla", 2), ("ea", 1), ("ea", 2), ("residual", 1)]
    for arm, seed in done:
        hyps = _degrade(refs, rates[arm] + 0.02 * seed, random.Random(seed * 7 + len(arm)))
        _write_point(layout, scale.Point("c1", "s1", arm, seed), refs, hyps, params=10000 + len(arm))
    report = scale_report.write_report(grid, layout, root / "scale.json", root / "scale.png", n=100)
    return root, grid, layout, report, refs


def test_report_marks_what_is_missing(synthetic):
    root, grid, layout, report, _ = synthetic
    assert json.loads((root / "scale.json").read_text()) == json.loads(json.dumps(report))
    prog = report["progress"]
    assert prog["runs_done"] == 5 and prog["runs_planned"] == 2 * (4 * 2 + 2 * 2) and not prog["complete"]
    assert "c1/s1/ea-cross/seed1" in prog["missing"] and "c2/s2/ea/seed2" in prog["missing"]
    assert "c1/s1/vanilla/seed1" not in prog["missing"]
    c1, c2 = report["corpora"]
    s1, s2 = c1["sizes"]
    assert not s1["complete"] and s1["missing"] == ["c1/s1/residual/seed2", "c1/s1/ea-cross/seed1",
                                                    "c1/s1/ea-cross/seed2"]
    assert s2["missing"] == [f"c1/s2/{a}/seed{s}" for a in ("vanilla", "ea") for s in (1, 2)]
    assert c2["test_sentences"] is None and all(not s["complete"] for s in c2["sizes"])
    assert s1["arms"]["ea-cross"]["runs"] == [] and s1["arms"]["ea-cross"]["sacrebleu"]["mean"] is None
    # parameters: recorded by the runs where there are runs, computed from the dictionary otherwise
    assert s1["arms"]["vanilla"]["params"] == 10007
    vocab = 4 + 52 + (-(4 + 52)) % 8
    assert s2["arms"]["vanilla"]["params"] == scale.count_params(grid.size("s2"), vocab, grid.arm("vanilla"))


def test_report_statistics_and_paired_tests(synthetic):
    _, _, layout, report, refs = synthetic
    s1 = report["corpora"][0]["sizes"][0]
    van, ea = s1["arms"]["vanilla"], s1["arms"]["ea"]
    bleus = [r["sacrebleu"] for r in van["runs"]]
    assert van["sacrebleu"]["n"] == 2 and van["sacrebleu"]["mean"] == pytest.approx(sum(bleus) / 2, abs=0.01)
    assert van["sacrebleu"]["min"] == min(bleus) and van["sacrebleu"]["max"] == max(bleus)
    comps = {(c["system"], c["baseline"]): c for c in s1["comparisons"]}
    assert list(comps) == scale_report.COMPARISONS
    ev = comps[("ea", "vanilla")]
    assert ev["status"] == "tested" and ev["seeds"] == [1, 2] and [t["seed"] for t in ev["per_seed"]] == [1, 2]
    for key in ("bleu", "chrf"):
        g = ev[f"gain_{key}"]
        assert g["ci95"][0] <= g["delta"] <= g["ci95"][1] and 0 <= g["p_value"] <= 1
        assert g["delta"] > 0 and g["ci95"][0] > 0  # EA is far better by construction
        assert g["seed_ranges_overlap"] is False and g["verdict"].startswith("ahead, beyond the seed spread")
        assert g["delta"] == pytest.approx(ev["pooled"][key]["system"] - ev["pooled"][key]["baseline"], abs=0.02)
    assert ev["gain_bleu"]["seed_deltas"] == [round(e["sacrebleu"] - v["sacrebleu"], 2)
                                              for e, v in zip(ea["runs"], van["runs"])]
    # one common seed: tested on that seed alone; no seed spread to compare with
    er = comps[("ea", "residual")]
    assert er["seeds"] == [1] and er["gain_bleu"]["seed_ranges_overlap"] is None
    assert comps[("ea-cross", "vanilla")]["status"].startswith("missing")
    s2 = report["corpora"][0]["sizes"][1]
    assert [c["status"] for c in s2["comparisons"]] == ["missing: no seed finished in both arms"]


def test_delta_interval_against_sacrebleu():
    from sacrebleu.metrics import BLEU

    rng = random.Random(1)
    refs = _sentences(200, rng)
    a, b = _degrade(refs, 0.3, rng), _degrade(refs, 0.2, rng)
    delta, lo, hi = scale_report.delta_interval(a, b, refs, 200, "bleu")
    expect = BLEU().corpus_score(b, [refs]).score - BLEU().corpus_score(a, [refs]).score
    assert delta == pytest.approx(expect, abs=0.01) and lo < delta < hi
    assert scale_report.delta_interval(a, a, refs, 50, "chrf") == (0.0, 0.0, 0.0)


def test_report_picture(synthetic):
    root = synthetic[0]
    png = (root / "scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 1500 and height > 1000


# ---------------------------------------------------------------------- commits

def _repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for cmd in (["init", "-q"], ["config", "user.name", "test"], ["config", "user.email", "test@example.com"],
                ["commit", "-q", "--allow-empty", "-m", "start"]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True)
    return path


def test_commit_waits_for_the_index_lock_and_commits_only_its_files(tmp_path):
    repo = _repo(tmp_path / "repo")
    (repo / ".gitignore").write_text("/results/*\n")
    other = repo / "staged-by-someone-else.txt"
    other.write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", other.name], check=True)
    f = repo / "results" / "scale" / "c" / "s" / "a" / "seed1.json"
    f.parent.mkdir(parents=True)
    f.write_text("{}")
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    threading.Timer(1.5, lock.unlink).start()
    start = time.time()
    assert scale.git_commit([f], "results: one run", wait=0.5)
    assert time.time() - start >= 1.4
    log = subprocess.run(["git", "-C", str(repo), "show", "--name-only", "--format=%s", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert log[:2] == ["results:", "one"] and "results/scale/c/s/a/seed1.json" in log and other.name not in log
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert f"A  {other.name}" in status  # still staged, not committed
    assert scale.git_commit([f], "again: nothing changed")  # nothing to commit is fine
    (tmp_path / "elsewhere").mkdir()
    assert not scale.git_commit([tmp_path / "elsewhere" / "seed1.json"], "not in a work tree")


def test_a_second_runner_on_the_same_runs_is_refused(tmp_path):
    layout = scale.Layout(tmp_path / "runs", tmp_path / "results")
    first = scale.Runner(scale.default_grid(), layout, 1, 1, False)
    first.lock()
    with pytest.raises(SystemExit, match=f"another scale.sh run is using .* \\(process {os.getpid()}\\)"):
        scale.Runner(scale.default_grid(), layout, 1, 1, False).lock()


def test_timing_parser_reads_intervals():
    log = "\n".join(
        f"epoch 001:     {u} / 130 loss=9, nll_loss=9, ppl=1, wps={w}, ups=1, wpb={b}, bsz=9, num_updates={u}, lr=1"
        for u, w, b in ((10, 100, 1000), (20, 1000, 2000), (30, 2000, 2000)))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"timing-{os.getpid()}.log"
    path.write_text(log)
    r = scale_timing._parse(path)
    path.unlink()
    assert r["batches_per_epoch"] == 130 and r["updates_timed"] == 20
    assert r["s_per_update"] == pytest.approx((10 * 2000 / 1000 + 10 * 2000 / 2000) / 20)
    assert r["tokens_per_s"] == pytest.approx(40000 / 30)


# ------------------------------------------------------------- the toy pipeline

def _toy_grid(root: Path, tatoeba: Path) -> Path:
    grid = {
        "corpora": [{"name": "tatoeba", "data_bin": str(root / "data-bin"), "prepare": ["prepare-tatoeba.sh"],
                     "prepare_env": {"TATOEBA_DIR": str(tatoeba), "WORK": str(root / "work"), "BPE_TOKENS": "200",
                                     "WORKERS": "1", "EA_PYTHON": sys.executable}}],
        "sizes": [{"name": "d16", "dim": 16, "layers": 2, "ffn": 32, "heads": 2, "lr": 0.002, "warmup": 10,
                   "dropout": 0.1, "max_tokens": 1500, "patience": 1, "max_epoch": {"tatoeba": 2}, "num_avg": 2,
                   "extra_args": "--num-workers 0"}],
        "blocks": [{"size": "d16", "arms": ["vanilla", "ea"], "seeds": [1]}],
        "env": {"GEN_ARGS": "--max-len-a 0 --max-len-b 12", "EA_PYTHON": sys.executable},
    }
    path = root / "grid.json"
    path.write_text(json.dumps(grid))
    return path


def _scale(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EA_PYTHON=sys.executable, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    repo = root / "repo"
    cmd = ["bash", f"{REPO}/benchmarks/scale.sh", *args, "--grid", str(root / "grid.json"), "--runs",
           str(root / "runs"), "--results", str(repo / "results" / "scale"), "--json", str(repo / "results" / "scale.json"),
           "--png", str(repo / "results" / "scale.png"), "--paired-bs-n", "20"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_toy")
    tatoeba = slice_tatoeba(root / "tatoeba", n_train=300, n_eval=30)
    _toy_grid(root, tatoeba)
    repo = _repo(root / "repo")
    (repo / ".gitignore").write_text("/results/*\n!/results/*.json\n!/results/*.png\n")
    start = time.time()
    proc = _scale(root, "run", "--jobs", "2")
    return root, proc, time.time() - start


def _commits(repo: Path):
    """[[subject, file, ...], ...], newest first."""
    out = subprocess.run(["git", "-C", str(repo), "log", "--format=@@%s", "--name-only"], capture_output=True,
                         text=True, check=True).stdout
    commits = []
    for line in out.splitlines():
        if line.startswith("@@"):
            commits.append([line[2:]])
        elif line.strip():
            commits[-1].append(line)
    return commits


def test_toy_grid_runs_side_by_side_and_commits_each_run(toy):
    root, proc, seconds = toy
    print(f"toy grid: {seconds:.0f} s")
    assert "2 run(s) to train, 2 at a time with 1 thread(s) each" in proc.stderr
    results = root / "repo" / "results" / "scale" / "tatoeba" / "d16"
    for arm in ("vanilla", "ea"):
        rec = json.loads((results / arm / "seed1.json").read_text())
        assert rec["point"] == f"tatoeba/d16/{arm}/seed1" and rec["arm"] == arm and rec["seed"] == 1
        assert 0 <= rec["sacrebleu"] <= 100 and 0 < rec["chrf"] <= 100
        assert rec["sacrebleu_signature"].startswith("nrefs:1|case:mixed|")
        assert [p["epoch"] for p in rec["curve"]] == [1, 2] and rec["epochs"] == 2
        assert rec["recipe"]["max_epoch"] == 2 and rec["recipe"]["lr"] == 0.002 and rec["threads"] == 1
        assert rec["jobs"] == 2 and rec["invocations"] == 1
        size = scale.Size(**{k: v for k, v in rec["size_spec"].items()})
        vocab = scale.dictionary_size(root / "data-bin")
        assert rec["params"] == scale.count_params(size, vocab, scale.ARMS[0 if arm == "vanilla" else 1])
        assert rec["params_fairseq_log"] >= rec["params"]
        run_json = json.loads((root / "runs" / "tatoeba" / "d16" / arm / "seed1" / "run.json").read_text())
        assert run_json["train_env"]["OMP_NUM_THREADS"] == "1" and run_json["train_env"]["LR"] == "0.002"
        hyps = (results / arm / "seed1.hyp.en").read_text(encoding="utf-8").splitlines()
        assert len(hyps) == 30
    # each run committed on its own, with only its two files
    commits = _commits(root / "repo")
    runs = [c for c in commits if c[0].startswith("results/scale: tatoeba d16")]
    assert len(runs) == 2
    for c in runs:
        arm = c[0].split()[3]
        assert sorted(c[1:]) == [f"results/scale/tatoeba/d16/{arm}/seed1.hyp.en",
                                 f"results/scale/tatoeba/d16/{arm}/seed1.json"]
    # and the report, once the runs are done
    assert any(c[0].startswith("results/scale.json, scale.png: the report after 2 more run(s)") and
               sorted(c[1:]) == ["results/scale.json", "results/scale.png"] for c in commits)
    # checkpoints stay out of results/ and of git
    assert not list((root / "repo").rglob("*.pt"))


def test_toy_report_is_well_formed(toy):
    root = toy[0]
    report = json.loads((root / "repo" / "results" / "scale.json").read_text())
    assert report["progress"] == {"runs_done": 2, "runs_planned": 2, "complete": True, "missing": []}
    (corpus,) = report["corpora"]
    assert corpus["corpus"] == "tatoeba" and corpus["test_sentences"] == 30
    (size,) = corpus["sizes"]
    assert size["complete"] and size["params"] == size["arms"]["vanilla"]["params"]
    assert set(size["arms"]) == {"vanilla", "ea"} and size["arms"]["ea"]["params"] > size["params"]
    (comp,) = size["comparisons"]
    assert (comp["system"], comp["baseline"], comp["status"], comp["seeds"]) == ("ea", "vanilla", "tested", [1])
    for key in ("bleu", "chrf"):
        g = comp[f"gain_{key}"]
        assert g["ci95"][0] <= g["delta"] <= g["ci95"][1] and 0 <= g["p_value"] <= 1 and g["verdict"]
    assert "bs:20" in report["paired_test"]["signatures"]["BLEU"]
    png = (root / "repo" / "results" / "scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000


def test_toy_second_call_trains_nothing_and_recollects(toy):
    root = toy[0]
    before = _commits(root / "repo")
    logs = {p: p.read_text() for p in (root / "runs").rglob("run.log")}
    proc = _scale(root, "run", "--jobs", "2", "--no-report")
    assert "nothing to train" in proc.stderr
    assert {p: p.read_text() for p in logs} == logs and _commits(root / "repo") == before
    # a summary lost (not yet written when a session ended): written again from the evaluated run
    summary = root / "repo" / "results" / "scale" / "tatoeba" / "d16" / "ea" / "seed1.json"
    summary.unlink()
    subprocess.run(["git", "-C", str(root / "repo"), "rm", "-q", "--cached", str(summary)], check=True)
    subprocess.run(["git", "-C", str(root / "repo"), "commit", "-q", "-m", "lost"], check=True)
    proc = _scale(root, "run", "--no-report", "--only", "/ea/")
    assert "nothing to train" in proc.stderr and summary.exists()
    assert {p: p.read_text() for p in logs} == logs
    assert _commits(root / "repo")[0][0].startswith("results/scale: tatoeba d16 ea seed 1")
    plan = _scale(root, "plan").stdout
    assert re.search(r"tatoeba/d16/vanilla/seed1\s+done", plan) and re.search(r"tatoeba/d16/ea/seed1\s+done", plan)
