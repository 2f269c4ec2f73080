#!/usr/bin/env python3
"""Cost of evolving attention against fairseq's transformer, side by side.

Measures, on real batches (IWSLT14 De-En test sentences, fairseq's BPE; by default a
batch of similar lengths as fairseq's batching makes them, ``--order file`` for the first
sentences of the file), for each model variant and each sentence-length factor f (every
sentence repeated f times):
  * activation memory of one training step: the bytes autograd saves for backward
    (``saved_tensors_hooks``, each storage counted once; device-independent), and on
    a GPU also the peak CUDA memory of the step above what was allocated before it;
  * one training update: forward + backward (label-smoothed CE) + Adam step;
  * beam-5 decoding with fairseq's SequenceGenerator, forced to a fixed number of
    steps (min_len = max_len) so that every variant decodes the same length
    (``--decode-sentences / f`` sentences, ``--decode-steps * f`` steps).
Variants run interleaved, repeat after repeat, so that machine noise hits all
alike; their order turns around from one repeat to the next, so that a drift of the
machine's speed within a repeat favours none. Each ratio is the median over repeats
of (variant time / vanilla time in the same repeat), which cancels most of a noisy
machine's drift.

On a CPU the script runs with glibc's heap kept for reuse (``--heap keep``, the default:
it restarts itself with GLIBC_TUNABLES set). Otherwise every tensor above glibc's mmap
threshold is fresh memory from the kernel, and the page faults of one update (100,000 to
400,000 on the project's 2-core VM, 0.3 to 1.1 s of system time in an 8 s update) vary more from repeat to repeat than EA costs. On a GPU, PyTorch's caching
allocator does the same reuse.

Variants ``ea:eager`` / ``ea+cross:eager`` are the same models on the eager reference path
(``--ea-attn-impl eager``: every intermediate map kept for backward, explicit attention in
layer 1), measured in the same run as the fused default.

    python benchmarks/cost.py                                     # CPU, lengths 1x and 4x
    python benchmarks/cost.py --lengths 1,2,4,8 --plot cost.png   # ratios against length
    python benchmarks/cost.py --device cuda --precision fp16      # on a GPU
    python benchmarks/cost.py --report results/cost_cpu_fairseq.json   # table of an earlier --json run
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "iwslt14" / "fairseq_bpe10k"

# name: (architecture, extra flags, attention implementation of the EA modules)
VARIANTS = {
    "vanilla": ("transformer_iwslt_de_en", [], None),
    "ea-off": ("ea_transformer_iwslt_de_en", ["--ea-no-encoder-self-attn", "--ea-no-decoder-self-attn"], None),
    "ea": ("ea_transformer_iwslt_de_en", [], "fused"),
    "ea+cross": ("ea_transformer_iwslt_de_en", ["--ea-cross-attn"], "fused"),
    "ea:eager": ("ea_transformer_iwslt_de_en", [], "eager"),
    "ea+cross:eager": ("ea_transformer_iwslt_de_en", ["--ea-cross-attn"], "eager"),
}
DEFAULT_VARIANTS = "vanilla,ea:eager,ea,ea+cross:eager,ea+cross"


def build(name, task, device, precision, model_args=()):
    import dataclasses

    from fairseq import options

    from ea_fairseq.modules import EvolvingMultiheadAttention

    arch, extra, impl = VARIANTS[name]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(task.cfg.data), "--task", "translation", "--user-dir", str(REPO / "ea_fairseq"), "--arch", arch,
        "--share-all-embeddings", "--source-lang", "de", "--target-lang", "en", *extra, *model_args])
    torch.manual_seed(0)
    model = task.build_model(args).to(device)
    for module in model.modules():  # as --ea-attn-impl sets it
        if isinstance(module, EvolvingMultiheadAttention):
            module.ea = dataclasses.replace(module.ea, impl=impl)
    return model.half() if precision == "fp16" else model.bfloat16() if precision == "bf16" else model


def make_task(data_dir: Path, workdir: Path):
    """A translation task over a dictionary built from the BPE'd files."""
    from fairseq.data import Dictionary
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    d = Dictionary()
    for lang in ("de", "en"):
        Dictionary.add_file_to_dictionary(str(data_dir / f"test.{lang}"), d, lambda s: s.split(), 1)
    d.finalize(padding_factor=8)
    cfg = TranslationConfig(data=str(workdir), source_lang="de", target_lang="en")
    return TranslationTask(cfg, d, d), d


