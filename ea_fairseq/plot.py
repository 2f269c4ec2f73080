"""Draw the attention maps of a fairseq translation model, every layer and head, as a PNG.

    python -m ea_fairseq.plot DATA_BIN --path EA.pt [--compare VANILLA.pt] \\
        (--index N [--subset test] | --sentence "tokenised , bpe@@ 'd source") \\
        [--target hyp|ref|"target text"] [--kernels kernels.png] -o maps.png

One teacher-forced forward pass (batch of one sentence) per model. The maps are the
softmax probabilities each attention module really uses (before dropout), captured
from the outside with hooks that ask every attention module for its per-head weights
(fairseq's own MultiheadAttention is sent down its explicit path for that). Rows of
each picture are queries, columns keys; decoder rows are labelled with the token
that position predicts, decoder self-attention columns with the decoder input.
With ``--compare`` the second model is drawn beside the first, on the same target.
``--kernels`` also draws the learned EA convolution kernels.
"""

import argparse
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

logger = logging.getLogger("ea_fairseq.plot")

STACKS = ("encoder", "decoder", "cross")
STACK_TITLES = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
                "cross": "encoder-decoder attention"}


@dataclass
class AttentionMaps:
    """The per-head attention maps of one model on one sentence pair."""

    name: str
    maps: Dict[str, List[Tensor]]  # stack -> one (H, Tq, Tk) float tensor per layer
    src: List[str]  # source tokens (encoder queries/keys, cross-attention keys)
    tgt_in: List[str]  # decoder input tokens (decoder self-attention keys)
    tgt_out: List[str]  # the token each decoder position predicts (decoder queries)
    logits: Optional[Tensor] = None  # decoder output (T, V) of the same pass
    extra: Dict[str, object] = field(default_factory=dict)  # the decoder's extra dict


def attention_modules(model) -> Dict[str, list]:
    """stack -> the attention module of each layer (fairseq Transformer layout)."""
    out = {
        "encoder": [layer.self_attn for layer in model.encoder.layers],
        "decoder": [layer.self_attn for layer in model.decoder.layers],
        "cross": [layer.encoder_attn for layer in model.decoder.layers
                  if getattr(layer, "encoder_attn", None) is not None],
    }
    return {k: v for k, v in out.items() if v}


@contextmanager
def capture_attention(model) -> Iterator[Dict[str, List[Optional[Tensor]]]]:
    """Within the context, every forward pass of ``model`` fills the yielded dict:
    stack -> per layer the (H, B, Tq, Tk) float probabilities of its attention.

    Forward pre-hooks set need_weights / need_head_weights on each attention call;
    fairseq's MultiheadAttention is switched to its explicit path (its fused path
    returns no per-head weights) and switched back on exit.
    """
    from fairseq.modules.multihead_attention import MultiheadAttention

    from .modules.evolving_attention import EvolvingMultiheadAttention

    mods = attention_modules(model)
    maps: Dict[str, List[Optional[Tensor]]] = {s: [None] * len(m) for s, m in mods.items()}
    handles, restore = [], []

    def pre_hook(module, args, kwargs):
        kwargs["need_weights"] = True
        kwargs["need_head_weights"] = True
        return args, kwargs

    for stack, modules in mods.items():
        for idx, module in enumerate(modules):
            def hook(module, args, kwargs, output, stack=stack, idx=idx):
                weights = output[1]
                if weights is None or weights.dim() != 4:
                    raise RuntimeError(f"{stack} layer {idx + 1}: the attention module returned no per-head weights")
                maps[stack][idx] = weights.detach().float()

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
            if isinstance(module, MultiheadAttention) and not isinstance(module, EvolvingMultiheadAttention):
                restore.append((module, module.skip_embed_dim_check))
                module.skip_embed_dim_check = True  # fairseq's fused path is taken only without it
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()
        for module, value in restore:
            module.skip_embed_dim_check = value


