"""Masks (fully masked rows, float attn_mask), beam-shared cross-attention keys and
values under any reorder, and half precision on the CPU."""

import pytest
import torch
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.sequence_generator import SequenceGenerator
import fairseq.modules.multihead_attention
from helpers import EA_ALL, beam_batch_and_order, build_model, full_logits, incremental_logits, random_batch, softmax_keeping_float64

from ea_fairseq.modules import EASpec, EvolvingMultiheadAttention

SPEC = dict(alpha=0.6, beta=0.5, kernel_size=3, activation="leaky_relu", init="kaiming")


def _module(has_conv, causal=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = EvolvingMultiheadAttention(16, 4, ea=EASpec(causal=causal, has_conv=has_conv, **SPEC), self_attention=True)
    return m.to(dtype)


@pytest.mark.parametrize("impl", ["fused", "autograd"])
@pytest.mark.parametrize("has_conv", [False, True])
def test_fully_masked_rows_give_zero_probabilities_and_finite_maps(impl, has_conv):
    T, B = 5, 2
    x = torch.randn(T, B, 16, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(B, 4, T, T, dtype=torch.float64) if has_conv else None
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[1] = True  # query row 1 may attend to no key
    mod = _module(has_conv)
    mod.impl = impl
    with mod.evolve(prev) as link:
        out, w = mod(x, x, x, attn_mask=mask, need_weights=True, need_head_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(link.out).all()
    assert torch.equal(w[:, :, 1], torch.zeros_like(w[:, :, 1]))
    torch.testing.assert_close(w[:, :, [0, 2, 3, 4]].sum(-1), torch.ones(4, B, 4, dtype=torch.float64))
    (out.sum() + link.out.sum()).backward()
    assert torch.isfinite(x.grad).all()
    # without weights (the fused path in training) the output row is the projection bias alone
    with mod.evolve(prev) as link:
        out2, _ = mod(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(out2[1], mod.out_proj.bias.expand(B, 16), rtol=0, atol=1e-12)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-12)


def test_left_padded_targets_give_no_nan_and_match_the_unpadded_sentence():
    model = build_model("ea_transformer", EA_ALL).train()
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 4], [3, 3], seed=2)
    prev = batch["prev_output_tokens"]
    padded = torch.cat([torch.full((2, 3), d.pad()), prev], dim=1)  # left-padded targets
    enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
    out, _ = model.decoder(padded, encoder_out=enc)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_float_attn_mask_is_added_to_the_logits_as_fairseq_does(monkeypatch):
    """With alpha = beta = 0 (no conv, no link) the module is fairseq's attention: a
    non-binary float mask gives the same outputs as fairseq's explicit path."""
    # fairseq's explicit path takes its softmax in float32 even for float64 input
    monkeypatch.setattr(fairseq.modules.multihead_attention.utils, "softmax", softmax_keeping_float64)
    torch.manual_seed(0)
    spec = EASpec(alpha=0.0, beta=0.0, kernel_size=3, causal=False, activation="linear", init="dirac", has_conv=False)
    ea = EvolvingMultiheadAttention(16, 4, ea=spec, self_attention=True).double()
    ref = MultiheadAttention(16, 4, self_attention=True).double()
    ref.load_state_dict(ea.state_dict())
    ref.skip_embed_dim_check = True  # fairseq's explicit path, which adds the float mask
    T, B = 6, 3
    x = torch.randn(T, B, 16, dtype=torch.float64)
    bias = torch.randn(T, T, dtype=torch.float64)
    bias[0, 2] = float("-inf")
    kpm = torch.zeros(B, T, dtype=torch.bool)
    kpm[1, :2] = True
    want, want_w = ref(x, x, x, key_padding_mask=kpm, attn_mask=bias, need_weights=True)
    for impl in ("fused", "autograd"):
        ea.impl = impl
        with torch.no_grad(), ea.evolve(None):
            got, got_w = ea(x, x, x, key_padding_mask=kpm, attn_mask=bias, need_weights=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_w.double(), want_w.double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("structured", [True, False])
def test_beam_shared_cross_keys_stay_exact_under_any_reorder(structured):
    model = build_model("ea_transformer", EA_ALL)
    d = model.encoder.dictionary
    beam, n_sent, T, t0 = 3, 2, 7, 3
    batch, new_order = beam_batch_and_order(d, structured, beam, n_sent, T)
    model.decoder.set_beam_size(beam)
    cross = [layer.encoder_attn for layer in model.decoder.layers]
    with torch.no_grad():
        enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
        state = {}
        for t in range(t0):
            model.decoder(batch["prev_output_tokens"][:, : t + 1], encoder_out=enc, incremental_state=state)
        kv = cross[0]._get_input_buffer(state)
        assert kv["shared_key"].size(0) == n_sent  # computed once per sentence
        model.decoder.reorder_incremental_state_scripting(state, new_order)
        enc = model.encoder.reorder_encoder_out(enc, new_order)
        kv = cross[0]._get_input_buffer(state)
        assert ("shared_key" in kv) == structured
        prev = batch["prev_output_tokens"][new_order]
        outs = [model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0]
                for t in range(t0, T)]
        expected = full_logits(model, {k: v[new_order] for k, v in batch.items()})[:, t0:]
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=0, atol=1e-9)


