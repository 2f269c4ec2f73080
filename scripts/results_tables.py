#!/usr/bin/env python3
"""Write the result tables of README.md and docs/*.md from results/*.json.

A table lives between two comment lines, which name its kind and file::

    <!-- table: quality results/multi30k10k.json -->
    ... (generated) ...
    <!-- end table -->

Kinds: ``quality`` (a benchmarks/quality.sh results file: one row per setting against its
baseline), ``cost`` (a benchmarks/cost.py --json file: one row per variant and length
factor), ``quickstart`` (results/quickstart.json: one sentence), ``scale`` (results/scale.json
of benchmarks/scale.sh: one row per corpus, size and arm).

    python scripts/results_tables.py           # rewrite the tables in place
    python scripts/results_tables.py --check   # exit 1, naming them, where a table is stale
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (\w+) (\S+) -->\n)(.*?)(<!-- end table -->)", re.S)


def _ms(stat: Optional[Dict], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    """mean ± std of a quality_report statistic ('-' where there is none)."""
    if not stat or stat.get("mean") is None:
        return "-"
    text = fmt.format(stat["mean"] / scale)
    return text if not stat.get("std") else f"{text} ± {fmt.format(stat['std'] / scale)}"


def _rows(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def quality(data: Dict) -> str:
    base = next((s["vs_baseline"]["baseline"] for s in data["settings"] if s.get("vs_baseline")), None)
    rows = []
    for s in data["settings"]:
        vs = s.get("vs_baseline") or {}
        pooled = vs.get("pooled") or (vs.get("per_seed") or [None])[0]
        delta = f"{pooled['bleu']['delta']:+.2f}" if pooled else ""
        p = f"{pooled['bleu']['p_value']:.3f} / {pooled['chrf']['p_value']:.3f}" if pooled else ""
        rows.append([s["setting"] + (s["args"] and f" (`{s['args']}`)"), str(len(s["runs"])), _ms(s["sacrebleu"]),
                     _ms(s["chrf"]), delta, p, _ms(s.get("best_valid_loss"), "{:.3f}"),
                     _ms(s.get("updates_to_best"), "{:.0f}")])
    note = (f"\nsacreBLEU `{data['sacrebleu_signature']}` on {data['test_sentences']:,} test sentences; mean ± "
            f"standard deviation over seeds; Δ and p (paired bootstrap, seeds pooled) against {base}.\n")
    return _rows(["setting", "seeds", "sacreBLEU", "chrF", f"Δ BLEU vs {base}", "p BLEU / chrF", "best valid loss",
                  "updates to best"], rows) + note


def _timed(r: Dict, what: str) -> str:
    """A time ratio with its IQR; '-' where the run measured memory only (--repeats 0)."""
    ratio, iqr = r.get(f"{what}_ratio"), r.get(f"{what}_ratio_iqr")
    if ratio is None or ratio != ratio:  # None or NaN
        return "-"
    return f"{ratio:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f})"


def cost(data: Dict) -> str:
    by_variant: Dict[str, Dict[int, Dict]] = {}
    factors = [b["factor"] for b in data["lengths"]]
    for block in data["lengths"]:
        for r in block["results"]:
            by_variant.setdefault(r["variant"], {})[block["factor"]] = r
    header = ["variant"]
    for f in factors:
        header += [f"memory {f}x", f"update {f}x (IQR)", f"decode {f}x (IQR)"]
    rows = []
    for variant, per in by_variant.items():
        if variant == "vanilla":
            continue
        row = [variant]
        for f in factors:
            r = per[f]
            row += [f"{r['saved_ratio']:.3f}", _timed(r, "update"), _timed(r, "decode")]
        rows.append(row)
    batches = "; ".join(f"{b['factor']}x: {b['batch']}" for b in data["lengths"])
    return _rows(header, rows) + f"\nx vanilla fairseq, median of per-repeat ratios; {data['header']}. Batches: {batches}.\n"


def quickstart(data: Dict) -> str:
    return (f"sacreBLEU **{data['sacrebleu']:.1f}** on Multi30k test_2016_flickr after {data['updates']} updates "
            f"({data['train_minutes']:.1f} minutes of training, {data['total_minutes']:.1f} in all, on "
            f"{data['cpus']} CPU core{'s' if data['cpus'] > 1 else ''}; `{data['sacrebleu_signature']}`)\n")


def scale(data: Dict) -> str:
    """One row per corpus and size: each arm's sacreBLEU (seeds done / planned), then EA's
    gain over vanilla and over residual attention alone, with 95% intervals."""
    def gain(size: Dict, system: str, baseline: str) -> str:
        comp = next((c for c in size["comparisons"] if c["system"] == system and c["baseline"] == baseline), None)
        g = comp and comp.get("gain_bleu")
        if not g:
            return ""
        return f"{g['delta']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"

    arms = []
    for corpus in data["corpora"]:
        for size in corpus["sizes"]:
            arms += [a for a in size["arms"] if a not in arms]
    rows = []
    for corpus in data["corpora"]:
        for size in corpus["sizes"]:
            row = [corpus["corpus"], f"{size['size']} ({size['layers']}+{size['layers']})",
                   f"{size['params'] / 1e6:.2f}M" if size.get("params") else "-"]
            for name in arms:
                arm = size["arms"].get(name)
                row.append("" if arm is None else
                           f"{_ms(arm['sacrebleu'])} ({len(arm['seeds_done'])}/{len(arm['seeds_planned'])})")
            row += [gain(size, "ea", "vanilla"), gain(size, "ea", "residual")]
            rows.append(row)
    prog = data["progress"]
    sig = data.get("sacrebleu_signature")
    note = (f"\n{prog['runs_done']} of {prog['runs_planned']} runs done. sacreBLEU on the test set, mean ± standard "
            f"deviation over the seeds done (seeds done / planned); Δ: EA's gain, paired bootstrap over the common "
            f"seeds' translations, with its 95% interval{f'; `{sig}`' if sig else ''}.\n")
    # the plain sentences: EA against vanilla (does the gain hold?) and against the
    # residual link alone (does the convolution add to it?), where both arms have a seed
    said = []
    for corpus in data["corpora"]:
        for size in corpus["sizes"]:
            for c in size["comparisons"]:
                g = c.get("gain_bleu")
                if c["system"] == "ea" and c["baseline"] in ("vanilla", "residual") and g:
                    what = "EA vs vanilla" if c["baseline"] == "vanilla" else "the convolution (EA vs residual-only)"
                    said.append(f"- {corpus['corpus']} {size['size']}, {what}: {g['delta']:+.2f} BLEU, {g['verdict']}.")
    # across sizes: EA's gain over vanilla at the smallest and the largest size with one,
    # compared by their 95% intervals (disjoint: it shrinks or grows; else it holds)
    for corpus in data["corpora"]:
        gains = []
        for size in corpus["sizes"]:
            c = next((c for c in size["comparisons"] if c["system"] == "ea" and c["baseline"] == "vanilla"), None)
            if c and c.get("gain_bleu"):
                gains.append((size["size"], c["gain_bleu"]))
        if len(gains) < 2:
            continue
        (s0, g0), (s1, g1) = gains[0], gains[-1]
        if g1["ci95"][1] < g0["ci95"][0]:
            trend = f"shrinks from {s0} to {s1} (their 95% intervals do not overlap)"
        elif g1["ci95"][0] > g0["ci95"][1]:
            trend = f"grows from {s0} to {s1} (their 95% intervals do not overlap)"
        else:
            trend = f"holds from {s0} to {s1}: no change beyond their 95% intervals"
        steps = ", ".join(f"{g['delta']:+.2f} ({s})" for s, g in gains)
        said.append(f"- {corpus['corpus']}, EA's gain over vanilla by size: {steps}; it {trend}.")
    if said:
        note += "\n" + "\n".join(said) + "\n"
    return _rows(["corpus", "size", "params", *arms, "Δ EA vs vanilla", "Δ EA vs residual"], rows) + note


KINDS: Dict[str, Callable[[Dict], str]] = {"quality": quality, "cost": cost, "quickstart": quickstart, "scale": scale}


def render(text: str, where: Path) -> str:
    """``text`` with every table block regenerated from its file."""
    def one(m: re.Match) -> str:
        kind, rel = m.group(2), m.group(3)
        if kind not in KINDS:
            raise SystemExit(f"{where}: unknown table kind {kind!r} (known: {', '.join(KINDS)})")
        path = REPO / rel
        if not path.exists():
            raise SystemExit(f"{where}: table of {rel}: no such file")
        return m.group(1) + KINDS[kind](json.loads(path.read_text(encoding="utf-8"))) + m.group(5)

    return BLOCK.sub(one, text)


def default_files() -> List[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def update(files: List[Path], write: bool = True) -> List[Path]:
    """The files whose tables differ from their results files; rewritten where ``write``."""
    stale = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        new = render(text, path)
        if new != text:
            stale.append(path)
            if write:
                path.write_text(new, encoding="utf-8")
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table differs from its file")
    ap.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    args = ap.parse_args(argv)
    stale = update(args.files or default_files(), write=not args.check)
    if stale:
        names = ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in stale)
        print(("stale tables in " if args.check else "rewrote tables in ") + names
              + (" (run python scripts/results_tables.py)" if args.check else ""))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
