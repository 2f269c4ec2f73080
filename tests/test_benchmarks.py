"""The benchmark scripts run (tiny sizes) and report what they measured."""

import json
import sys

import pytest

from conftest import run
from helpers import REPO
from recipe_fixtures import SHARED


def test_cost_benchmark_runs_and_reports(tmp_path):
    out, png = tmp_path / "cost.json", tmp_path / "cost.png"
    cmd = [sys.executable, REPO + "/benchmarks/cost.py", "--data", SHARED / "iwslt14" / "fairseq_bpe10k",
           "--variants", "vanilla,ea:autograd,ea", "--lengths", "1,2", "--max-tokens", "300",
           "--decode-sentences", "2", "--decode-steps", "3", "--repeats", "2", "--threads", "1",
           "--clock", "cpu", "--workdir", tmp_path / "work", "--json", out, "--plot", png]
    table = run(cmd, cwd=tmp_path).stdout
    saved = json.loads(out.read_text())
    # the script restarted itself with glibc's heap kept for reuse (--heap keep, the default)
    assert "threads 1, fp32, cpu clock, heap kept" in saved["header"]
    assert [b["factor"] for b in saved["lengths"]] == [1, 2]
    for block in saved["lengths"]:
        rows = {r["variant"]: r for r in block["results"]}
        assert set(rows) == {"vanilla", "ea:autograd", "ea"}
        for r in rows.values():
            assert len(r["update_ms_all"]) == len(r["decode_ms_all"]) == 2
            assert r["saved_mib"] > 0
        # the memory-saving path keeps fewer bytes than the plain-autograd one
        assert rows["ea"]["saved_mib"] < rows["ea:autograd"]["saved_mib"]
        # EA adds one conv per layer after the first, and nothing else
        assert rows["ea"]["params"] > rows["vanilla"]["params"]
        # time ratios: the median of the per-repeat ratios, inside their middle half
        for key in ("update", "decode"):
            per_repeat = [a / b for a, b in zip(rows["ea"][f"{key}_ms_all"], rows["vanilla"][f"{key}_ms_all"])]
            low, high = rows["ea"][f"{key}_ratio_iqr"]
            assert rows["ea"][f"{key}_ratio"] == pytest.approx(sorted(per_repeat)[0] / 2 + sorted(per_repeat)[1] / 2)
            assert min(per_repeat) <= low <= rows["ea"][f"{key}_ratio"] <= high <= max(per_repeat)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --report prints the same tables from the file
    again = run([sys.executable, REPO + "/benchmarks/cost.py", "--report", out], cwd=tmp_path).stdout
    assert again.strip() in table


def test_decoder_steps_benchmark_runs_and_reports(tmp_path):
    cmd = [sys.executable, REPO + "/benchmarks/decoder_steps.py", "--data", SHARED / "iwslt14" / "fairseq_bpe10k",
           "--variants", "vanilla,ea:autograd,ea+cross", "--lengths", "1,2", "--decode-sentences", "2",
           "--decode-steps", "3", "--repeats", "2", "--threads", "1", "--clock", "cpu", "--workdir", tmp_path / "work"]
    table = run(cmd, cwd=tmp_path).stdout
    assert "threads 1, cpu clock, heap kept; 2 repeats" in table
    assert "length x1: 2 sentences x beam 5 x 3 steps" in table
    assert "length x2: 1 sentences x beam 5 x 6 steps" in table
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["vanilla"], ["ea:autograd"], ["ea+cross"])]
    assert len(rows) == 6
    for name, ms, ratio, *per_repeat in rows:
        assert float(ms) > 0 and len(per_repeat) == 2
        assert float(ratio) == pytest.approx(sum(map(float, per_repeat)) / 2, abs=1e-3)
        if name == "vanilla":
            assert ratio == "1.000"


def test_attention_steps_benchmark_runs_and_reports(tmp_path):
    cmd = [sys.executable, REPO + "/benchmarks/attention_steps.py", "--data", SHARED / "iwslt14" / "fairseq_bpe10k",
           "--variants", "vanilla,ea:autograd,ea+cross", "--lengths", "1,2", "--max-tokens", "100",
           "--repeats", "2", "--threads", "1", "--clock", "cpu", "--workdir", tmp_path / "work"]
    table = run(cmd, cwd=tmp_path).stdout
    assert "threads 1, cpu clock, heap kept; 2 repeats; attention calls interleaved call by call" in table
    # 6 encoder self-attention calls, 6 decoder self- and 6 cross-attention calls
    assert table.count(" 18 attention calls; vanilla's update ") == 2
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["vanilla"], ["ea:autograd"], ["ea+cross"])]
    assert len(rows) == 6
    for name, ms, ratio, implied, *per_repeat in rows:
        assert float(ms) > 0 and len(per_repeat) == 2
        assert float(implied) == pytest.approx(sum(map(float, per_repeat)) / 2, abs=1e-3)
        # the update ratio is diluted by the rest of the update: nearer 1 than the attention's
        assert abs(float(implied) - 1) <= abs(float(ratio) - 1) + 1e-3
        if name == "vanilla":
            assert ratio == implied == "1.000"


