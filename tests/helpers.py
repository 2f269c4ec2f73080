"""Small builders shared by the tests: a dictionary, models built through fairseq's
own argument parsing, and random batches."""

import os
from argparse import Namespace
from typing import Dict, List, Optional, Sequence

import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_REGISTRY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "ea_fairseq")

# a tiny model: 2+2 layers, 4 heads, d=16
TINY = [
    "--encoder-layers", "3", "--decoder-layers", "3",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--share-all-embeddings",
]
# EA in all three stacks, with a conv that is far from the identity, so that the
# tests exercise the conv path (a Dirac init with a linear activation is a no-op).
EA_ALL = ["--ea-cross-attn", "--ea-conv-init", "kaiming", "--ea-activation", "leaky_relu",
          "--ea-alpha", "0.7", "--ea-beta", "0.4"]


class DummyTask:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = dictionary
        self.target_dictionary = dictionary


def make_dictionary(n_symbols: int = 24) -> Dictionary:
    d = Dictionary()
    for i in range(n_symbols):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    return d


def parse_model_args(arch: str, extra: Sequence[str] = ()) -> Namespace:
    parser = options.get_training_parser()
    argv = ["unused-data-dir", "--task", "translation", "--user-dir", USER_DIR, "--arch", arch,
            "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0", *extra]
    return options.parse_args_and_arch(parser, argv)


def build_model(arch: str = "ea_transformer", extra: Sequence[str] = (), dictionary: Optional[Dictionary] = None,
                seed: int = 0, dtype=torch.float64):
    dictionary = dictionary or make_dictionary()
    args = parse_model_args(arch, list(TINY) + list(extra))
    torch.manual_seed(seed)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, DummyTask(dictionary))
    return model.to(dtype).eval()


def random_batch(dictionary: Dictionary, src_lens: List[int], tgt_lens: List[int], seed: int = 1,
                 left_pad_source: bool = True) -> Dict[str, torch.Tensor]:
    """src_tokens (B, S) left-padded, each ending in EOS; prev_output_tokens (B, T)
    right-padded, starting with EOS; target (B, T)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = dictionary.nspecial, len(dictionary)
    pad, eos = dictionary.pad(), dictionary.eos()
    B, S, T = len(src_lens), max(src_lens), max(tgt_lens)
    src = torch.full((B, S), pad, dtype=torch.long)
    prev = torch.full((B, T), pad, dtype=torch.long)
    tgt = torch.full((B, T), pad, dtype=torch.long)
    for b, (s, t) in enumerate(zip(src_lens, tgt_lens)):
        toks = torch.cat([torch.randint(lo, hi, (s - 1,), generator=g), torch.tensor([eos])])
        if left_pad_source:
            src[b, S - s:] = toks
        else:
            src[b, :s] = toks
        y = torch.cat([torch.randint(lo, hi, (t - 1,), generator=g), torch.tensor([eos])])
        tgt[b, :t] = y
        prev[b, 0] = eos
        prev[b, 1:t] = y[:-1]
    return {
        "src_tokens": src,
        "src_lengths": torch.tensor(src_lens),
        "prev_output_tokens": prev,
        "target": tgt,
    }


def full_logits(model, batch) -> torch.Tensor:
    """Decoder output logits (B, T, V) of one teacher-forced forward pass."""
    out, _ = model(batch["src_tokens"], batch["src_lengths"], batch["prev_output_tokens"])
    return out


def incremental_logits(model, batch, steps: Optional[int] = None) -> torch.Tensor:
    """The same logits, one target position at a time with an incremental state."""
    enc = model.encoder(batch["src_tokens"], src_lengths=batch["src_lengths"])
    prev = batch["prev_output_tokens"]
    state: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
    outs = []
    for t in range(steps or prev.size(1)):
        o, _ = model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
        outs.append(o)
    return torch.cat(outs, dim=1)


def softmax_keeping_float64(x, dim: int, onnx_trace: bool = False):
    """fairseq.utils.softmax always returns float32; for float64 reference runs keep
    float64 (at least float32, as before)."""
    return torch.nn.functional.softmax(x, dim=dim, dtype=torch.promote_types(x.dtype, torch.float32))


def beam_batch_and_order(dictionary: Dictionary, structured: bool, beam: int = 3, n_sent: int = 2, tgt_len: int = 7):
    """A batch laid out as beam search lays it out (``beam`` hypotheses per sentence,
    sharing its source) and a new order for it: beam-structured (each hypothesis picks,
    with repeats, among those of its own sentence, as SequenceGenerator does) or an
    arbitrary permutation. Returns (batch, new_order)."""
    src_lens = [l for l in (5, 8)[:n_sent] for _ in range(beam)]
    batch = random_batch(dictionary, src_lens, [tgt_len] * len(src_lens), seed=3)
    first = [s * beam for s in range(n_sent) for _ in range(beam)]  # hypotheses share their source
    batch["src_tokens"] = batch["src_tokens"][first]
    batch["src_lengths"] = batch["src_lengths"][first]
    g = torch.Generator().manual_seed(0)
    if structured:
        new_order = torch.cat([torch.randint(0, beam, (beam,), generator=g) + s * beam for s in range(n_sent)])
    else:
        new_order = torch.randperm(beam * n_sent, generator=g)
    return batch, new_order


def set_impl(model, impl: str):
    """Switch every EA module of ``model`` to ``impl`` ("eager" or "fused"), as a model built
    with ``--ea-attn-impl impl`` would have it. Returns the model."""
    import dataclasses

    from ea_fairseq.modules import EvolvingMultiheadAttention

    for m in model.modules():
        if isinstance(m, EvolvingMultiheadAttention):
            m.ea = dataclasses.replace(m.ea, impl=impl)
    return model