def teacher_forced_maps(model, src: Tensor, tgt: Tensor, src_dict, tgt_dict, name: str) -> AttentionMaps:
    """src: (S,) source ids ending in EOS; tgt: (T,) target ids ending in EOS.
    Runs one forward pass with the decoder fed EOS + tgt[:-1]."""
    model.eval()
    prev = torch.cat([tgt.new_tensor([tgt_dict.eos()]), tgt[:-1]])
    with capture_attention(model) as maps, torch.no_grad():
        logits, extra = model(src[None], torch.tensor([src.numel()]), prev[None])
    missing = [f"{s} layer {i + 1}" for s, layers in maps.items() for i, m in enumerate(layers) if m is None]
    if missing:
        raise RuntimeError(f"no attention captured for {', '.join(missing)}")
    return AttentionMaps(
        name=name,
        maps={s: [m[:, 0] for m in layers] for s, layers in maps.items()},  # (H, Tq, Tk)
        src=[src_dict[i] for i in src.tolist()],
        tgt_in=[tgt_dict[i] for i in prev.tolist()],
        tgt_out=[tgt_dict[i] for i in tgt.tolist()],
        logits=logits[0],
        extra=extra,
    )


# --- pictures ------------------------------------------------------------------------------

def _axes_tokens(stack: str, run: AttentionMaps) -> Tuple[List[str], List[str]]:
    """(row labels, column labels) of a map of ``stack``."""
    if stack == "encoder":
        return run.src, run.src
    if stack == "decoder":
        return run.tgt_out, run.tgt_in
    return run.tgt_out, run.src


def _save_atomically(fig, out: Path, dpi: int) -> None:
    """Write the PNG beside ``out`` and rename it: never a half-written picture."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def draw_maps(runs: Sequence[AttentionMaps], out: Path, stacks: Sequence[str] = STACKS, dpi: int = 80,
              title: str = ""):
    """One panel per (stack, layer) row and (model, head) column; models side by side.
    Returns (figure, {(run index, stack, layer, head): axes})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stacks = [s for s in stacks if all(s in r.maps for r in runs)]
    if not stacks:
        raise ValueError("nothing to draw: the models share none of the stacks asked for")
    layers = {s: len(runs[0].maps[s]) for s in stacks}
    heads = runs[0].maps[stacks[0]][0].size(0)
    for r in runs[1:]:
        for s in stacks:
            if len(r.maps[s]) != layers[s] or r.maps[s][0].size(0) != heads:
                raise ValueError(f"{r.name}: {len(r.maps[s])} layers x {r.maps[s][0].size(0)} heads in {s}, "
                                 f"{runs[0].name} has {layers[s]} x {heads}: cannot draw them side by side")
    n_rows = sum(layers.values())
    n_cols = heads * len(runs)
    size = 1.55
    # a gap column between models, a gap row between stacks (room for the tokens)
    width_ratios: List[float] = []
    for i in range(len(runs)):
        width_ratios += [1.0] * heads + ([0.25] if i < len(runs) - 1 else [])
    height_ratios: List[float] = []
    for i, stack in enumerate(stacks):
        height_ratios += [1.0] * layers[stack] + ([0.55] if i < len(stacks) - 1 else [])
    fig_h = sum(height_ratios) * size * 1.12 + 1.6  # inches; 1.2 above for the titles
    fig = plt.figure(figsize=(n_cols * size + 1.4, fig_h))
    grid = fig.add_gridspec(len(height_ratios), len(width_ratios), width_ratios=width_ratios,
                            height_ratios=height_ratios, hspace=0.12, wspace=0.12,
                            left=0.09, right=0.99, bottom=0.4 / fig_h, top=1 - 1.2 / fig_h)
    panels = {}
    row = 0
    for stack in stacks:
        for layer in range(layers[stack]):
            for ri, run in enumerate(runs):
                ylabels, xlabels = _axes_tokens(stack, run)
                for h in range(heads):
                    ax = fig.add_subplot(grid[row, ri * (heads + 1) + h])
                    m = run.maps[stack][layer][h].cpu().numpy()  # (Tq, Tk)
                    ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest", aspect="auto")
                    ax.set_xticks(range(len(xlabels)))
                    ax.set_yticks(range(len(ylabels)))
                    first_col, last_row = h == 0, layer == layers[stack] - 1
                    ax.set_yticklabels(ylabels if first_col else [], fontsize=4.5)
                    ax.set_xticklabels(xlabels if last_row else [], fontsize=4.5, rotation=90)
                    ax.tick_params(length=0, pad=1)
                    if layer == 0:
                        ax.set_title(f"{run.name}\nhead {h + 1}" if h == 0 else f"head {h + 1}", fontsize=7)
                    if first_col:
                        ax.set_ylabel(f"{STACK_TITLES[stack]}\nlayer {layer + 1}", fontsize=6.5)
                    panels[(ri, stack, layer, h)] = ax
            row += 1
        row += 1  # the gap row
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.1 / fig_h, va="top")
    _save_atomically(fig, out, dpi)
    return fig, panels


