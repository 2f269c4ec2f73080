#!/usr/bin/env python3
"""The scale grid's report: results/scale.json and results/scale.png from the per-run
summaries that benchmarks/scale.py commits (results/scale/<corpus>/<size>/<arm>/seed<N>.json
and the translations beside them), for a grid finished or not.

Per corpus and size:
  * parameters per arm (those the model trains: scale.count_params, checked against the
    model in tests/test_scale.py);
  * sacreBLEU, chrF and tokenised BLEU per arm: per seed, and mean, sample standard
    deviation, min and max over seeds; epochs, updates and hours to the end and to the
    best valid loss; the runs' valid-loss curves;
  * paired tests of EA against vanilla, EA against residual attention alone, residual
    attention against vanilla, and EA + cross against vanilla, where both arms are at
    that size: sacreBLEU's paired bootstrap (quality_report.paired_test: p-values, per
    seed and with the common seeds' translations pooled), and the gain (system minus
    baseline, pooled) with its 95% interval: the 2.5th and 97.5th percentiles of the
    difference over the same resamples as sacreBLEU's test (seed 12345); and whether
    the two arms' seed ranges overlap;
  * what is missing (points not yet run), so that a partial grid reads as one.
The PNG: BLEU and chrF against parameters (log scale) per corpus, each arm's mean over
seeds with its seed range; the gains with their intervals; the valid-loss curves per
corpus and size.

  python benchmarks/scale_report.py            # = bash benchmarks/scale.sh report
"""

import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_report  # noqa: E402
import scale  # noqa: E402

# (system, baseline) pairs tested where both arms are at a size, in report order
COMPARISONS = [("ea", "vanilla"), ("ea", "residual"), ("residual", "vanilla"), ("ea-cross", "vanilla")]
METRICS = (("bleu", "sacrebleu"), ("chrf", "chrf"))
BOOTSTRAP_SEED = 12345  # sacreBLEU's default (SACREBLEU_SEED)


# ------------------------------------------------------------------- statistics

def spread(values: Sequence[Optional[float]], digits: int = 3) -> Dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": round(statistics.mean(v), digits), "std": round(statistics.stdev(v), digits) if len(v) > 1 else None,
            "min": round(min(v), digits), "max": round(max(v), digits), "n": len(v)}


def delta_interval(base: List[str], system: List[str], refs: List[str], n: int, metric: str,
                   seed: int = BOOTSTRAP_SEED) -> Tuple[float, float, float]:
    """(delta, lo, hi): system minus baseline score on the whole set, and the 2.5th and
    97.5th percentiles of that difference over n paired bootstrap resamples of the
    sentences, drawn as sacreBLEU's paired test draws them (numpy's default_rng(seed),
    n x len rows with replacement), from the same sufficient statistics."""
    import numpy as np
    from sacrebleu.metrics import BLEU, CHRF

    m = BLEU() if metric == "bleu" else CHRF()
    sb = np.array(m._extract_corpus_statistics(base, [refs]), dtype="float64")
    ss = np.array(m._extract_corpus_statistics(system, [refs]), dtype="float64")
    delta = m._compute_score_from_stats(ss.sum(0)).score - m._compute_score_from_stats(sb.sum(0)).score
    idxs = np.random.default_rng(seed).choice(len(refs), size=(n, len(refs)), replace=True)
    diffs = []
    for chunk in range(0, n, 50):  # (50, len, stats) at a time: memory stays small
        part = idxs[chunk:chunk + 50]
        b, s = sb[part].sum(1), ss[part].sum(1)
        diffs += [m._compute_score_from_stats(s[i]).score - m._compute_score_from_stats(b[i]).score
                  for i in range(len(part))]
    lo, hi = np.percentile(np.array(diffs), [2.5, 97.5])
    return round(float(delta), 2) + 0.0, round(float(lo), 2) + 0.0, round(float(hi), 2) + 0.0


def verdict(delta: float, lo: float, hi: float, overlap: Optional[bool]) -> str:
    """One phrase: is the system ahead, behind, or neither, and against which noise."""
    if lo > 0 or hi < 0:
        side = "ahead" if lo > 0 else "behind"
        if overlap is None:
            return f"{side} on the test set (interval excludes 0); one seed: no seed spread to compare with"
        if overlap is False:
            return f"{side}, beyond the seed spread (interval excludes 0, seed ranges apart)"
        return f"{side} on the pooled test (interval excludes 0), but within the seed spread (seed ranges overlap)"
    return "no difference shown (interval includes 0)"


# --------------------------------------------------------------------- the data

