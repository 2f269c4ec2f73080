"""python -m ea_fairseq.plot: the picture is made, with the expected grid, and it
shows the attention the model really uses."""

import subprocess
import sys

import matplotlib.image
import pytest
import torch
from conftest import fairseq_cmd, run
from helpers import REPO

from ea_fairseq import plot

DIMS = [
    "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "3",
    "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
    "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]


@pytest.fixture(scope="module")
def checkpoints(reversal_data, tmp_path_factory):
    """A tiny EA model (EA in all three stacks) and a vanilla one, a few updates each."""
    _, bin_dir = reversal_data
    out = {}
    for name, arch in (("ea", ["--arch", "ea_transformer", "--ea-cross-attn"]), ("vanilla", ["--arch", "transformer"])):
        save = tmp_path_factory.mktemp(name)
        run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", *arch, *DIMS,
             "--optimizer", "adam", "--lr", "3e-3", "--criterion", "cross_entropy", "--max-tokens", "2000",
             "--max-update", "30", "--cpu", "--seed", "1", "--no-epoch-checkpoints", "--disable-validation",
             "--save-dir", save], cwd=REPO)
        out[name] = save / "checkpoint_last.pt"
    return bin_dir, out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ea_fairseq.plot", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_cli_draws_both_models_side_by_side_and_the_kernels(checkpoints, tmp_path):
    bin_dir, ckpt = checkpoints
    out, kernels = tmp_path / "maps.png", tmp_path / "kernels.png"
    proc = _cli(bin_dir, "--path", ckpt["ea"], "--compare", ckpt["vanilla"], "--index", 3,
                "--kernels", kernels, "-o", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}: 2 model(s) x encoder 2, decoder 3, cross 3 layers x 4 heads" in proc.stdout
    for png in (out, kernels):
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
        assert img.std() > 0.05  # not a blank picture
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_cli_errors_name_the_problem(checkpoints, tmp_path):
    bin_dir, ckpt = checkpoints
    proc = _cli(bin_dir, "--path", ckpt["ea"], "--index", 100000, "-o", tmp_path / "x.png")
    assert proc.returncode == 2 and "--index 100000: the test set" in proc.stderr and "has 200 sentences" in proc.stderr
    proc = _cli(bin_dir, "--path", tmp_path / "missing.pt", "--index", 0, "-o", tmp_path / "x.png")
    assert proc.returncode == 2 and "missing.pt: no such checkpoint" in proc.stderr
    proc = _cli(bin_dir, "--path", ckpt["vanilla"], "--index", 0, "--kernels", tmp_path / "k.png",
                "-o", tmp_path / "x.png")
    assert proc.returncode == 2 and "no evolving-attention convolutions" in proc.stderr
    assert not (tmp_path / "k.png").exists()
    proc = _cli(bin_dir, "--path", ckpt["ea"], "--sentence", "a b zzz c", "--target", "c b a",
                "--stacks", "encoder", "-o", tmp_path / "s.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 token(s) not in the dictionary, drawn as <unk>: zzz" in proc.stderr
    assert "wrote" in proc.stdout and "encoder 2 layers x 4 heads" in proc.stdout


def _load(path, bin_dir):
    return plot._load(path, bin_dir)


@pytest.mark.parametrize("which", ["ea", "vanilla"])
def test_maps_are_the_models_attention(checkpoints, tmp_path, which):
    bin_dir, ckpt = checkpoints
    model, _, task = _load(ckpt[which], bin_dir)
    d = task.source_dictionary
    src = d.encode_line("a b c d e f g", add_if_not_exist=False).long()
    tgt = d.encode_line("g f e d c b a", add_if_not_exist=False).long()
    seen = {}  # (stack, layer) -> (value input (Tk, 1, C), attention output (Tq, 1, C))
    handles = []
    for stack, modules in plot.attention_modules(model).items():
        for idx, module in enumerate(modules):
            def keep(mod, args, kwargs, output, key=(stack, idx)):
                seen[key] = (kwargs["value"], output[0])
            handles.append(module.register_forward_hook(keep, with_kwargs=True))
    maps = plot.teacher_forced_maps(model, src, tgt, d, d, which)
    for h in handles:
        h.remove()
    S, T = src.numel(), tgt.numel()

    # the maps are the ones the model computes with: each module's output is
    # out_proj(P_h V_h) with the drawn P (dropout is off in eval)
    for (stack, idx), (value, out) in seen.items():
        module = plot.attention_modules(model)[stack][idx]
        P = maps.maps[stack][idx]  # (H, Tq, Tk)
        H, tk = P.size(0), P.size(2)
        with torch.no_grad():
            v = module.v_proj(value[:, 0]).view(tk, H, -1).transpose(0, 1)  # (H, Tk, D)
            mixed = torch.bmm(P, v).transpose(0, 1).reshape(P.size(1), -1)  # (Tq, C)
            torch.testing.assert_close(module.out_proj(mixed), out[:, 0], rtol=0, atol=1e-5)
    assert len(seen) == 2 + 3 + 3

    assert [len(maps.maps[s]) for s in plot.STACKS] == [2, 3, 3]
    for stack, (tq, tk) in (("encoder", (S, S)), ("decoder", (T, T)), ("cross", (T, S))):
        for m in maps.maps[stack]:
            assert m.shape == (4, tq, tk)
            # probabilities: every row sums to 1
            torch.testing.assert_close(m.sum(-1), torch.ones(4, tq), rtol=0, atol=1e-5)
            assert (m >= 0).all()
    for m in maps.maps["decoder"]:
        # causal: no weight on future positions
        assert torch.equal(m.triu(diagonal=1), torch.zeros_like(m))
        assert (m[:, torch.ones(T, T).tril().bool()] > 0).all()  # ... and some on every past one

    # the decoder's own alignment output (its last cross-attention layer, averaged
    # over heads) is the mean of the drawn maps ...
    torch.testing.assert_close(maps.extra["attn"][0][0], maps.maps["cross"][-1].mean(0), rtol=0, atol=1e-6)
    # ... and the forward pass itself is unchanged by the capture
    prev = torch.cat([tgt.new_tensor([d.eos()]), tgt[:-1]])
    with torch.no_grad():
        plain = model(src[None], torch.tensor([S]), prev[None])[0][0]
    torch.testing.assert_close(maps.logits, plain, rtol=0, atol=1e-5)

    # ... and the picture shows exactly these maps
    fig, panels = plot.draw_maps([maps], tmp_path / "m.png")
    assert len(panels) == (2 + 3 + 3) * 4
    for (ri, stack, layer, head), ax in panels.items():
        shown = torch.as_tensor(ax.images[0].get_array())
        torch.testing.assert_close(shown.float(), maps.maps[stack][layer][head], rtol=0, atol=0)
    ax = panels[(0, "cross", 2, 0)]
    assert [t.get_text() for t in ax.get_xticklabels()] == maps.src
    assert [t.get_text() for t in ax.get_yticklabels()] == maps.tgt_out


def test_capture_restores_fairseqs_fast_path(checkpoints):
    bin_dir, ckpt = checkpoints
    model, _, task = _load(ckpt["vanilla"], bin_dir)
    mods = [m for ms in plot.attention_modules(model).values() for m in ms]
    assert not any(m.skip_embed_dim_check for m in mods)
    with plot.capture_attention(model):
        assert all(m.skip_embed_dim_check for m in mods)
    assert not any(m.skip_embed_dim_check for m in mods)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in mods)
