#!/usr/bin/env python3
"""Incremental decoder steps of each variant against vanilla, interleaved step by step.

benchmarks/cost.py times whole beam searches, one variant after the other; on a noisy
machine its per-repeat ratios spread by several percent. This script times only what
differs between the variants, the decoder's incremental steps, and alternates the
variants at every step (forwards, then backwards), so that a drift of the machine's
speed hits all alike. Per step and variant: ``decoder(tokens, encoder_out,
incremental_state)``, ``reorder_incremental_state_scripting`` and
``reorder_encoder_out`` with a beam-search-like order (each hypothesis takes the state
of a random hypothesis of its own sentence), on the batches of cost.py's decoding
(``--decode-sentences / f`` test sentences x beam 5, ``--decode-steps * f`` steps; the
target tokens are random, as the step's cost does not depend on them).
SequenceGenerator's own work (scores, top-k, finished hypotheses), the same for every
variant, is left out, so these ratios are at least those of a whole beam search.

    python benchmarks/decoder_steps.py --lengths 1,4 --threads 1 --clock cpu
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost  # noqa: E402  (this folder's benchmark: batches, models, heap)


def decode_steps(models, d, src, lengths, steps, beam, clock, seed=0):
    """Seconds of decoder steps per variant, the variants interleaved at each step."""
    g = torch.Generator().manual_seed(seed)
    hyps = src.size(0) * beam
    src, lengths = src.repeat_interleave(beam, 0), lengths.repeat_interleave(beam, 0)
    tokens = torch.randint(d.nspecial, len(d), (hyps, steps + 1), generator=g)
    tokens[:, 0] = d.eos()
    sentence_start = torch.arange(hyps) // beam * beam
    orders = [sentence_start + torch.randint(0, beam, (hyps,), generator=g) for _ in range(steps)]
    names = list(models)
    enc, state, took = {}, {}, {n: 0.0 for n in names}
    with torch.no_grad():
        for n, m in models.items():
            m.eval()
            for module in m.modules():
                if hasattr(module, "set_beam_size"):
                    module.set_beam_size(beam)
            enc[n], state[n] = m.encoder(src, lengths), {}
        for t in range(steps):
            for n in names if t % 2 else names[::-1]:
                m = models[n]
                t0 = clock()
                m.decoder(tokens[:, : t + 1].to(src.device), enc[n], incremental_state=state[n])
                order = orders[t].to(src.device)
                m.decoder.reorder_incremental_state_scripting(state[n], order)
                enc[n] = m.encoder.reorder_encoder_out(enc[n], order)
                cost.sync(src.device)
                took[n] += clock() - t0
    return took


def start(args):
    """What decoder_steps.py and attention_steps.py both begin with: the variants (vanilla
    first) and length factors checked, glibc's heap kept (CPU), the threads set, the
    clock chosen. Returns (variant names, length factors, device, clock)."""
    names = [v for v in args.variants.split(",") if v]
    unknown = [n for n in names if n not in cost.VARIANTS]
    if unknown or not names or names[0] != "vanilla":
        sys.exit(f"--variants {args.variants!r}: vanilla first, then any of {', '.join(cost.VARIANTS)}")
    try:
        factors = [int(f) for f in args.lengths.split(",") if f]
    except ValueError:
        factors = []
    if not factors or min(factors) < 1:
        sys.exit(f"--lengths {args.lengths!r}: expected comma-separated positive integers, e.g. 1,4")
    if args.heap == "keep" and not args.device.startswith("cuda"):
        cost.keep_heap()
    import ea_fairseq  # noqa: F401  (registers the architectures)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.perf_counter
    if args.clock == "cpu":
        if device.type != "cpu" or torch.get_num_threads() != 1:
            sys.exit("--clock cpu times the calling thread only: use it with --device cpu --threads 1")
        clock = time.thread_time
    return names, factors, device, clock


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EA_IWSLT_BPE", cost.DEFAULT_DATA)),
                    help="folder with fairseq-BPE'd test.de / test.en (default: ../shared/data/iwslt14/fairseq_bpe10k)")
    ap.add_argument("--variants", default="vanilla,ea:autograd,ea,ea+cross",
                    help="comma-separated, of: " + ", ".join(cost.VARIANTS) + " (vanilla first: the baseline)")
    ap.add_argument("--lengths", default="1,4", help="comma-separated sentence-length factors, e.g. 1,4")
    ap.add_argument("--decode-sentences", type=int, default=32, help="sentences x beam 5 (at 1x; / f at f x)")
    ap.add_argument("--decode-steps", type=int, default=30, help="decoder steps at 1x (* f at f x)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="'wall' time, or 'cpu' time of the measuring thread (CPU only, with --threads 1)")
    ap.add_argument("--heap", choices=["keep", "system"], default="keep",
                    help="on a CPU: 'keep' glibc's freed memory for reuse (see cost.py), or the 'system' defaults")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=cost.REPO / "work" / "bench",
                    help="where the dictionary built from --data goes (default: work/bench)")
    args = ap.parse_args()
    names, factors, device, clock = start(args)
    if not (args.data / "test.de").exists():
        sys.exit(f"{args.data}/test.de not found: pass --data (fairseq's BPE'd IWSLT14 test set)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    task, d = cost.make_task(args.data, args.workdir)
    models = {n: cost.build(n, task, device, "fp32") for n in names}

    heap = "heap kept" if cost.KEEP_HEAP_TUNABLES in os.environ.get("GLIBC_TUNABLES", "") else "system heap"
    print(f"\ndevice {device}, threads {torch.get_num_threads()}, {args.clock} clock, {heap}; "
          f"{args.repeats} repeats; decoder steps interleaved step by step")
    for f in factors:
        n_dec, steps = max(1, args.decode_sentences // f), args.decode_steps * f
        batch, _ = cost.make_batch(d, args.data, 0, f, device, max_sentences=n_dec)
        runs = [decode_steps(models, d, batch["src_tokens"], batch["src_lengths"], steps, 5, clock, seed=rep)
                for rep in range(args.repeats + 1)][1:]  # the first is a warm-up
        print(f"\nlength x{f}: {batch['src_tokens'].size(0)} sentences x beam 5 x {steps} steps")
        print(f"{'variant':<18} {'steps ms':>10} {'x vanilla':>9} {'per repeat':>24}")
        for n in names:
            ratios = [r[n] / r["vanilla"] for r in runs]
            each = " ".join(f"{x:.3f}" for x in ratios)
            print(f"{n:<18} {statistics.median(r[n] for r in runs) * 1e3:>10.1f} "
                  f"{statistics.median(ratios):>9.3f} {each:>24}")


if __name__ == "__main__":
    main()