def test_beam_search_with_shared_cross_keys_equals_the_plain_path(monkeypatch):
    """SequenceGenerator finds the model's set_beam_size, so the fused path keeps the
    encoder keys once per sentence during real beam search; the hypotheses and scores are
    those of the plain per-hypothesis path."""
    model = build_model("ea_transformer", EA_ALL, dtype=torch.float32)
    d = model.encoder.dictionary
    n_sent, beam = 4, 4
    batch = random_batch(d, [6, 9, 3, 7], [2] * n_sent, seed=9)
    sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
    rows_seen = []
    original = EvolvingMultiheadAttention.reorder_incremental_state

    def spy(self, incremental_state, new_order):
        buf = self._get_input_buffer(incremental_state)
        if self.encoder_decoder_attention and "shared_key" in buf:
            rows_seen.append(buf["shared_key"].size(0))
        return original(self, incremental_state, new_order)

    monkeypatch.setattr(EvolvingMultiheadAttention, "reorder_incremental_state", spy)
    results = {}
    for impl in ("fused", "autograd"):
        for m in model.modules():
            if isinstance(m, EvolvingMultiheadAttention):
                m.impl = impl
        with torch.no_grad():
            hyps = SequenceGenerator([model], d, beam_size=beam, max_len_b=10).generate([model], sample)
        results[impl] = [(h["tokens"].tolist(), round(float(h["score"]), 4)) for nbest in hyps for h in nbest]
        if impl == "fused":
            assert all(m.beam_size == beam for m in model.decoder.modules() if isinstance(m, EvolvingMultiheadAttention))
            assert rows_seen and max(rows_seen) == n_sent  # once per sentence, fewer as sentences finish
            rows_seen.clear()
    assert not rows_seen  # the plain path keeps one copy per hypothesis
    assert results["fused"] == results["autograd"]


def test_cross_keys_are_shared_only_when_the_rows_are_copies():
    """With beam_size set, a batch of distinct sentences (not beam-laid-out) keeps its keys
    per row and stays exact; a beam-laid-out one shares them, and the usual beam step (every
    sentence stays in place) reuses them without a copy."""
    model = build_model("ea_transformer", EA_ALL)
    d = model.encoder.dictionary
    beam = 3
    model.set_beam_size(beam)
    distinct = random_batch(d, [5, 8, 4, 6, 7, 3], [6] * 6, seed=4)
    laid_out, _ = beam_batch_and_order(d, True, beam, 2, 6)
    cross = model.decoder.layers[0].encoder_attn
    for batch, shared in ((distinct, False), (laid_out, True)):
        with torch.no_grad():
            enc = model.encoder(batch["src_tokens"], batch["src_lengths"])
            state = {}
            outs = [model.decoder(batch["prev_output_tokens"][:, : t + 1], encoder_out=enc, incremental_state=state)[0]
                    for t in range(3)]
            kv = cross._get_input_buffer(state)
            assert ("shared_key" in kv) == shared and ("prev_key" in kv) == (not shared)
            if shared:
                before = kv["shared_key"]
                model.decoder.reorder_incremental_state_scripting(state, torch.arange(6))
                assert cross._get_input_buffer(state)["shared_key"] is before
            outs += [model.decoder(batch["prev_output_tokens"][:, : t + 1], encoder_out=enc, incremental_state=state)[0]
                     for t in range(3, 6)]
            expected = full_logits(model, batch)
        torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=0, atol=1e-9)