def _hyps(rec: Dict) -> Optional[List[str]]:
    path = Path(rec["hypotheses"])
    path = path if path.is_absolute() else scale.REPO / path
    return quality_report._read(path) if path.exists() else None


def load_point(layout: "scale.Layout", p: "scale.Point") -> Optional[Dict]:
    path = layout.result_json(p)
    if not path.exists():
        return None
    rec = json.loads(path.read_text(encoding="utf-8"))
    hyp = layout.result_hyp(p, rec.get("prepared", {}).get("target", "en"))
    if hyp.exists():  # the committed copy beside the summary (a moved results folder still works)
        rec["hypotheses"] = str(hyp)
    return rec


def compare(a_runs: Dict[int, Dict], b_runs: Dict[int, Dict], refs: Optional[List[str]], n: int) -> Dict:
    """system = a, baseline = b, over their common seeds."""
    seeds = sorted(set(a_runs) & set(b_runs))
    out: Dict = {"seeds": seeds}
    if not seeds:
        out["status"] = "missing: no seed finished in both arms"
        return out
    if refs is None:
        out["status"] = "not tested: the corpus's test.raw reference is not prepared here"
        return out
    hyps_a = {s: _hyps(a_runs[s]) for s in seeds}
    hyps_b = {s: _hyps(b_runs[s]) for s in seeds}
    if any(h is None or len(h) != len(refs) for h in [*hyps_a.values(), *hyps_b.values()]):
        out["status"] = "not tested: a run's translations are missing or of another length than the reference"
        return out
    out["status"] = "tested"
    per_seed = []
    for s in seeds:
        res, sigs = quality_report.paired_test(hyps_b[s], hyps_a[s], refs, n)
        per_seed.append({"seed": s, **res})
    pool_a = [h for s in seeds for h in hyps_a[s]]
    pool_b = [h for s in seeds for h in hyps_b[s]]
    pooled_refs = refs * len(seeds)
    pooled, sigs = quality_report.paired_test(pool_b, pool_a, pooled_refs, n) if len(seeds) > 1 else (
        {k: dict(v) for k, v in per_seed[0].items() if k in ("bleu", "chrf")}, sigs)
    out["per_seed"] = per_seed
    out["pooled"] = pooled
    out["signatures"] = sigs
    for key, field in METRICS:
        delta, lo, hi = delta_interval(pool_b, pool_a, pooled_refs, n, key)
        a_vals = [a_runs[s][field] for s in seeds]
        b_vals = [b_runs[s][field] for s in seeds]
        overlap = None if len(seeds) < 2 else not (min(a_vals) > max(b_vals) or max(a_vals) < min(b_vals))
        seed_deltas = [round(x - y, 2) + 0.0 for x, y in zip(a_vals, b_vals)]
        out[f"gain_{key}"] = {
            "delta": delta, "ci95": [lo, hi], "p_value": pooled[key]["p_value"],
            "mean_of_seed_deltas": round(statistics.mean(seed_deltas), 2) + 0.0, "seed_deltas": seed_deltas,
            "seed_ranges_overlap": overlap, "verdict": verdict(delta, lo, hi, overlap),
        }
    return out