def make_batch(d, data_dir: Path, max_tokens: int, factor: int, device, max_sentences: int = 0,
               order: str = "fairseq"):
    """Test sentences, each repeated ``factor`` times, up to max_tokens target tokens (or
    max_sentences sentences), collated as fairseq does. Returns (batch, target tokens).

    order "fairseq": as fairseq's training batches are made (LanguagePairDataset orders the
    sentences by source, then target length; batch_by_size cuts that order into batches),
    the batch of sentences of similar length starting at the median sentence. order "file":
    the first sentences of the file, whatever their lengths (the short ones padded to the
    longest)."""
    from fairseq.data import data_utils

    pairs = list(zip((data_dir / "test.de").read_text().splitlines(),
                     (data_dir / "test.en").read_text().splitlines()))
    if order == "fairseq":
        pairs.sort(key=lambda p: (len(p[0].split()), len(p[1].split())))  # stable, like fairseq's mergesort
        pairs = pairs[len(pairs) // 2:]
    elif order != "file":
        raise ValueError(f"order {order!r}: expected 'fairseq' or 'file'")
    src, tgt, n_tok = [], [], 0
    for s, t in pairs:
        ts = d.encode_line(" ".join([s] * factor), add_if_not_exist=False).long()
        tt = d.encode_line(" ".join([t] * factor), add_if_not_exist=False).long()
        if (max_tokens and n_tok + len(tt) > max_tokens) or (max_sentences and len(src) == max_sentences):
            break
        src.append(ts)
        tgt.append(tt)
        n_tok += len(tt)
    if not src:
        sys.exit(f"--max-tokens {max_tokens}: smaller than the first target sentence of {data_dir}/test.en "
                 f"at length factor {factor}")
    batch = {
        "src_tokens": data_utils.collate_tokens(src, d.pad(), d.eos(), left_pad=True),
        "src_lengths": torch.tensor([len(s) for s in src]),
        "prev_output_tokens": data_utils.collate_tokens(tgt, d.pad(), d.eos(), left_pad=False,
                                                        move_eos_to_beginning=True),
        "target": data_utils.collate_tokens(tgt, d.pad(), d.eos(), left_pad=False),
    }
    return {k: v.to(device) for k, v in batch.items()}, n_tok


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _loss(model, batch, pad):
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    out = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
    lprobs = model.get_normalized_probs(out, log_probs=True).view(-1, out[0].size(-1))
    loss, _ = label_smoothed_nll_loss(lprobs.float(), batch["target"].view(-1), 0.1, ignore_index=pad)
    return loss


def measure_memory(model, batch, pad, device) -> Dict[str, float]:
    """Bytes autograd saves for backward in one training step (each storage once) and,
    on CUDA, the step's peak memory above what was allocated before it."""
    model.train()
    seen: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, batch, pad)
    loss.backward()
    model.zero_grad(set_to_none=True)
    result = {"saved_mib": sum(seen.values()) / 2**20}
    if device.type == "cuda":
        sync(device)
        result["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return result


# glibc keeps freed memory for reuse instead of returning it to the kernel (--heap keep)
# the same as scripts/lib/common.sh's EA_KEEP_HEAP_TUNABLES, which train.sh sets on the CPU
KEEP_HEAP_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def keep_heap() -> None:
    """Restart this script with KEEP_HEAP_TUNABLES in GLIBC_TUNABLES (once; glibc reads them
    only at start-up). A no-op off Linux."""
    if not sys.platform.startswith("linux") or KEEP_HEAP_TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), KEEP_HEAP_TUNABLES) if t)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]], env)


# the clock of the timings: wall time, or ("cpu") the CPU time of the calling thread,
# which does not advance while other processes hold the cores (only with --threads 1)
CLOCK = time.perf_counter


def time_update(model, opt, batch, pad, device):
    model.train()
    sync(device)
    t0 = CLOCK()
    loss = _loss(model, batch, pad)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(device)
    return CLOCK() - t0