def conv_kernels(model) -> Dict[Tuple[str, int], Tensor]:
    """(stack, layer) -> the EA conv weight (H_out, H_in, k, k) of that layer."""
    out = {}
    for stack, modules in attention_modules(model).items():
        for idx, module in enumerate(modules):
            conv = getattr(module, "ea_conv", None)
            if conv is not None:
                out[(stack, idx)] = conv.conv.weight.detach().float().cpu()
    return out


def draw_kernels(models: Sequence[Tuple[str, object]], out: Path, dpi: int = 80):
    """Per model, one row per EA conv (stack, layer) and one panel per (output head,
    input head): the k x k kernel. Returns (figure, {(model, stack, layer, h_out, h_in): axes})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, key, w) for name, model in models for key, w in conv_kernels(model).items()]
    if not rows:
        raise ValueError("no evolving-attention convolutions to draw (vanilla model, or --ea-alpha 0)")
    heads = rows[0][2].size(0)
    lim = max(float(w.abs().max()) for _, _, w in rows) or 1.0
    fig = plt.figure(figsize=(heads * heads * 0.55 + 1.5, len(rows) * 0.75 + 1.0))
    grid = fig.add_gridspec(len(rows), heads * heads, hspace=0.6, wspace=0.15)
    panels = {}
    image = None
    for r, (name, (stack, layer), w) in enumerate(rows):
        for ho in range(w.size(0)):
            for hi in range(w.size(1)):
                ax = fig.add_subplot(grid[r, ho * heads + hi])
                image = ax.imshow(w[ho, hi].numpy(), vmin=-lim, vmax=lim, cmap="RdBu_r", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{ho + 1}<-{hi + 1}", fontsize=6)
                if ho == 0 and hi == 0:
                    ax.set_ylabel(f"{name}\n{STACK_TITLES[stack]}\nlayer {layer + 1}", fontsize=5,
                                  rotation=0, ha="right", va="center")
                panels[(name, stack, layer, ho, hi)] = ax
    fig.suptitle("evolving-attention conv kernels (output head <- input head); identity = 1 in the centre "
                 "of each diagonal panel", fontsize=7)
    fig.colorbar(image, ax=list(panels.values()), fraction=0.02, pad=0.01)
    _save_atomically(fig, out, dpi)
    return fig, panels


# --- command line ---------------------------------------------------------------------------

def _fail(msg: str) -> "NoReturn":  # noqa: F821
    print(f"ea_fairseq.plot: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _load(path: Path, data: Path):
    from fairseq import checkpoint_utils

    if not path.is_file():
        _fail(f"{path}: no such checkpoint")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    return models[0], cfg, task


def _model_name(model, path: Path) -> str:
    from .modules.evolving_attention import EvolvingMultiheadAttention

    kind = "EA" if any(isinstance(m, EvolvingMultiheadAttention) for m in model.modules()) else "vanilla"
    return f"{kind} ({path.name})"


def _beam_hypothesis(model, task, src: Tensor, beam: int) -> Tensor:
    from fairseq.sequence_generator import SequenceGenerator

    gen = SequenceGenerator([model], task.target_dictionary, beam_size=beam, max_len_a=1.2, max_len_b=10)
    sample = {"net_input": {"src_tokens": src[None], "src_lengths": torch.tensor([src.numel()])}}
    with torch.no_grad():
        return gen.forward(sample)[0][0]["tokens"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ea_fairseq.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="the data-bin the model was trained on (dictionaries, test set)")
    ap.add_argument("--path", type=Path, required=True, help="checkpoint to draw (EA or fairseq's transformer)")
    ap.add_argument("--compare", type=Path, help="a second checkpoint (e.g. vanilla) drawn beside the first")
    src_group = ap.add_mutually_exclusive_group(required=True)
    src_group.add_argument("--index", type=int, help="sentence number in --subset of the data-bin")
    src_group.add_argument("--sentence", help="source text as in the data-bin (tokenised, lowercased, BPE'd)")
    ap.add_argument("--subset", default="test", help="split for --index (default: test)")
    ap.add_argument("--target", default="hyp",
                    help="decoder input: 'hyp' (the first model's beam search output, default), 'ref' "
                         "(the reference, with --index) or a target text as in the data-bin")
    ap.add_argument("--beam", type=int, default=5, help="beam size for --target hyp (default: 5)")
    ap.add_argument("--stacks", default=",".join(STACKS),
                    help="which maps, comma-separated from encoder,decoder,cross (default: all)")
    ap.add_argument("--kernels", type=Path, help="also draw the EA convolution kernels into this PNG")
    ap.add_argument("--dpi", type=int, default=80, help="resolution of the PNGs (default: 80)")
    ap.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    bad = [s for s in stacks if s not in STACKS]
    if bad:
        _fail(f"--stacks: unknown {', '.join(bad)} (choose from {', '.join(STACKS)})")
    if not (args.data / "dict.txt").exists() and not any(args.data.glob("dict.*.txt")):
        _fail(f"{args.data}: not a fairseq data-bin (no dict.*.txt)")
    if args.target == "ref" and args.index is None:
        _fail("--target ref needs --index (a sentence of the data-bin with its reference)")

    import ea_fairseq  # noqa: F401  (registers ea_transformer)

    model, _, task = _load(args.path, args.data)
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    ref = None
    if args.index is not None:
        task.load_dataset(args.subset)
        dataset = task.dataset(args.subset)
        if not 0 <= args.index < len(dataset):
            _fail(f"--index {args.index}: the {args.subset} set of {args.data} has {len(dataset)} sentences")
        item = dataset[args.index]
        src, ref = item["source"], item["target"]
    else:
        src = src_dict.encode_line(args.sentence, add_if_not_exist=False, append_eos=True).long()
        unknown = [w for w, i in zip(args.sentence.split(), src.tolist()) if i == src_dict.unk()]
        if unknown:
            print(f"ea_fairseq.plot: warning: --sentence: {len(unknown)} token(s) not in the dictionary, drawn "
                  f"as {src_dict.unk_word}: {' '.join(unknown[:10])} (give the sentence as in the data-bin: "
                  "tokenised, lowercased, BPE'd)", file=sys.stderr)
    if args.target == "hyp":
        tgt = _beam_hypothesis(model, task, src, args.beam)
    elif args.target == "ref":
        tgt = ref
    else:
        tgt = tgt_dict.encode_line(args.target, add_if_not_exist=False, append_eos=True).long()

    runs = [teacher_forced_maps(model, src, tgt, src_dict, tgt_dict, _model_name(model, args.path))]
    models = [(runs[0].name, model)]
    if args.compare is not None:
        other, _, other_task = _load(args.compare, args.data)
        if other_task.source_dictionary.symbols != src_dict.symbols:
            _fail(f"--compare {args.compare}: its dictionary differs from {args.path}'s (another data-bin?)")
        runs.append(teacher_forced_maps(other, src, tgt, src_dict, tgt_dict, _model_name(other, args.compare)))
        models.append((runs[1].name, other))

    title = (f"attention probabilities (0 dark, 1 yellow); rows: queries, columns: keys\n"
             f"source: {' '.join(runs[0].src)}\ntarget ({args.target if args.target in ('hyp', 'ref') else 'given'}): "
             f"{' '.join(runs[0].tgt_out)}")
    draw_maps(runs, args.output, stacks, dpi=args.dpi, title=title)
    print(f"wrote {args.output}: {len(runs)} model(s) x {', '.join(f'{s} {len(runs[0].maps[s])}' for s in stacks if s in runs[0].maps)} "
          f"layers x {runs[0].maps['encoder'][0].size(0)} heads")
    if args.kernels is not None:
        try:
            draw_kernels(models, args.kernels, dpi=args.dpi)
        except ValueError as e:
            _fail(f"--kernels: {e}")
        print(f"wrote {args.kernels}: the EA convolution kernels")


if __name__ == "__main__":
    main()
