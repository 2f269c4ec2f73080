#!/usr/bin/env python3
"""Collect the runs of benchmarks/quality.sh into one results file and a plot.

For every finished run (RUNS/<setting>/seed<N>/ with eval/test.json):
  * tokenised BLEU and sacreBLEU (+ signature) from scripts/evaluate.sh's eval/test.json,
    chrF (+ signature) computed here on the same detokenised hypotheses;
  * from fairseq's log: the valid loss after every epoch, the update and wall time at the
    best valid loss ("to convergence") and at the end, and why training stopped
    (patience, or a cap: max-update / max-epoch).
Per setting: mean and sample standard deviation over seeds, and a paired bootstrap test
against vanilla (sacreBLEU's paired test, the code behind `sacrebleu --paired-bs`, on
the hypothesis files), for BLEU and chrF:
  * per seed: setting seed s against vanilla seed s;
  * pooled: the seeds' hypotheses concatenated (the test set repeated once per common
    seed) against vanilla's concatenated the same way, i.e. the setting's average over
    seeds against vanilla's.
The PNG has the valid loss against updates and against wall time, per setting the mean
over seeds (line) and their range (band).

  python benchmarks/quality_report.py --runs checkpoints/quality/multi30k --corpus multi30k \
      --data-bin data-bin/multi30k.de-en --json results/multi30k.json --png results/multi30k.png \
      --settings "vanilla|vanilla|" "ea|ea|" "ea-cross|ea|--ea-cross-attn"
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_VALID = re.compile(r"\| valid on 'valid' subset \| (.*)$")
# the end-of-epoch training line ("| train | epoch 003 | loss ... | wall 144" on stdout,
# without the logger prefix in --log-file); train_inner lines read "epoch 003:  10 / 130 loss=..."
_TRAIN_EPOCH = re.compile(r"epoch (\d+) \| (loss .*)$")
_EARLY_STOP = "early stop since valid performance hasn't improved"


REPO = Path(__file__).resolve().parents[1]


def _rel(path) -> str:
    """A path relative to the repository when inside it (committed results carry no
    machine-specific prefix), else as given."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def _fields(text: str) -> Dict[str, str]:
    """'loss 3.2 | nll_loss 2.1 | ...' -> {'loss': '3.2', ...}"""
    out = {}
    for part in text.split(" | "):
        bits = part.strip().split(" ", 1)
        if len(bits) == 2:
            out[bits[0]] = bits[1].strip()
    return out


def parse_log(path: Path) -> Dict:
    """Valid curve and stopping reason from a fairseq-train log (simple format).

    Returns {"curve": [{"epoch", "updates", "valid_loss", "valid_nll_loss", "wall_s"}...]
    (one point per epoch; a resumed run's repeated epochs keep their last value and its
    wall time goes on from the checkpoint it resumed from),
    "stopped_by": "patience" | "cap"}.
    """
    valid: Dict[int, Dict] = {}
    walls: Dict[int, float] = {}
    offset, last_wall = 0.0, 0.0
    stopped_by = "cap"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _VALID.search(line)
            if m:
                head = line[: m.start()]
                ep = re.search(r"epoch (\d+)", head)
                fields = _fields(m.group(1))
                if ep is None or "loss" not in fields or "num_updates" not in fields:
                    continue
                epoch = int(ep.group(1))
                valid[epoch] = {"epoch": epoch, "updates": int(fields["num_updates"]),
                                "valid_loss": float(fields["loss"]),
                                "valid_nll_loss": float(fields.get("nll_loss", "nan"))}
                continue
            m = _TRAIN_EPOCH.search(line)
            if m:
                fields = _fields(m.group(2))
                if "wall" in fields:
                    epoch, wall = int(m.group(1)), float(fields["wall"])
                    if wall < last_wall:
                        # fairseq's wall clock restarts with each process: a resumed run
                        # continues from the epoch it resumed after (the time lost between
                        # that checkpoint and the interruption is not counted)
                        offset = walls.get(epoch - 1, offset + last_wall)
                    last_wall = wall
                    walls[epoch] = wall + offset
                continue
            if _EARLY_STOP in line:
                stopped_by = "patience"
    curve = []
    for epoch in sorted(valid):
        point = dict(valid[epoch])
        point["wall_s"] = walls.get(epoch)
        curve.append(point)
    if not curve:
        raise SystemExit(f"{path}: no \"valid on 'valid' subset\" line (did training validate?)")
    return {"curve": curve, "stopped_by": stopped_by}


