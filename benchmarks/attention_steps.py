#!/usr/bin/env python3
"""Training-time attention of each variant against vanilla, interleaved module by module.

benchmarks/cost.py times whole updates (8 s each on the 2-core VM), one variant after the
other; on a noisy machine its per-repeat ratios spread by 10 % or more. What differs
between the variants in an update is only their attention modules: embeddings, FFNs,
layer norms, the output projection, the loss and the optimizer do the same work in each.
This script times that part alone and tightly. One training forward of each model on
cost.py's batch records every attention call as it was made (its inputs, masks and
arguments; for EA modules the previous layer's map). Then each recorded call runs forward
and backward on its own (fixed random gradients on the output, and on the
map it hands on where the next layer takes it), the variants alternating at every call
(forwards, then backwards), so that a drift of the machine's speed hits all alike.

Printed per variant: the attention's forward + backward time for one update (all its
attention calls), its ratio to vanilla's, and the update ratio this implies:
1 + (attention - vanilla's attention) / vanilla's whole update, with vanilla's update timed
in the same run. The last leaves out second-order effects (caches, allocation) and the
optimizer's few extra parameters, which cost.py's whole updates include.

    python benchmarks/attention_steps.py --lengths 1,4 --threads 1 --clock cpu
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
import decoder_steps  # noqa: E402  (its start: checked flags, heap, threads, clock)


def record_calls(model, batch, pad):
    """The attention calls of one training forward, in order: (module, its arguments by
    name, the names of the inputs that are the query itself (self-attention), the previous
    layer's map and query padding mask (EA modules), whether the next layer takes its map)."""
    import inspect

    from fairseq.modules.multihead_attention import MultiheadAttention

    from ea_fairseq.modules import EvolvingMultiheadAttention

    calls, hooks = [], []
    last = {}  # attention module -> True in the last layer of its stack
    for part in (model.encoder, model.decoder):
        for i, layer in enumerate(part.layers):
            for module in layer.modules():
                if isinstance(module, MultiheadAttention):
                    last[module] = i == len(part.layers) - 1

    def keep(x):
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    def pre_hook(module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        same = [name for name in ("key", "value") if bound.get(name) is bound["query"]]
        link = module._ea_link if isinstance(module, EvolvingMultiheadAttention) else None
        calls.append((module, {k: keep(v) for k, v in bound.items() if k not in same}, same,
                      keep(link.prev) if link is not None else None,
                      keep(link.query_padding_mask) if link is not None else None, not last[module]))

    for module in last:
        hooks.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    model.train()
    try:
        with torch.no_grad():
            model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
    finally:
        for h in hooks:
            h.remove()
    return calls


def run_call(call, seed):
    """One recorded attention call, forward then backward (with fixed random gradients
    on the output and, where the next layer takes it, on the map handed on)."""
    from ea_fairseq.modules import EvolvingMultiheadAttention

    module, recorded, same, prev, qpm, hands_on = call
    kwargs = dict(recorded)
    leaves = []
    for name in ("query", "key", "value"):
        if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].is_floating_point():
            kwargs[name] = kwargs[name].detach().requires_grad_()
            leaves.append(kwargs[name])
    for name in same:
        kwargs[name] = kwargs["query"]
    module.zero_grad(set_to_none=True)
    if isinstance(module, EvolvingMultiheadAttention):
        prev = None if prev is None else prev.detach().requires_grad_()
        with module.evolve(prev, qpm) as link:
            out, _ = module(**kwargs)
        outs, grads = [out], [call_grad(out, seed)]
        if hands_on and link.out is not None:
            outs.append(link.out)
            grads.append(call_grad(link.out, seed + 1))
    else:
        out, _ = module(**kwargs)
        outs, grads = [out], [call_grad(out, seed)]
    torch.autograd.backward(outs, grads)


_GRADS = {}


def call_grad(t, seed):
    """A fixed random gradient for an output of this shape (the same for every variant)."""
    k = (tuple(t.shape), t.dtype, seed)
    if k not in _GRADS:
        g = torch.Generator().manual_seed(seed)
        _GRADS[k] = torch.randn(t.shape, generator=g).to(t)
    return _GRADS[k]


def attention_times(calls, clock, device, seed=0):
    """Seconds of attention forward + backward per variant, interleaved call by call."""
    names = list(calls)
    took = {n: 0.0 for n in names}
    for j in range(len(calls[names[0]])):
        for n in names if j % 2 else names[::-1]:
            cost.sync(device)
            t0 = clock()
            run_call(calls[n][j], seed + j)
            cost.sync(device)
            took[n] += clock() - t0
    return took


def main():
    names, factors, device, clock = decoder_steps.start(args)
    cost.CLOCK = clock
    if not (args.data / "test.de").exists():
        sys.exit(f"{args.data}/test.de not found: pass --data (fairseq's BPE'd IWSLT14 test set)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    task, d = cost.make_task(args.data, args.workdir)
    models = {n: cost.build(n, task, device, "fp32") for n in names}

    heap = "heap kept" if cost.KEEP_HEAP_TUNABLES in os.environ.get("GLIBC_TUNABLES", "") else "system heap"
    print(f"\ndevice {device}, threads {torch.get_num_threads()}, {args.clock} clock, {heap}; "
          f"{args.repeats} repeats; attention calls interleaved call by call")
    for f in factors:
        batch, n_tok = cost.make_batch(d, args.data, args.max_tokens, f, device)
        calls = {n: record_calls(m, batch, d.pad()) for n, m in models.items()}
        counts = {len(c) for c in calls.values()}
        if len(counts) != 1:
            sys.exit(f"the variants make different numbers of attention calls: {counts}")
        opt = torch.optim.Adam(models["vanilla"].parameters(), lr=1e-4)
        runs, updates = [], []
        for rep in range(args.repeats + 1):  # the first is a warm-up
            runs.append(attention_times(calls, clock, device, seed=rep * 1000))
            updates.append(cost.time_update(models["vanilla"], opt, batch, d.pad(), device))
        runs, updates = runs[1:], updates[1:]
        update = statistics.median(updates)
        print(f"\nlength x{f}: {batch['src_tokens'].size(0)} sentences, {n_tok} target tokens, "
              f"{counts.pop()} attention calls; vanilla's update {update * 1e3:.0f} ms")
        print(f"{'variant':<18} {'attention ms':>12} {'x vanilla':>9} {'update x vanilla':>16} {'per repeat':>24}")
        for n in names:
            ratios = [r[n] / r["vanilla"] for r in runs]
            implied = [1 + (r[n] - r["vanilla"]) / u for r, u in zip(runs, updates)]
            each = " ".join(f"{x:.3f}" for x in implied)
            print(f"{n:<18} {statistics.median(r[n] for r in runs) * 1e3:>12.1f} {statistics.median(ratios):>9.3f} "
                  f"{statistics.median(implied):>16.3f} {each:>24}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EA_IWSLT_BPE", cost.DEFAULT_DATA)),
                    help="fairseq's BPE'd IWSLT14 test set (test.de, test.en)")
    ap.add_argument("--variants", default="vanilla,ea:autograd,ea,ea+cross:autograd,ea+cross",
                    help="comma-separated, vanilla first, of: " + ", ".join(cost.VARIANTS))
    ap.add_argument("--lengths", default="1,4", help="comma-separated sentence-length factors, e.g. 1,4")
    ap.add_argument("--max-tokens", type=int, default=2048, help="target tokens in the training batch")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (after one warm-up)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="'cpu': the calling thread's CPU time (with --threads 1), blind to other processes")
    ap.add_argument("--heap", choices=["keep", "system"], default="keep",
                    help="'keep' (CPU): restart with glibc's heap kept for reuse, as cost.py does")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=cost.REPO / "work" / "bench",
                    help="where the dictionary and the binarised test set are written")
    args = ap.parse_args()
    main()