def build(grid: "scale.Grid", layout: "scale.Layout", n: int) -> Dict:
    corpora, missing, done, planned = [], [], 0, 0
    sigs: Dict[str, str] = {}
    sacre_sig = chrf_sig = None
    for corpus in grid.corpora:
        data_bin = scale._abs(corpus.data_bin)
        refs = None
        tgt = "en"
        if (data_bin / "PREPARED").exists():
            tgt = scale._prepared_info(data_bin)["target"]
            refs = quality_report._read(data_bin / f"test.raw.{tgt}")
        vocab = scale.dictionary_size(data_bin)
        sizes = []
        order = {s.name: i for i, s in enumerate(grid.sizes)}
        for block in sorted(grid.blocks, key=lambda b: order[b.size]):
            size = grid.size(block.size)
            arms, point_missing = {}, []
            for arm_name in block.arms:
                arm = grid.arm(arm_name)
                runs = {}
                for seed in block.seeds:
                    planned += 1
                    p = scale.Point(corpus.name, size.name, arm_name, seed)
                    rec = load_point(layout, p)
                    if rec is None:
                        point_missing.append(p.name)
                        continue
                    done += 1
                    runs[seed] = rec
                    sacre_sig = sacre_sig or rec.get("sacrebleu_signature")
                    chrf_sig = chrf_sig or rec.get("chrf_signature")
                recs = [runs[s] for s in sorted(runs)]
                hours = [r["wall_s"] / 3600 if r.get("wall_s") is not None else None for r in recs]
                recorded = [r.get("params") for r in recs if r.get("params")]
                arms[arm_name] = {
                    "model": arm.model, "args": arm.args,
                    "params": recorded[0] if recorded else (scale.count_params(size, vocab, arm) if vocab else None),
                    "seeds_planned": block.seeds, "seeds_done": sorted(runs),
                    "runs": [{k: r.get(k) for k in ("seed", "sacrebleu", "chrf", "tokenized_bleu", "epochs",
                                                     "best_epoch", "updates", "updates_to_best", "best_valid_loss",
                                                     "wall_s", "wall_s_to_best", "train_seconds_measured",
                                                     "stopped_by", "invocations", "threads", "jobs", "cpu")}
                             | {"curve": [{k: c.get(k) for k in ("epoch", "updates", "valid_loss", "wall_s")}
                                          for c in r.get("curve", [])]}
                             for r in recs],
                    "sacrebleu": spread([r["sacrebleu"] for r in recs], 2),
                    "chrf": spread([r["chrf"] for r in recs], 2),
                    "tokenized_bleu": spread([r["tokenized_bleu"] for r in recs], 2),
                    "epochs": spread([r["epochs"] for r in recs], 1),
                    "hours": spread(hours, 2),
                    "stopped_by_patience": sum(r.get("stopped_by") == "patience" for r in recs),
                }
            comparisons = []
            for a, b in COMPARISONS:
                if a in arms and b in arms:
                    a_runs = {r["seed"]: r for r in (load_point(layout, scale.Point(corpus.name, size.name, a, s))
                                                     for s in arms[a]["seeds_done"])}
                    b_runs = {r["seed"]: r for r in (load_point(layout, scale.Point(corpus.name, size.name, b, s))
                                                     for s in arms[b]["seeds_done"])}
                    res = compare(a_runs, b_runs, refs, n)
                    sigs = res.pop("signatures", None) or sigs
                    comparisons.append({"system": a, "baseline": b, **res})
            base = arms.get("vanilla") or next(iter(arms.values()))
            sizes.append({
                "size": size.name, "dim": size.dim, "layers": size.layers, "ffn": size.ffn, "heads": size.heads,
                "params": base["params"],
                "recipe": {"lr": size.lr, "warmup": size.warmup, "dropout": size.dropout,
                           "max_tokens": size.max_tokens, "patience": size.patience,
                           "max_epoch": size.max_epoch.get(corpus.name), "num_avg": size.num_avg},
                "complete": not point_missing, "missing": point_missing,
                "arms": arms, "comparisons": comparisons,
            })
            missing += point_missing
        corpora.append({"corpus": corpus.name, "data_bin": quality_report._rel(data_bin),
                        "test_sentences": len(refs) if refs else None, "target": tgt, "sizes": sizes})
    return {
        "title": "Evolving attention at three model sizes on Multi30k and Tatoeba De-En (issues 24, 27)",
        "progress": {"runs_done": done, "runs_planned": planned, "complete": not missing, "missing": missing},
        "sacrebleu_signature": sacre_sig, "chrf_signature": chrf_sig,
        "paired_test": {"type": "paired bootstrap resampling (sacrebleu --paired-bs)", "resamples": n,
                        "seed": BOOTSTRAP_SEED, "signatures": sigs,
                        "pooled": "the common seeds' translations concatenated (the test set once per seed): "
                                  "the system's average over seeds against the baseline's",
                        "ci95": "2.5th-97.5th percentile of system minus baseline over the same resamples"},
        "recipe": {"train": "benchmarks/quality.sh (scripts/train.sh's small CPU recipe: post-norm, shared "
                            "embeddings, Adam (0.9, 0.98), inverse-sqrt schedule, label smoothing 0.1, weight decay "
                            "1e-4) with the size's model, lr, warmup, dropout, max-tokens, --patience and epoch cap",
                   "evaluate": "scripts/evaluate.sh: the last num_avg epoch checkpoints averaged, beam 5, lenpen 1; "
                               "sacreBLEU and chrF against the raw test text"},
        "grid": scale.grid_json(grid),
        "corpora": corpora,
    }


# ------------------------------------------------------------------------ picture

