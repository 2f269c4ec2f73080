#!/usr/bin/env python3
"""GPU acceptance check of ea-fairseq: everything a short loan of one GPU should answer,
written to one JSON file (``benchmarks/gpu_check.sh`` installs first, then runs this).

1. ``impls``: the fused path against the eager reference on the device, in fp32, fp16 and
   bf16: a training step (outputs and every gradient, as errors relative to the largest
   value, against an fp32 eager run on the same device; the fused error must stay within
   twice the eager one plus a tolerance per precision), incremental decoding against the
   full forward pass, and (fp32) beam search giving the same hypotheses on both paths.
2. ``train``: ``fairseq-train --fp16`` and ``--bf16`` for a few hundred updates on Multi30k
   (the quickstart's d=128 model): the loss goes down, no loss is NaN, and gradient
   overflows (fp16's loss scaler backing off) stay under a tenth of the updates.
3. ``cost``: ``benchmarks/cost.py --device cuda`` in fp16 and bf16 (peak memory included).

    python benchmarks/gpu_check.py --out results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --only impls    # the CPU side of part 1

Without a GPU (``--device cuda`` and torch sees none) it checks nothing, says so in its
last line and exits 0. Exit status 1 where a check failed (the JSON says which).
"""

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the fused path's error may exceed twice the eager one's by this (relative to the largest value)
TOL = {"fp32": 1e-4, "fp16": 0.05, "bf16": 0.3}
# smooth activations: a ReLU's kink turns rounding differences into whole gradient entries
SMOOTH = ["--ea-cross-attn", "--ea-conv-init", "kaiming", "--ea-activation", "gelu", "--ea-alpha", "0.7",
          "--ea-beta", "0.4", "--activation-fn", "gelu"]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-12)


def check_impls(device: torch.device, precision: str) -> dict:
    """Fused against eager on ``device`` in ``precision`` (see the module docstring)."""
    from fairseq.sequence_generator import SequenceGenerator
    from helpers import build_model, full_logits, incremental_logits, random_batch, set_impl

    dtype = DTYPES[precision]
    ref_model = build_model("ea_transformer", SMOOTH, dtype=torch.float32).to(device).train()
    model = build_model("ea_transformer", SMOOTH, dtype=torch.float32).to(device=device, dtype=dtype).train()
    ref_model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    d = model.encoder.dictionary
    batch = {k: v.to(device) for k, v in random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6]).items()}
    keep = batch["prev_output_tokens"].ne(d.pad())

    def step(m, impl):
        set_impl(m, impl)
        m.zero_grad(set_to_none=True)
        out = full_logits(m, batch)[keep]
        out.float().pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = step(ref_model, "eager")
    runs = {impl: step(model, impl) for impl in ("eager", "fused")}
    worst, failed = {"eager": 0.0, "fused": 0.0}, []
    for name, r in [("out", ref[0])] + list(ref[1].items()):
        err = {impl: _rel(out if name == "out" else grads[name], r) for impl, (out, grads) in runs.items()}
        if not all(math.isfinite(e) for e in err.values()) or err["fused"] > 2 * err["eager"] + TOL[precision]:
            failed.append({"tensor": name, **err})
        worst = {impl: max(worst[impl], err[impl]) for impl in err}
    model.eval()
    with torch.no_grad():
        full = full_logits(set_impl(model, "eager"), batch)
        inc = incremental_logits(set_impl(model, "fused"), batch)
    inc_err = _rel(inc[keep], full[keep])
    result = {"precision": precision, "worst_rel_error_vs_fp32_eager": worst, "failed_tensors": failed,
              "incremental_vs_full_rel_error": inc_err}
    ok = not failed and inc_err <= 2 * TOL[precision] / 10 + 1e-5
    if precision == "fp32":
        sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
        hyps = {}
        with torch.no_grad():
            for impl in ("fused", "eager"):
                gen = SequenceGenerator([set_impl(model, impl)], d, beam_size=4, max_len_b=10)
                out = gen.generate([model], sample)
                hyps[impl] = [h["tokens"].tolist() for nbest in out for h in nbest]
        result["beam_search_same_hypotheses"] = hyps["fused"] == hyps["eager"]
        ok = ok and result["beam_search_same_hypotheses"]
    result["ok"] = ok
    return result