def _read(path: Path) -> List[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def collect_run(run: Path, tgt: str, refs: List[str]) -> Dict:
    """One finished run's numbers (see the module docstring)."""
    from sacrebleu.metrics import CHRF

    meta = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    res = json.loads((run / "eval" / "test.json").read_text())
    hyp_file = run / "eval" / f"test.detok.{tgt}"
    hyps = _read(hyp_file)
    if len(hyps) != len(refs):
        raise SystemExit(f"{hyp_file}: {len(hyps)} lines for {len(refs)} references")
    chrf = CHRF()
    log = run / "train.log"
    if not log.exists() or _VALID.search(log.read_text(encoding="utf-8", errors="replace")) is None:
        log = run / "run.log"  # fairseq's stdout, captured by quality.sh
    parsed = parse_log(log)
    curve = parsed["curve"]
    best = min(curve, key=lambda p: p["valid_loss"])
    secs = [int(x) for x in (run / "train_seconds").read_text().split()] if (run / "train_seconds").exists() else []
    return {
        "setting": run.parent.name,
        "seed": int(run.name.replace("seed", "")),
        "model": meta.get("model"),
        "args": meta.get("args"),
        **{k: meta.get(k) for k in ("model_args", "patience", "num_avg", "max_update", "max_epoch")},
        "tokenized_bleu": res["tokenized_bleu"],
        "sacrebleu": res["sacrebleu"],
        "sacrebleu_signature": res["sacrebleu_signature"],
        "chrf": round(chrf.corpus_score(hyps, [refs]).score, 2),
        "chrf_signature": str(chrf.get_signature()),
        "epochs": curve[-1]["epoch"],
        "updates": curve[-1]["updates"],
        "best_epoch": best["epoch"],
        "updates_to_best": best["updates"],
        "best_valid_loss": best["valid_loss"],
        "best_valid_nll_loss": best["valid_nll_loss"],
        "wall_s_to_best": best["wall_s"],
        "wall_s": curve[-1]["wall_s"],
        "train_seconds_measured": sum(secs) if secs else None,
        "stopped_by": parsed["stopped_by"],
        "checkpoint": _rel(res["checkpoint"]) if res.get("checkpoint") else None,
        "hypotheses": _rel(hyp_file),
        "cpu": meta.get("cpu"),
        "cpus_available": meta.get("cpus_available"),
        "curve": curve,
    }


def _stats(values: List[float]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(statistics.mean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else None, "n": len(values)}


def paired_test(base: List[str], system: List[str], refs: List[str], n: int) -> Tuple[Dict, Dict]:
    """sacreBLEU's paired bootstrap resampling (as `sacrebleu REF -i BASE SYS --paired-bs
    -m bleu chrf`): p-values and scores of `system` against `base`, and the signatures."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    metrics = {"BLEU": BLEU(references=[refs]), "chrF2": CHRF(references=[refs])}
    test = PairedTest([("baseline", base), ("system", system)], metrics, references=None,
                      test_type="bs", n_samples=n)
    sigs, scores = test()
    out = {}
    for key, metric in (("bleu", "BLEU"), ("chrf", "chrF2")):
        b, s = scores[metric]
        out[key] = {"baseline": round(float(b.score), 2), "system": round(float(s.score), 2),
                    "delta": round(float(s.score - b.score), 2) + 0.0, "p_value": round(float(s.p_value), 4)}
    return out, {k: str(v) for k, v in sigs.items()}


def plot(settings: List[Dict], path: Path, title: str) -> None:
    """Valid loss against updates and against wall time: mean over seeds (line), and
    the seeds' range (band), per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lowest = float("inf")
    for i, s in enumerate(settings):
        by_epoch: Dict[int, List[Dict]] = {}
        for r in s["runs"]:
            for p in r["curve"]:
                by_epoch.setdefault(p["epoch"], []).append(p)
        epochs = sorted(by_epoch)
        if not epochs:
            continue
        # ten colours, then the same colours dashed, then dotted: no two settings look alike
        color, style = f"C{i % 10}", ("-", "--", ":")[(i // 10) % 3]
        loss = [[p["valid_loss"] for p in by_epoch[e]] for e in epochs]
        mean = [statistics.mean(v) for v in loss]
        lo, hi = [min(v) for v in loss], [max(v) for v in loss]
        ups = [statistics.mean(p["updates"] for p in by_epoch[e]) for e in epochs]
        label = f"{s['setting']} ({len(s['runs'])} seed{'s' if len(s['runs']) > 1 else ''})"
        lowest = min(lowest, min(lo))
        axes[0].plot(ups, mean, color=color, linestyle=style, label=label)
        axes[0].fill_between(ups, lo, hi, color=color, alpha=0.2, linewidth=0)
        walls = [[p["wall_s"] for p in by_epoch[e] if p["wall_s"] is not None] for e in epochs]
        keep = [j for j, w in enumerate(walls) if w]
        if keep:
            minutes = [statistics.mean(walls[j]) / 60 for j in keep]
            axes[1].plot(minutes, [mean[j] for j in keep], color=color, linestyle=style, label=label)
            axes[1].fill_between(minutes, [lo[j] for j in keep], [hi[j] for j in keep], color=color,
                                 alpha=0.2, linewidth=0)
    axes[0].set_xlabel("updates")
    axes[1].set_xlabel("wall time (minutes, mean over seeds)")
    for ax in axes:
        if lowest < float("inf"):  # the first epochs' steep drop, which every setting shares, is cut
            top = ax.get_ylim()[1]
            ax.set_ylim(bottom=lowest - 0.1, top=min(top, lowest + 2.0))
        ax.set_ylabel("valid loss (label-smoothed CE, base 2)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}: valid loss per epoch (line: mean over seeds; band: min-max)")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _hardware() -> Dict:
    import torch

    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   cpu)
    return {"report_machine_cpu": cpu, "cpus_available": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "python": platform.python_version()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True, help="RUNS/<setting>/seed<N>/ folders")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--data-bin", type=Path, required=True, help="the prepared corpus (PREPARED, test.raw.*)")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--png", type=Path, required=True)
    ap.add_argument("--paired-bs-n", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--baseline", default="vanilla", help="the setting the others are tested against")
    ap.add_argument("--meta", nargs="*", default=[], help="KEY=VALUE pairs recorded as the recipe")
    ap.add_argument("--settings", nargs="+", required=True, help="'name|model|args' per setting, in report order")
    args = ap.parse_args(argv)

    prepared = args.data_bin / "PREPARED"
    if not prepared.exists():
        raise SystemExit(f"{args.data_bin} is not a prepared data folder (no PREPARED)")
    info = dict(line.split("=", 1) for line in prepared.read_text().splitlines() if "=" in line)
    tgt = info["target"]
    refs = _read(args.data_bin / f"test.raw.{tgt}")

    settings = []
    for entry in args.settings:
        name, model, extra = (entry.split("|") + ["", ""])[:3]
        runs = []
        for run in sorted((args.runs / name).glob("seed*"), key=lambda p: int(p.name[4:]) if p.name[4:].isdigit() else 0):
            if (run / "eval" / "test.json").exists():
                runs.append(collect_run(run, tgt, refs))
        settings.append({"setting": name, "model": model, "args": extra, "runs": runs})
    done = [s for s in settings if s["runs"]]
    if not done:
        raise SystemExit(f"no finished run under {args.runs} (eval/test.json) for these settings")

    base = next((s for s in done if s["setting"] == args.baseline), None)
    base_runs = {r["seed"]: r for r in base["runs"]} if base else {}
    paired_sigs: Dict[str, str] = {}
    for s in done:
        for key in ("tokenized_bleu", "sacrebleu", "chrf", "updates_to_best", "updates", "wall_s_to_best", "wall_s",
                    "best_valid_loss"):
            s[key] = _stats([r[key] for r in s["runs"]])
        s["stopped_by_patience"] = sum(r["stopped_by"] == "patience" for r in s["runs"])
        if base is None or s is base:
            continue
        seeds = sorted(set(base_runs) & {r["seed"] for r in s["runs"]})
        mine = {r["seed"]: r for r in s["runs"]}
        per_seed, pooled_base, pooled_sys = [], [], []
        for seed in seeds:
            b = _read(REPO / base_runs[seed]["hypotheses"])  # (an absolute path stays absolute)
            m = _read(REPO / mine[seed]["hypotheses"])
            res, paired_sigs = paired_test(b, m, refs, args.paired_bs_n)
            per_seed.append({"seed": seed, **res})
            pooled_base += b
            pooled_sys += m
        pooled = None
        if len(seeds) > 1:
            pooled, paired_sigs = paired_test(pooled_base, pooled_sys, refs * len(seeds), args.paired_bs_n)
            pooled["seeds"] = seeds
        s["vs_baseline"] = {"baseline": args.baseline, "per_seed": per_seed, "pooled": pooled}

    first = done[0]["runs"][0]
    result = {
        "corpus": args.corpus,
        "data_bin": _rel(args.data_bin),
        "recipe": dict(m.split("=", 1) for m in args.meta),
        "test_sentences": len(refs),
        "prepared": info,
        "sacrebleu_signature": first["sacrebleu_signature"],
        "chrf_signature": first["chrf_signature"],
        "paired_test": {"type": "paired bootstrap resampling (sacrebleu --paired-bs)", "resamples": args.paired_bs_n,
                        "baseline": args.baseline, "signatures": paired_sigs},
        "hardware": {**_hardware(), "run_cpu": first.get("cpu"), "run_cpus_available": first.get("cpus_available")},
        "plot": _rel(args.png),
        "settings": settings,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    plot(done, args.png, args.corpus)
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.json)

    print(f"\n{args.corpus}: {len(refs)} test sentences; {result['sacrebleu_signature']}")
    head = f"{'setting':<12} {'runs':>4} {'sacreBLEU':>13} {'tok BLEU':>13} {'chrF':>13} {'updates*':>12} " \
           f"{'wall* min':>10} {'p BLEU':>7} {'p chrF':>7}"
    print(head)

    def ms(st: Dict, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        if st["mean"] is None:
            return "-"
        sd = "" if st["std"] is None else " ± " + fmt.format(st["std"] / scale)
        return fmt.format(st["mean"] / scale) + sd

    for s in done:
        vs = s.get("vs_baseline") or {}
        pooled = vs.get("pooled") or (vs.get("per_seed") or [None])[0]
        pb = f"{pooled['bleu']['p_value']:.3f}" if pooled else "-"
        pc = f"{pooled['chrf']['p_value']:.3f}" if pooled else "-"
        print(f"{s['setting']:<12} {len(s['runs']):>4} {ms(s['sacrebleu']):>13} {ms(s['tokenized_bleu']):>13} "
              f"{ms(s['chrf']):>13} {ms(s['updates_to_best'], 1, '{:.0f}'):>12} "
              f"{ms(s['wall_s_to_best'], 60, '{:.1f}'):>10} {pb:>7} {pc:>7}")
    print(f"(* at the best valid loss; p: paired bootstrap against {args.baseline}, seeds pooled where >1)")
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    sys.exit(main())
