#!/usr/bin/env python3
"""Cost of evolving attention against fairseq's transformer, side by side.

Measures, on one real batch (IWSLT14 De-En test sentences, fairseq's BPE), for
each model variant:
  * one training update: forward + backward (label-smoothed CE) + Adam step;
  * beam-5 decoding with fairseq's SequenceGenerator, forced to a fixed number of
    steps (min_len = max_len) so that every variant decodes the same length.
Variants run interleaved, repeat after repeat, so that machine noise hits all
alike. The table gives each variant's median time and its ratio to the vanilla
model: the median over repeats of (variant time / vanilla time in the same repeat),
which cancels most of a noisy machine's drift.

    python benchmarks/cost.py                                     # CPU, transformer_iwslt_de_en
    python benchmarks/cost.py --device cuda --precision fp16      # on a GPU
    python benchmarks/cost.py --report results/cost_cpu.json      # table of an earlier --json run
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "iwslt14" / "fairseq_bpe10k"

VARIANTS = {
    "vanilla": ("transformer_iwslt_de_en", []),
    "ea-off": ("ea_transformer_iwslt_de_en", ["--ea-no-encoder-self-attn", "--ea-no-decoder-self-attn"]),
    "ea": ("ea_transformer_iwslt_de_en", []),
    "ea+cross": ("ea_transformer_iwslt_de_en", ["--ea-cross-attn"]),
}


def build(arch, extra, task, device, half):
    from fairseq import options

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(task.cfg.data), "--task", "translation", "--user-dir", str(REPO / "ea_fairseq"), "--arch", arch,
        "--share-all-embeddings", "--source-lang", "de", "--target-lang", "en", *extra])
    torch.manual_seed(0)
    model = task.build_model(args).to(device)
    return model.half() if half == "fp16" else model.bfloat16() if half == "bf16" else model


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


def make_batch(d, data_dir: Path, max_tokens: int, device):
    """The first test sentences up to max_tokens (target side), as fairseq collates them."""
    from fairseq.data import data_utils

    src_lines = (data_dir / "test.de").read_text().splitlines()
    tgt_lines = (data_dir / "test.en").read_text().splitlines()
    src, tgt, n_tok = [], [], 0
    for s, t in zip(src_lines, tgt_lines):
        ts = d.encode_line(s, add_if_not_exist=False).long()
        tt = d.encode_line(t, add_if_not_exist=False).long()
        if n_tok + len(tt) > max_tokens:
            break
        src.append(ts)
        tgt.append(tt)
        n_tok += len(tt)
    if not src:
        sys.exit(f"--max-tokens {max_tokens}: smaller than the first target sentence of {data_dir}/test.en")
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


def time_update(model, opt, batch, pad, device):
    from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss

    model.train()
    sync(device)
    t0 = time.perf_counter()
    out = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
    lprobs = model.get_normalized_probs(out, log_probs=True).view(-1, out[0].size(-1))
    loss, _ = label_smoothed_nll_loss(lprobs.float(), batch["target"].view(-1), 0.1, ignore_index=pad)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(device)
    return time.perf_counter() - t0


def time_decode(model, d, batch, steps, device, n_sent):
    from fairseq.sequence_generator import SequenceGenerator

    model.eval()
    gen = SequenceGenerator([model], d, beam_size=5, max_len_a=0, max_len_b=steps, min_len=steps)
    sample = {"net_input": {"src_tokens": batch["src_tokens"][:n_sent], "src_lengths": batch["src_lengths"][:n_sent]}}
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        gen.generate([model], sample)
    sync(device)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EA_IWSLT_BPE", DEFAULT_DATA)),
                    help="folder with fairseq-BPE'd test.de / test.en (default: ../shared/data/iwslt14/fairseq_bpe10k)")
    ap.add_argument("--variants", default="vanilla,ea-off,ea,ea+cross", help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--max-tokens", type=int, default=2048, help="target tokens in the training batch")
    ap.add_argument("--decode-sentences", type=int, default=32, help="sentences decoded with beam 5")
    ap.add_argument("--decode-steps", type=int, default=30, help="decoding steps (forced length)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (after one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--workdir", type=Path, default=REPO / "work" / "bench",
                    help="where the dictionary built from --data goes (default: work/bench)")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="measure nothing: print the table of a file written by --json")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(args.report.read_text())
        if "header" not in saved:
            sys.exit(f"{args.report}: not a results file of this script (no 'header')")
        report(saved["header"], saved["results"])
        return

    import ea_fairseq  # noqa: F401  (registers the architectures)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not (args.data / "test.de").exists():
        sys.exit(f"{args.data}/test.de not found: pass --data (fairseq's BPE'd IWSLT14 test set)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    task, d = make_task(args.data, args.workdir)
    batch, n_tok = make_batch(d, args.data, args.max_tokens, device)
    if args.decode_sentences > batch["src_tokens"].size(0):
        sys.exit(f"--decode-sentences {args.decode_sentences}: the batch of --max-tokens {args.max_tokens} "
                 f"holds only {batch['src_tokens'].size(0)} sentences")
    names = [v for v in args.variants.split(",") if v]
    models, opts = {}, {}
    for name in names:
        arch, extra = VARIANTS[name]
        models[name] = build(arch, extra, task, device, args.precision)
        opts[name] = torch.optim.Adam([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
    # trainable parameters (fairseq 0.12.2 also keeps untrained BetterTransformer copies)
    params = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}

    update = {n: [] for n in names}
    decode = {n: [] for n in names}
    for rep in range(args.repeats + 1):  # repeat 0 is a warm-up
        for n in names:
            tu = time_update(models[n], opts[n], batch, d.pad(), device)
            td = time_decode(models[n], d, batch, args.decode_steps, device, args.decode_sentences)
            if rep:
                update[n].append(tu)
                decode[n].append(td)

    rows = [{"variant": n, "params": params[n],
             "update_ms_all": [t * 1e3 for t in update[n]], "decode_ms_all": [t * 1e3 for t in decode[n]]}
            for n in names]
    header = (f"batch: {batch['src_tokens'].size(0)} sentences, {n_tok} target tokens; "
              f"decode: {args.decode_sentences} sentences x beam 5 x {args.decode_steps} steps; "
              f"device {device}, threads {torch.get_num_threads()}, {args.precision}; {args.repeats} repeats")
    rows = report(header, rows)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                         "target_tokens": n_tok, "results": rows}, indent=2))


def report(header, rows):
    """Print the table; return the rows with medians and paired ratios added."""
    base = next((r for r in rows if r["variant"] == "vanilla"), None)

    def ratio(r, key):
        if base is None:
            return float("nan")
        return statistics.median(a / b for a, b in zip(r[key], base[key]))

    print(f"\n{header}")
    print(f"{'variant':<10} {'params':>11} {'update ms':>10} {'x vanilla':>9} {'decode ms':>10} {'x vanilla':>9}")
    for r in rows:
        r["update_ms"], r["decode_ms"] = statistics.median(r["update_ms_all"]), statistics.median(r["decode_ms_all"])
        r["update_ratio"], r["decode_ratio"] = ratio(r, "update_ms_all"), ratio(r, "decode_ms_all")
        print(f"{r['variant']:<10} {r['params']:>11,} {r['update_ms']:>10.1f} {r['update_ratio']:>9.2f} "
              f"{r['decode_ms']:>10.1f} {r['decode_ratio']:>9.2f}")
    return rows

if __name__ == "__main__":
    main()