ARM_STYLE = {"vanilla": ("C7", "o"), "ea": ("C0", "s"), "residual": ("C2", "^"), "ea-cross": ("C3", "D")}
ARM_LINE = {"vanilla": "--", "residual": "-.", "ea-cross": ":"}  # the curves cross and overlap: told apart by dashes too
GAIN_STYLE = {("ea", "vanilla"): ("C0", "o"), ("ea", "residual"): ("C1", "s"), ("residual", "vanilla"): ("C2", "^"),
              ("ea-cross", "vanilla"): ("C3", "D")}


def _style(name: str, i: int) -> Tuple[str, str]:
    return ARM_STYLE.get(name, (f"C{(i + 4) % 10}", "v"))


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = report["corpora"]
    n_sizes = max((len(c["sizes"]) for c in corpora), default=1)
    widest = max(2 * len(corpora), n_sizes)
    ncols = math.lcm(*range(1, widest + 1))  # any row of k <= widest panels splits it evenly
    fig = plt.figure(figsize=(4.6 * widest, 4.2 * (2 + len(corpora))), layout="constrained")
    gs = fig.add_gridspec(2 + len(corpora), ncols)

    def over(row: int, i: int, k: int):
        """Panel i of k on a row, the k sharing the row's width."""
        w = ncols // k
        return fig.add_subplot(gs[row, i * w:(i + 1) * w])

    arm_names = []
    for c in corpora:
        for s in c["sizes"]:
            for a in s["arms"]:
                if a not in arm_names:
                    arm_names.append(a)
    # rows 1-2: scores and gains against parameters
    for ci, c in enumerate(corpora):
        for mi, (key, field, label) in enumerate((("bleu", "sacrebleu", "sacreBLEU"), ("chrf", "chrf", "chrF"))):
            ax = over(0, ci * 2 + mi, 2 * len(corpora))
            gx = over(1, ci * 2 + mi, 2 * len(corpora))
            xs_all, missing_labels = [], []
            for ai, arm in enumerate(arm_names):
                color, marker = _style(arm, ai)
                xs, ys, lo, hi = [], [], [], []
                for s in c["sizes"]:
                    a = s["arms"].get(arm)
                    if a is None or s["params"] is None:
                        continue
                    xs_all.append(s["params"])
                    st = a[field]
                    if st["mean"] is None:
                        continue
                    # each arm a little to the side of the size's position, so that the bars do not hide each other
                    xs.append(s["params"] * (1 + 0.04 * (ai - (len(arm_names) - 1) / 2)))
                    ys.append(st["mean"])
                    lo.append(st["mean"] - st["min"])
                    hi.append(st["max"] - st["mean"])
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3, linewidth=1.2,
                                label=arm)
            for s in c["sizes"]:
                if s["missing"]:
                    missing_labels.append(f"{s['size']} {len(s['missing'])}/"
                                          f"{sum(len(a['seeds_planned']) for a in s['arms'].values())}")
            for gi, ((a, b), (color, marker)) in enumerate(GAIN_STYLE.items()):
                xs, ys, lo, hi = [], [], [], []
                for s in c["sizes"]:
                    comp = next((x for x in s["comparisons"] if (x["system"], x["baseline"]) == (a, b)), None)
                    g = comp and comp.get(f"gain_{key}")
                    if not g or s["params"] is None:
                        continue
                    xs.append(s["params"] * (1 + 0.04 * (gi - 1.5)))
                    ys.append(g["delta"])
                    lo.append(g["delta"] - g["ci95"][0])
                    hi.append(g["ci95"][1] - g["delta"])
                if xs:
                    gx.errorbar(xs, ys, yerr=[lo, hi], color=color, marker=marker, capsize=3, linewidth=1.2,
                                label=f"{a} - {b}")
            gx.axhline(0, color="black", linewidth=0.8)
            for axis in (ax, gx):
                axis.set_xscale("log")
                axis.grid(alpha=0.3, which="both")
                if xs_all:
                    ticks = sorted(set(xs_all))
                    axis.set_xticks(ticks)
                    axis.set_xticklabels([f"{t / 1e6:.2f}M\n{_size_of(c, t)}" for t in ticks], fontsize=8)
                    axis.minorticks_off()
                    axis.set_xlim(min(ticks) / 1.35, max(ticks) * 1.35)
                axis.set_xlabel("parameters (log scale)", fontsize=9)
            ax.set_ylabel(f"{label} (test)")
            ax.set_title(f"{c['corpus']} {label} (mean; bar: seed min-max)", fontsize=10)
            gx.set_ylabel(f"{label} gain (system - baseline)")
            gx.set_title(f"{c['corpus']} {label} gain (pooled; bar: 95% CI)", fontsize=10)
            for axis in (ax, gx):
                if axis.get_legend_handles_labels()[0]:
                    axis.legend(fontsize=8)
            note = ("runs missing: " + ", ".join(missing_labels)) if missing_labels else "every run done"
            if not ax.has_data():
                note = "no run finished yet\n" + note
            else:
                ax.margins(y=0.25)  # room for the note below the lowest point
            ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="dimgray", va="bottom")
            if not gx.get_legend_handles_labels()[0]:
                gx.text(0.5, 0.5, "no seed finished in both arms of a comparison yet", transform=gx.transAxes,
                        ha="center", color="dimgray", fontsize=8)
    # rows 3+: valid loss per corpus (row) and size (column)
    for ci, c in enumerate(corpora):
        for si, s in enumerate(c["sizes"]):
            ax = over(2 + ci, si, len(c["sizes"]))
            lowest = math.inf
            for ai, arm in enumerate(arm_names):
                a = s["arms"].get(arm)
                if a is None:
                    continue
                color, _ = _style(arm, ai)
                for ri, r in enumerate(a["runs"]):
                    pts = [(p["updates"], p["valid_loss"]) for p in r["curve"]]
                    if not pts:
                        continue
                    lowest = min(lowest, min(v for _, v in pts))
                    ax.plot(*zip(*pts), color=color, linestyle=ARM_LINE.get(arm, "-"), linewidth=1, alpha=0.85,
                            label=f"{arm} ({len(a['runs'])} seed{'s' if len(a['runs']) > 1 else ''})" if ri == 0 else None)
            if lowest < math.inf:
                top = ax.get_ylim()[1]
                ax.set_ylim(bottom=lowest - 0.05, top=min(top, lowest + 1.5))
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no run finished yet", transform=ax.transAxes, ha="center", color="dimgray")
            ax.set_title(f"{c['corpus']} {s['size']} ({s['layers']}+{s['layers']} layers): valid loss per run",
                         fontsize=10)
            ax.set_xlabel("updates")
            ax.set_ylabel("valid loss (label-smoothed CE, base 2)")
            ax.grid(alpha=0.3)
    prog = report["progress"]
    fig.suptitle(f"{report['title']}\n{prog['runs_done']} of {prog['runs_planned']} runs done", fontsize=13)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _size_of(corpus: Dict, params: int) -> str:
    s = next((s for s in corpus["sizes"] if s["params"] == params), None)
    return f"{s['size']} {s['layers']}+{s['layers']}" if s else ""