def time_decode(model, d, sample, steps, device):
    from fairseq.sequence_generator import SequenceGenerator

    model.eval()
    gen = SequenceGenerator([model], d, beam_size=5, max_len_a=0, max_len_b=steps, min_len=steps)
    sync(device)
    t0 = CLOCK()
    with torch.no_grad():
        gen.generate([model], sample)
    sync(device)
    return CLOCK() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EA_IWSLT_BPE", DEFAULT_DATA)),
                    help="folder with fairseq-BPE'd test.de / test.en (default: ../shared/data/iwslt14/fairseq_bpe10k)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--lengths", default="1,4",
                    help="comma-separated sentence-length factors (each sentence repeated f times), e.g. 1,2,4,8")
    ap.add_argument("--max-tokens", type=int, default=2048, help="target tokens in the training batch")
    ap.add_argument("--decode-sentences", type=int, default=32, help="sentences decoded with beam 5 (at 1x; / f at f x)")
    ap.add_argument("--decode-steps", type=int, default=30, help="decoding steps at 1x (forced length; * f at f x)")
    ap.add_argument("--order", choices=["fairseq", "file"], default="fairseq",
                    help="which test sentences make the batches: 'fairseq', a batch as fairseq's length-sorted "
                         "batching makes it (similar lengths, from the median sentence on); 'file', the first "
                         "sentences of the file, padded to the longest (default: fairseq)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up); 0 measures memory only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="what the timings measure: 'wall' time, or 'cpu' time of the measuring thread, which "
                         "other processes on a busy machine do not inflate (CPU only, with --threads 1)")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--model-args", default="",
                    help="extra fairseq-train model flags for every variant, e.g. '--encoder-layers 2 "
                         "--decoder-layers 2' (default: transformer_iwslt_de_en's sizes)")
    ap.add_argument("--heap", choices=["keep", "system"], default="keep",
                    help="on a CPU: 'keep', glibc keeps freed memory for reuse (restarts the script with "
                         "GLIBC_TUNABLES set), so that page faults do not blur the timings; 'system', glibc's "
                         "defaults (default: keep)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--plot", type=Path, metavar="PNG",
                    help="also draw time and memory ratios against the length factor (matplotlib)")
    ap.add_argument("--workdir", type=Path, default=REPO / "work" / "bench",
                    help="where the dictionary built from --data goes (default: work/bench)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: print the table of a file written by --json (and --plot it)")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        if "header" not in saved or "lengths" not in saved:
            sys.exit(f"{args.report}: not a results file of this script (no 'header' / 'lengths')")
        report(saved["header"], saved["lengths"])
        if args.plot:
            plot(saved["lengths"], args.plot, saved["header"])
        return

    if args.heap == "keep" and args.repeats and not args.device.startswith("cuda"):
        keep_heap()
    import ea_fairseq  # noqa: F401  (registers the architectures)

    names = [v for v in args.variants.split(",") if v]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    try:
        factors = [int(f) for f in args.lengths.split(",") if f]
    except ValueError:
        sys.exit(f"--lengths {args.lengths!r}: expected comma-separated positive integers, e.g. 1,4")
    if not factors or min(factors) < 1:
        sys.exit(f"--lengths {args.lengths!r}: expected comma-separated positive integers, e.g. 1,4")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu":
        if device.type != "cpu" or torch.get_num_threads() != 1:
            sys.exit("--clock cpu times the calling thread only: use it with --device cpu --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    if not (args.data / "test.de").exists():
        sys.exit(f"{args.data}/test.de not found: pass --data (fairseq's BPE'd IWSLT14 test set)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    task, d = make_task(args.data, args.workdir)

    models, opts = {}, {}
    for name in names:
        models[name] = build(name, task, device, args.precision, args.model_args.split())
        opts[name] = torch.optim.Adam([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
    # trainable parameters (fairseq 0.12.2 also keeps untrained BetterTransformer copies)
    params = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}

    per_length = []
    for f in factors:
        batch, n_tok = make_batch(d, args.data, args.max_tokens, f, device, order=args.order)
        n_dec, steps = max(1, args.decode_sentences // f), args.decode_steps * f
        dec_batch, _ = make_batch(d, args.data, 0, f, device, max_sentences=n_dec, order=args.order)
        sample = {"net_input": {"src_tokens": dec_batch["src_tokens"], "src_lengths": dec_batch["src_lengths"]}}
        memory = {n: measure_memory(models[n], batch, d.pad(), device) for n in names}
        update = {n: [] for n in names}
        decode = {n: [] for n in names}
        for rep in range(args.repeats + 1 if args.repeats else 0):  # repeat 0 is a warm-up
            for n in names if rep % 2 else names[::-1]:
                tu = time_update(models[n], opts[n], batch, d.pad(), device)
                td = time_decode(models[n], d, sample, steps, device)
                if rep:
                    update[n].append(tu)
                    decode[n].append(td)
        per_length.append({
            "factor": f,
            "batch": f"{batch['src_tokens'].size(0)} sentences, {n_tok} target tokens "
                     f"(source {tuple(batch['src_tokens'].shape)}, target {tuple(batch['target'].shape)} padded)",
            "decode": f"{dec_batch['src_tokens'].size(0)} sentences x beam 5 x {steps} steps",
            "results": [{"variant": n, "params": params[n], **memory[n],
                         "update_ms_all": [t * 1e3 for t in update[n]],
                         "decode_ms_all": [t * 1e3 for t in decode[n]]} for n in names],
        })

    heap = "heap kept" if KEEP_HEAP_TUNABLES in os.environ.get("GLIBC_TUNABLES", "") else "system heap"
    header = (f"device {device}, threads {torch.get_num_threads()}, {args.precision}, {args.clock} clock, "
              f"{heap}; {args.repeats} repeats; "
              f"transformer_iwslt_de_en sizes{' ' + args.model_args if args.model_args else ''}; {args.order} batches")
    report(header, per_length)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "header": header, "lengths": per_length,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }, indent=2))
    if args.plot:
        plot(per_length, args.plot, header)


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(header: str, per_length: List[dict]) -> None:
    """Print one table per length factor; add medians and ratios to the rows."""
    print(f"\n{header}")
    for block in per_length:
        rows = block["results"]
        base = next((r for r in rows if r["variant"] == "vanilla"), None)

        def ratios(r, key):
            return [a / b for a, b in zip(r[key], base[key])] if base is not None else []

        def ratio(r, key):
            return _median(ratios(r, key))

        def quartiles(r, key):
            """The middle half of the per-repeat ratios: how far one run's median can be trusted."""
            xs = ratios(r, key)
            if len(xs) < 2:
                return [float("nan"), float("nan")]
            q = statistics.quantiles(xs, n=4, method="inclusive")
            return [q[0], q[2]]

        gpu = "peak_mib" in rows[0]
        print(f"\nlength x{block['factor']}: batch {block['batch']}; decode {block['decode']}")
        print(f"{'variant':<18} {'params':>11} {'saved MiB':>10} {'x vanilla':>9}"
              + (f" {'peak MiB':>9} {'x vanilla':>9}" if gpu else "")
              + f" {'update ms':>10} {'x vanilla':>9} {'(IQR)':>11} {'decode ms':>10} {'x vanilla':>9} {'(IQR)':>11}")
        for r in rows:
            r["update_ms"], r["decode_ms"] = _median(r["update_ms_all"]), _median(r["decode_ms_all"])
            r["update_ratio"], r["decode_ratio"] = ratio(r, "update_ms_all"), ratio(r, "decode_ms_all")
            r["update_ratio_iqr"] = quartiles(r, "update_ms_all")
            r["decode_ratio_iqr"] = quartiles(r, "decode_ms_all")
            r["saved_ratio"] = r["saved_mib"] / base["saved_mib"] if base else float("nan")
            line = f"{r['variant']:<18} {r['params']:>11,} {r['saved_mib']:>10.1f} {r['saved_ratio']:>9.3f}"
            if gpu:
                r["peak_ratio"] = r["peak_mib"] / base["peak_mib"] if base else float("nan")
                line += f" {r['peak_mib']:>9.1f} {r['peak_ratio']:>9.3f}"
            iqr = {k: "{:.2f}-{:.2f}".format(*r[k + "_ratio_iqr"]) if r is not base else ""
                   for k in ("update", "decode")}
            line += (f" {r['update_ms']:>10.1f} {r['update_ratio']:>9.2f} {iqr['update']:>11}"
                     f" {r['decode_ms']:>10.1f} {r['decode_ratio']:>9.2f} {iqr['decode']:>11}")
            print(line)


def plot(per_length: List[dict], path: Path, header: str) -> None:
    """Three panels against the length factor: update-time, decode-time and memory ratios
    (time: the median ratio, with bars over the middle half of the per-repeat ratios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_rows = {}
    for block in per_length:
        for r in block["results"]:
            report_rows.setdefault(r["variant"], []).append((block["factor"], r))
    panels = [("update_ratio", "one training update"), ("decode_ratio", "beam-5 decoding"),
              ("saved_ratio", "activation memory (saved for backward)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        for variant, points in report_rows.items():
            if variant == "vanilla":
                continue
            xs = [f for f, _ in points]
            ys = [r.get(key, float("nan")) for _, r in points]
            style = "--" if variant.endswith(":eager") else "-"
            iqr = [r.get(key + "_iqr") for _, r in points]
            if all(q is not None for q in iqr):  # time: the middle half of the per-repeat ratios
                err = [[y - q[0] for y, q in zip(ys, iqr)], [q[1] - y for y, q in zip(ys, iqr)]]
                ax.errorbar(xs, ys, yerr=err, fmt=style, marker="o", capsize=3, label=variant)
            else:
                ax.plot(xs, ys, style, marker="o", label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8, label="vanilla")
        ax.set_xscale("log", base=2)
        ax.set_xticks([b["factor"] for b in per_length], [f"{b['factor']}x" for b in per_length])
        ax.set_title(title)
        ax.set_xlabel("sentence length (each sentence repeated)")
        ax.set_ylabel("x vanilla")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"evolving attention / vanilla fairseq transformer ({header})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