def parse_train_log(log: str, updates: int) -> dict:
    """What a fairseq-train log (--log-format simple) says about half-precision health."""
    losses = [float(x) for x in re.findall(r"train_inner \| .*? loss=([\d.naif]+)", log)]
    overflows = len(re.findall(r"gradient overflow detected", log))
    result = {"losses": losses, "overflows": overflows,
              "nan": any(math.isnan(x) or math.isinf(x) for x in losses) or "loss=nan" in log,
              "finished": "done training" in log}
    result["ok"] = (result["finished"] and not result["nan"] and len(losses) >= 2 and losses[-1] < losses[0]
                    and overflows < max(1, updates // 10))
    return result


def check_train(precision: str, data_bin: Path, updates: int, workdir: Path, device: torch.device) -> dict:
    save = workdir / f"train-{precision}"
    cmd = [str(Path(sys.executable).parent / "fairseq-train"), str(data_bin), "--user-dir", str(REPO / "ea_fairseq"),
           "--arch", "ea_transformer", "--share-all-embeddings", "--encoder-layers", "3", "--decoder-layers", "3",
           "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512",
           "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "2e-3", "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", "100", "--dropout", "0.2", "--criterion", "label_smoothed_cross_entropy",
           "--label-smoothing", "0.1", "--max-tokens", "4096", "--max-update", str(updates), "--seed", "1",
           "--save-dir", str(save), "--no-save", "--disable-validation", "--log-format", "simple",
           "--log-interval", "25", f"--{precision}"]
    if device.type == "cpu":
        cmd += ["--cpu"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = parse_train_log(proc.stdout + proc.stderr, updates)
    result.update(precision=precision, seconds=round(time.time() - start, 1), returncode=proc.returncode)
    result["ok"] = result["ok"] and proc.returncode == 0
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def check_cost(precision: str, data: Path, workdir: Path, device: torch.device, repeats: int) -> dict:
    out = workdir / f"cost-{precision}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "cost.py"), "--device", str(device), "--precision", precision,
           "--data", str(data), "--repeats", str(repeats), "--workdir", str(workdir / "cost"), "--json", str(out)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = {"precision": precision, "seconds": round(time.time() - start, 1), "returncode": proc.returncode,
              "ok": proc.returncode == 0, "table": proc.stdout[-6000:]}
    if proc.returncode:
        result["stderr_tail"] = proc.stderr[-3000:]
    else:
        saved = json.loads(out.read_text())
        result["lengths"] = [{"factor": b["factor"], "results": [
            {k: r.get(k) for k in ("variant", "saved_ratio", "peak_mib", "peak_ratio", "update_ms", "update_ratio",
                                   "decode_ms", "decode_ratio")} for r in b["results"]]} for b in saved["lengths"]]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="the device to check (default: cuda)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check.json", help="the results file")
    ap.add_argument("--only", default="impls,train,cost", help="comma-separated parts: impls, train, cost")
    ap.add_argument("--data-bin", type=Path, default=REPO / "data-bin" / "multi30k.de-en",
                    help="Multi30k binarised by scripts/prepare-multi30k.sh (default: data-bin/multi30k.de-en)")
    ap.add_argument("--cost-data", type=Path, default=REPO / "work" / "gpu" / "iwslt14_bpe10k",
                    help="fairseq-BPE'd IWSLT14 test.de / test.en for cost.py (default: work/gpu/iwslt14_bpe10k)")
    ap.add_argument("--updates", type=int, default=300, help="fairseq-train updates per precision (default: 300)")
    ap.add_argument("--repeats", type=int, default=5, help="cost.py timed repeats (default: 5)")
    ap.add_argument("--workdir", type=Path, default=REPO / "work" / "gpu", help="scratch space (default: work/gpu)")
    args = ap.parse_args()
    parts = [p for p in args.only.split(",") if p]
    bad = [p for p in parts if p not in ("impls", "train", "cost")]
    if bad:
        ap.error(f"--only: unknown part(s) {', '.join(bad)} (choose from impls, train, cost)")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA GPU on this machine (torch {torch.__version__}: torch.cuda.is_available() is "
              f"False); nothing was checked")
        return 0
    for part, path in (("train", args.data_bin / "dict.de.txt"), ("cost", args.cost_data / "test.de")):
        if part in parts and not path.exists():
            ap.error(f"{path} not found, needed by the '{part}' part (see benchmarks/gpu_check.sh --prepare)")
    import ea_fairseq  # noqa: F401  (registers the model)

    args.workdir.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": sys.version.split()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    precisions = ["fp32", "fp16", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    if "impls" in parts:
        report["impls"] = [check_impls(device, p) for p in precisions]
    if "train" in parts:
        report["train"] = [check_train(p, args.data_bin, args.updates, args.workdir, device) for p in ("fp16", "bf16")]
    if "cost" in parts:
        report["cost"] = [check_cost(p, args.cost_data, args.workdir, device, args.repeats) for p in ("fp16", "bf16")]
    failed = [f"{part}:{r['precision']}" for part in parts for r in report[part] if not r["ok"]]
    report["ok"], report["failed"] = not failed, failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".part")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    print(json.dumps({k: v for k, v in report.items() if k not in ("impls", "train", "cost")}, indent=2))
    print(f"gpu_check: {'all checks passed' if not failed else 'FAILED: ' + ', '.join(failed)}; results in {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
