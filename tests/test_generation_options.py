"""fairseq's own generation options on this install, for fairseq's transformer and
for ea_transformer: --no-repeat-ngram-size (fairseq's Python fallback of
NGramRepeatBlock, the only path here: the sdist has no C++/CUDA sources for it) and
--print-alignment soft/hard in fairseq-interactive and fairseq-generate.

Before the patches in scripts/fairseq_patches.py (USABILITY_PATCHES), blocking
compared the padded tail of the token buffer and banned nothing, and
fairseq-interactive --print-alignment soft stopped with "too many values to unpack"."""

import math
import re
from typing import List

import pytest
import torch
from conftest import fairseq_cmd, run
from fairseq.ngram_repeat_block import NGramRepeatBlock
from fairseq.sequence_generator import SequenceGenerator
from helpers import TINY, USER_DIR, build_model, make_dictionary

PAD, EOS = 1, 2


def repeated_ngrams(tokens: List[str], n: int) -> List[tuple]:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return sorted({g for g in grams if grams.count(g) > 1})


# ------------------------------------------------------------------- the blocker itself

def _reference_bans(history: List[int], n: int) -> set:
    """Tokens that would repeat an n-gram of `history` (the generated tokens, start
    symbol excluded): t such that history[-(n-1):] + [t] already occurs."""
    if n == 1:
        return set(history)
    tail = history[-(n - 1):] if len(history) >= n - 1 else None
    bans = set()
    if tail is not None:
        for i in range(len(history) - n + 1):
            if history[i:i + n - 1] == tail:
                bans.add(history[i + n - 1])
    return bans


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_blocker_bans_exactly_the_repeating_tokens(n):
    """The whole buffer, padded after `step`, as SequenceGenerator passes it."""
    g = torch.Generator().manual_seed(n)
    bsz, beam, vocab, max_len = 3, 2, 8, 12
    blocker = NGramRepeatBlock(n)
    assert blocker.use_extension is False  # the fallback is what runs on this install
    for step in range(max_len):
        tokens = torch.full((bsz * beam, max_len + 2), PAD, dtype=torch.long)
        tokens[:, 0] = EOS  # the start symbol
        tokens[:, 1:step + 1] = torch.randint(3, 6, (bsz * beam, step), generator=g)  # few symbols: repeats
        lprobs = torch.randn(bsz * beam, vocab, generator=g)
        out = blocker(tokens, lprobs.clone(), bsz, beam, step)
        for row in range(bsz * beam):
            want = _reference_bans(tokens[row, 1:step + 1].tolist(), n)
            got = {t for t in range(vocab) if out[row, t] == -math.inf}
            assert got == want, (n, step, tokens[row, :step + 1].tolist())
            assert EOS not in got


# ------------------------------------------------------------- through SequenceGenerator

@pytest.mark.parametrize("arch,extra", [("transformer", []), ("ea_transformer", ["--ea-cross-attn"])])
def test_sequence_generator_output_has_no_repeated_ngrams(arch, extra):
    """An untrained model forced to 8+ tokens repeats itself; with
    no_repeat_ngram_size=n no hypothesis of the n-best repeats an n-gram."""
    d = make_dictionary(12)
    model = build_model(arch, extra, dictionary=d, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (4, 6), generator=g)
    src[:, -1] = d.eos()
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((4,), 6)}}

    def hypotheses(n):
        gen = SequenceGenerator([model], d, beam_size=3, min_len=8, max_len_a=0, max_len_b=10,
                                no_repeat_ngram_size=n)
        with torch.no_grad():
            out = gen.generate([model], sample)
        return [[d[t] for t in h["tokens"].tolist() if t != d.eos()] for sent in out for h in sent]

    control = hypotheses(0)
    assert any(repeated_ngrams(h, 2) for h in control), control  # the control does repeat
    for n in (1, 2, 3):
        for h in hypotheses(n):
            assert len(h) >= 8 and not repeated_ngrams(h, n), (n, h)


# ------------------------------------------------------------------ the command lines

@pytest.fixture(scope="module")
def checkpoints(reversal_data, tmp_path_factory):
    """fairseq's transformer and ea_transformer, tiny, 3 updates: barely trained,
    so forced to long outputs they repeat themselves."""
    _, bin_dir = reversal_data
    out = {}
    for arch in ("transformer", "ea_transformer"):
        save = tmp_path_factory.mktemp(arch)
        run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", USER_DIR, "--arch", arch, *TINY,
             "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2000", "--max-update", "3", "--cpu",
             "--save-dir", save, "--no-epoch-checkpoints", "--disable-validation", "--log-interval", "1"])
        out[arch] = save / "checkpoint_last.pt"
    return bin_dir, out


