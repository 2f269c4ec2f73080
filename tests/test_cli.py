"""End to end through fairseq's own commands: fairseq-preprocess ->
fairseq-train --user-dir ea_fairseq -> fairseq-generate --beam 5 ->
fairseq-interactive, and the hub interface; on a toy task the tiny EA model
really learns (reversing a sequence of letters)."""

import math
import os
import re

import pytest
import torch
from conftest import fairseq_cmd, run
from fairseq import checkpoint_utils
from helpers import REPO

import ea_fairseq
from ea_fairseq.modules import EvolvingMultiheadAttention

INSTALLED_USER_DIR = os.path.dirname(ea_fairseq.__file__)
ARCH = [
    "--arch", "ea_transformer", "--share-all-embeddings",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
]


@pytest.fixture(scope="module")
def trained(reversal_data, tmp_path_factory):
    """Train with `--user-dir ea_fairseq`, relative, from the repository root."""
    _, bin_dir = reversal_data
    save_dir = tmp_path_factory.mktemp("ckpt")
    proc = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", *ARCH,
                "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "5e-3",
                "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100", "--dropout", "0",
                "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                "--max-tokens", "1000", "--max-update", "400", "--cpu", "--seed", "1",
                "--save-dir", save_dir, "--no-epoch-checkpoints", "--validate-interval", "1000",
                "--log-interval", "100"], cwd=REPO)
    return bin_dir, save_dir, proc.stderr + proc.stdout


def _hypotheses(output: str):
    """{sentence id: (score, tokens)} from fairseq-generate / -interactive output."""
    hyps = {}
    for line in output.splitlines():
        m = re.match(r"^H-(\d+)\t(\S+)\t(.*)$", line)
        if m:
            hyps[int(m.group(1))] = (float(m.group(2)), m.group(3))
    return hyps


@pytest.fixture(scope="module")
def generate_output(trained, tmp_path_factory):
    """fairseq-generate in a fresh process, from another directory, with --user-dir
    pointing at the installed package."""
    bin_dir, save_dir, _ = trained
    proc = run([fairseq_cmd("fairseq-generate"), bin_dir, "--user-dir", INSTALLED_USER_DIR,
                "--path", save_dir / "checkpoint_last.pt", "--gen-subset", "test", "--beam", "5",
                "--batch-size", "32", "--cpu"], cwd=tmp_path_factory.mktemp("elsewhere"))
    return proc.stdout + proc.stderr


def test_training_used_evolving_attention(trained):
    _, save_dir, log = trained
    assert "EvolvingMultiheadAttention" in log  # fairseq logs the model it built
    assert "num_updates 400" in log or "num_updates=400" in log
    assert (save_dir / "checkpoint_last.pt").exists()


def test_generate_beam5_learns_reversal(generate_output):
    m = re.search(r"Generate test with beam=5: BLEU4 = ([\d.]+)", generate_output)
    assert m, generate_output[-2000:]
    assert float(m.group(1)) > 90.0
    assert len(_hypotheses(generate_output)) == 200


def test_generate_in_fresh_process_matches_in_process_model(trained, generate_output):
    """The checkpoint read back by fairseq-generate decodes exactly as the model
    does in this process; and that model's outputs really depend on EA."""
    bin_dir, save_dir, _ = trained
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save_dir / "checkpoint_last.pt")], arg_overrides={"data": str(bin_dir)})
    model = models[0].eval()
    n_ea = sum(isinstance(m, EvolvingMultiheadAttention) for m in model.modules())
    assert n_ea == 4  # encoder + decoder self-attention, two layers each

    task.load_dataset("test")
    cfg.generation.beam = 5
    generator = task.build_generator(models, cfg.generation)
    tgt_dict = task.target_dictionary

    def decode():
        """{sentence id: (score in base 2, as fairseq-generate prints it, text)}"""
        out = {}
        batches = task.get_batch_iterator(dataset=task.dataset("test"), max_sentences=32)
        for sample in batches.next_epoch_itr(shuffle=False):
            with torch.no_grad():
                hypos = task.inference_step(generator, models, sample)
            for sid, nbest in zip(sample["id"].tolist(), hypos):
                out[sid] = (nbest[0]["score"].item() / math.log(2), tgt_dict.string(nbest[0]["tokens"]))
        return out

    in_process = decode()
    fresh = _hypotheses(generate_output)
    assert set(in_process) == set(fresh)
    for sid, (score, text) in fresh.items():
        assert in_process[sid][1] == text
        assert abs(in_process[sid][0] - score) < 1e-3  # fairseq prints 4 decimals

    # control: the same weights with evolving attention neutralised decode otherwise
    for m in model.modules():
        if isinstance(m, EvolvingMultiheadAttention):
            m.ea = m.ea.__class__(**{**m.ea.__dict__, "alpha": 0.0, "beta": 0.0})
    plain = decode()
    assert max(abs(plain[s][0] - in_process[s][0]) for s in fresh) > 1e-2


def test_interactive_translates(trained):
    """An empty (or blank) line is not translated: its output is an empty hypothesis,
    with a warning, and every other line keeps its id (its place in the input)."""
    bin_dir, save_dir, _ = trained
    sentences = ["a b c d", "l k j i h", "", "c c a b e f g", "b a", "   ", "k a l e"]
    proc = run([fairseq_cmd("fairseq-interactive"), bin_dir, "--user-dir", INSTALLED_USER_DIR,
                "--path", save_dir / "checkpoint_last.pt", "--source-lang", "src", "--target-lang", "tgt",
                "--beam", "5", "--cpu", "--buffer-size", "4"], input="\n".join(sentences) + "\n")
    hyps = _hypotheses(proc.stdout)
    assert len(hyps) == len(sentences)
    assert hyps[2] == hyps[5] == (0.0, "")
    for n in (3, 6):
        assert f"input line {n} is empty: nothing to translate, its output (id {n - 1}) is an empty hypothesis" \
            in proc.stdout + proc.stderr
    correct = sum(hyps[i][1] == " ".join(reversed(s.split())) for i, s in enumerate(sentences) if s.strip())
    assert correct >= 4, hyps


def test_hub_interface_from_pretrained(trained):
    bin_dir, save_dir, _ = trained
    hub = ea_fairseq.models.EATransformerModel.from_pretrained(
        str(save_dir), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(bin_dir))
    assert any(isinstance(m, EvolvingMultiheadAttention) for m in hub.models[0].modules())
    assert hub.translate("a b c d e f", beam=5) == "f e d c b a"