# half precision on the CPU: tolerances against float32 of the same weights
TOL = {torch.bfloat16: 0.1, torch.float16: 0.02}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_matches_float32(dtype):
    ref = build_model("ea_transformer", EA_ALL, dtype=torch.float32).train()
    half = build_model("ea_transformer", EA_ALL, dtype=torch.float32).to(dtype).train()
    half.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    d = ref.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])  # padded on both sides
    keep = batch["prev_output_tokens"].ne(d.pad())
    out_ref, out_half = full_logits(ref, batch), full_logits(half, batch)
    assert torch.isfinite(out_half).all()
    torch.testing.assert_close(out_half.float()[keep], out_ref[keep], rtol=0, atol=TOL[dtype] * out_ref.abs().max().item())
    out_half.float()[keep].pow(2).mean().backward()
    out_ref[keep].pow(2).mean().backward()
    for (n, p), q in zip(half.named_parameters(), ref.parameters()):
        assert torch.isfinite(p.grad).all(), n
    # incremental decoding and beam search in half precision
    half.eval()
    with torch.no_grad():
        full, inc = full_logits(half, batch), incremental_logits(half, batch)
        assert torch.isfinite(inc[keep]).all()
        torch.testing.assert_close(inc[keep].float(), full[keep].float(), rtol=0, atol=TOL[dtype] * full.abs().max().item())
        sample = {"net_input": {"src_tokens": batch["src_tokens"], "src_lengths": batch["src_lengths"]}}
        hyps = SequenceGenerator([half], d, beam_size=3, max_len_b=8).generate([half], sample)
    assert all(torch.isfinite(h["positional_scores"]).all() for nbest in hyps for h in nbest)


def test_fairseq_train_fp16_on_the_cpu(reversal_data, tmp_path):
    """fairseq's own fp16 machinery (model.half(), FP16Optimizer with loss scaling) on an
    EA model. On a CPU fairseq needs --fp16-no-flatten-grads (its flattened fp32 copy is
    made on CUDA); --bf16 with --cpu takes fairseq's TPU path and cannot run here, so
    bfloat16 is tested through the optimizer wrapper below."""
    import re

    from conftest import fairseq_cmd, run
    from helpers import USER_DIR

    _, bin_dir = reversal_data
    log = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", USER_DIR, "--arch", "ea_transformer",
               "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16",
               "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
               "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--ea-cross-attn",
               "--optimizer", "adam", "--lr", "2e-3", "--max-tokens", "600", "--max-update", "40", "--cpu",
               "--fp16", "--fp16-no-flatten-grads", "--save-dir", tmp_path, "--log-format", "simple",
               "--log-interval", "10", "--seed", "1"], timeout=600).stdout
    losses = [float(x) for x in re.findall(r"train_inner \| .* loss=([\d.]+)", log)]
    assert len(losses) >= 2 and losses[-1] < losses[0], log[-2000:]
    assert "loss_scale" in log
    ckpt = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    # "_float_tensor" is fairseq's dtype/device marker in SinusoidalPositionalEmbedding, made with
    # torch.FloatTensor(1) and never initialised: its one value is whatever the memory held.
    weights = {k: v for k, v in ckpt["model"].items() if v.is_floating_point() and not k.endswith("._float_tensor")}
    assert weights and all(torch.isfinite(v.float()).all() for v in weights.values()), \
        [k for k, v in weights.items() if not torch.isfinite(v.float()).all()]


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_fairseq_half_precision_optimizer_wrapper_steps_an_ea_model(flag):
    from fairseq.optim.fp16_optimizer import FP16Optimizer
    from omegaconf import OmegaConf

    dtype = torch.float16 if flag == "fp16" else torch.bfloat16
    model = build_model("ea_transformer", EA_ALL, dtype=torch.float32).to(dtype).train()
    cfg = OmegaConf.create({
        "common": {"fp16": flag == "fp16", "bf16": flag == "bf16", "memory_efficient_bf16": False,
                   "memory_efficient_fp16": False, "fp16_no_flatten_grads": True, "fp16_init_scale": 128,
                   "fp16_scale_window": None, "fp16_scale_tolerance": 0.0, "threshold_loss_scale": None,
                   "min_loss_scale": 1e-4, "tpu": False, "model_parallel_size": 1},
        "distributed_training": {"distributed_world_size": 1},
        "optimization": {"update_freq": [1], "lr": [1e-2]},
        "optimizer": {"_name": "adam", "lr": [1e-2], "adam_betas": "(0.9, 0.98)", "adam_eps": 1e-8,
                      "weight_decay": 0.0},
    })
    params = [p for p in model.parameters() if p.requires_grad]
    opt = FP16Optimizer.build_optimizer(cfg, params)
    d = model.encoder.dictionary
    batch = random_batch(d, [6, 9, 3, 7], [5, 8, 2, 6])
    keep = batch["prev_output_tokens"].ne(d.pad())
    losses = []
    for _ in range(5):
        lprobs = model.get_normalized_probs((full_logits(model, batch), None), log_probs=True)
        loss = -lprobs.float().gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1)[keep].mean()
        opt.zero_grad()
        opt.backward(loss)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())
    assert losses[-1] < losses[0], losses