@pytest.mark.parametrize("arch", ["transformer", "ea_transformer"])
def test_generate_no_repeat_ngram_size(checkpoints, arch):
    bin_dir, ckpt = checkpoints

    def hyps(n):
        """The hypotheses whose every token is printed: fairseq-generate hides <s>,
        which a barely trained model emits at times (then the printed text has
        fewer words than the P- line has scores, and its n-grams are not the real ones)."""
        proc = run([fairseq_cmd("fairseq-generate"), bin_dir, "--user-dir", USER_DIR, "--path", ckpt[arch],
                    "--gen-subset", "test", "--beam", "3", "--batch-size", "50", "--cpu", "--min-len", "8",
                    "--max-len-a", "0", "--max-len-b", "10", "--no-repeat-ngram-size", str(n)])
        words = {m.group(1): m.group(2).split() for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", proc.stdout, re.M)}
        scores = {m.group(1): m.group(2).split() for m in re.finditer(r"^P-(\d+)\t(.*)$", proc.stdout, re.M)}
        assert len(words) == len(scores) == 200
        full = [w for i, w in words.items() if len(scores[i]) == len(w) + 1]
        return list(words.values()), full

    _, control = hyps(0)
    assert sum(bool(repeated_ngrams(h, 2)) for h in control) > 100  # "is is is"
    # n=1: no token twice, so no printed word twice either, hidden symbols or not
    printed, _ = hyps(1)
    assert [h for h in printed if repeated_ngrams(h, 1)] == []
    # n=2: checked where every token is printed
    _, full = hyps(2)
    assert len(full) >= 20
    assert [h for h in full if repeated_ngrams(h, 2)] == []


def _alignment_lines(stdout: str):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^A-(\d+)\t(.*)$", stdout, re.M)}


@pytest.mark.parametrize("arch", ["transformer", "ea_transformer"])
def test_interactive_print_alignment(checkpoints, arch):
    bin_dir, ckpt = checkpoints
    sentences = ["a b c d", "l k j i h g"]
    common = [fairseq_cmd("fairseq-interactive"), bin_dir, "--user-dir", USER_DIR, "--path", ckpt[arch],
              "--source-lang", "src", "--target-lang", "tgt", "--beam", "2", "--cpu", "--max-len-a", "0",
              "--max-len-b", "5"]
    soft = run([*common, "--print-alignment", "soft"], input="\n".join(sentences) + "\n").stdout
    hyps = {int(m.group(1)): m.group(2).split() for m in re.finditer(r"^H-(\d+)\t\S+\t(.*)$", soft, re.M)}
    align = _alignment_lines(soft)
    assert set(align) == {0, 1}
    for i, s in enumerate(sentences):
        rows = [[float(p) for p in row.split(",")] for row in align[i].split(" ")]
        assert len(rows) == len(hyps[i]) + 1  # target tokens + EOS
        for row in rows:
            assert len(row) == len(s.split()) + 1  # source tokens + EOS
            assert abs(sum(row) - 1) < 1e-4  # attention probabilities over the source
    hard = _alignment_lines(run([*common, "--print-alignment", "hard"], input="\n".join(sentences) + "\n").stdout)
    for i, s in enumerate(sentences):
        for pair in hard[i].split():
            src, tgt = map(int, pair.split("-"))
            assert 0 <= src < len(s.split())


def test_generate_print_alignment_soft(checkpoints, arch="ea_transformer"):
    bin_dir, ckpt = checkpoints
    proc = run([fairseq_cmd("fairseq-generate"), bin_dir, "--user-dir", USER_DIR, "--path", ckpt[arch],
                "--gen-subset", "valid", "--beam", "2", "--batch-size", "50", "--cpu", "--max-len-a", "0",
                "--max-len-b", "5", "--print-alignment", "soft"])
    align = _alignment_lines(proc.stdout)
    assert len(align) == 200
    for row in align[0].split(" "):
        assert abs(sum(map(float, row.split(","))) - 1) < 1e-4


@pytest.mark.parametrize("extra", [[], ["--ea-cross-attn"]])
def test_ea_decoder_returns_attention_as_fairseq_expects(extra):
    """What SequenceGeneratorWithAlignment reads: decoder_out[1]["attn"][0] of shape
    (B, T, S), rows summing to 1 over the non-padded source, in both the EA model
    and fairseq's own (same shape)."""
    d = make_dictionary()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (2, 5), generator=g)
    src[0, :2] = d.pad()  # left padding
    src[:, -1] = d.eos()
    prev = torch.randint(d.nspecial, len(d), (2, 4), generator=g)
    prev[:, 0] = d.eos()
    lengths = torch.tensor([3, 5])
    shapes = []
    for arch, ex in (("ea_transformer", extra), ("transformer", [])):
        model = build_model(arch, ex, dictionary=d)
        attn = model(src, lengths, prev)[1]["attn"][0]
        assert attn.shape == (2, 4, 5)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4, dtype=attn.dtype))
        assert torch.all(attn[0, :, :2] == 0)  # no weight on padding
        shapes.append(attn.shape)
    assert shapes[0] == shapes[1]