# ---------------------------------------------------------------------- outputs

def table(report: Dict) -> str:
    lines = [f"{'corpus':<9} {'size':<5} {'params':>7} {'arm':<9} {'runs':>4} {'sacreBLEU':>15} {'chrF':>15} "
             f"{'epochs':>6} {'hours':>5}"]

    def ms(st):
        if st["mean"] is None:
            return "-"
        return f"{st['mean']:.2f}" + (f" ± {st['std']:.2f}" if st["std"] is not None else "")

    for c in report["corpora"]:
        for s in c["sizes"]:
            for name, a in s["arms"].items():
                params = f"{a['params'] / 1e6:.2f}M" if a["params"] else "-"
                lines.append(f"{c['corpus']:<9} {s['size']:<5} {params:>7} {name:<9} "
                             f"{len(a['runs'])}/{len(a['seeds_planned'])} {ms(a['sacrebleu']):>15} "
                             f"{ms(a['chrf']):>15} {a['epochs']['mean'] or '-':>6} "
                             f"{a['hours']['mean'] if a['hours']['mean'] is not None else '-':>5}")
            for comp in s["comparisons"]:
                g = comp.get("gain_bleu")
                if g:
                    lines.append(f"{'':<16} {comp['system']} - {comp['baseline']}: BLEU {g['delta']:+.2f} "
                                 f"[{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}] p={g['p_value']:.3f} "
                                 f"(seeds {comp['seeds']}): {g['verdict']}")
                else:
                    lines.append(f"{'':<16} {comp['system']} - {comp['baseline']}: {comp['status']}")
    prog = report["progress"]
    lines.append(f"{prog['runs_done']} of {prog['runs_planned']} runs done")
    return "\n".join(lines)


def write_report(grid: "scale.Grid", layout: "scale.Layout", json_path: Path, png_path: Path, n: int) -> Dict:
    report = build(grid, layout, n)
    report["plot"] = quality_report._rel(png_path)
    plot(report, png_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
    print(table(report))
    print(f"wrote {json_path} and {png_path}")
    return report


if __name__ == "__main__":
    sys.exit(scale.main(["report", *sys.argv[1:]]))