def test_attention_steps_replays_a_call_as_the_model_made_it():
    """A recorded attention call, run again, gives the output the model's forward gave."""
    sys.path.insert(0, REPO + "/benchmarks")
    import attention_steps
    import torch
    from helpers import build_model, random_batch

    from ea_fairseq.modules import EvolvingMultiheadAttention

    model = build_model("ea_transformer", ["--ea-cross-attn"])
    batch = random_batch(model.encoder.dictionary, [6, 9, 3], [5, 8, 4])
    outs = []  # what each attention call returned in the recorded forward
    hooks = [m.register_forward_hook(lambda mod, inp, out: outs.append(out[0].detach()))
             for m in model.modules() if isinstance(m, EvolvingMultiheadAttention)]
    calls = attention_steps.record_calls(model, batch, model.decoder.dictionary.pad())
    for h in hooks:
        h.remove()
    assert len(calls) == len(outs) == 9  # 3 layers x (encoder self, decoder self, cross)
    for call, expected in zip(calls, outs):
        module, kwargs, same, prev, qpm, hands_on = call
        kwargs = dict(kwargs, **{name: kwargs["query"] for name in same})
        with torch.no_grad(), module.evolve(prev, qpm):
            got, _ = module(**kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # the last layer of each stack hands its map to no one
    assert [c[-1] for c in calls].count(False) == 3


def test_decoder_steps_benchmark_wants_vanilla_first(tmp_path):
    proc = __import__("subprocess").run(
        [sys.executable, REPO + "/benchmarks/decoder_steps.py", "--variants", "ea,vanilla", "--workdir", tmp_path],
        capture_output=True, text=True)
    assert proc.returncode != 0 and "vanilla first" in proc.stderr


def test_cost_benchmark_rejects_bad_lengths(tmp_path):
    proc = __import__("subprocess").run(
        [sys.executable, REPO + "/benchmarks/cost.py", "--lengths", "0,x", "--workdir", tmp_path],
        capture_output=True, text=True)
    assert proc.returncode != 0 and "--lengths" in proc.stderr


def test_cost_benchmark_cpu_clock_needs_one_thread(tmp_path):
    """The thread's CPU time misses the work of other threads: refused unless there is one."""
    proc = __import__("subprocess").run(
        [sys.executable, REPO + "/benchmarks/cost.py", "--clock", "cpu", "--threads", "2", "--workdir", tmp_path],
        capture_output=True, text=True)
    assert proc.returncode != 0 and "--clock cpu times the calling thread only" in proc.stderr


def test_cost_batches_fairseq_order_and_file_order():
    """--order fairseq: sentences of similar length from the median on (little padding);
    --order file: the first sentences, padded to the longest of them."""
    import torch

    sys.path.insert(0, REPO + "/benchmarks")
    import cost

    data = SHARED / "iwslt14" / "fairseq_bpe10k"
    from fairseq.data import Dictionary

    d = Dictionary()
    for lang in ("de", "en"):
        Dictionary.add_file_to_dictionary(str(data / f"test.{lang}"), d, lambda s: s.split(), 1)
    d.finalize()
    src_lens = sorted(len(line.split()) for line in (data / "test.de").read_text().splitlines())
    batches = {o: cost.make_batch(d, data, 600, 1, torch.device("cpu"), order=o)[0] for o in ("fairseq", "file")}
    real = {o: (b["src_tokens"] != d.pad()).sum(1) - 1 for o, b in batches.items()}  # without </s>
    assert real["fairseq"].min() >= src_lens[len(src_lens) // 2]  # from the median sentence on
    assert real["fairseq"].max() - real["fairseq"].min() <= 2  # similar lengths
    assert real["file"].max() - real["file"].min() > 10  # the file's first lines differ widely
    fill = {o: (b["src_tokens"] != d.pad()).float().mean().item() for o, b in batches.items()}
    assert fill["fairseq"] > 0.9 > fill["file"]
