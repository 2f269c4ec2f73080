"""Half precision through fairseq's own machinery on the CPU: fairseq-train --fp16, and
fairseq's FP16Optimizer (fp16 and bf16) stepping an EA model. The attention paths in half
precision are compared in test_attention_impls.py."""

import pytest
import torch
from helpers import EA_ALL, build_model, full_logits, random_batch


@pytest.mark.parametrize("flag", ["--fp16", "--bf16"])
def test_fairseq_train_half_precision_on_the_cpu(reversal_data, tmp_path, flag):
    """fairseq's own half-precision machinery (model.half() / bfloat16(), FP16Optimizer,
    with loss scaling in fp16) on an EA model. On a CPU fairseq needs
    --fp16-no-flatten-grads (its flattened fp32 copy is made on CUDA; without the flag
    fairseq-train stops with a message saying so, see test_bad_input_sweep.py)."""
    import re

    from conftest import fairseq_cmd, run
    from helpers import USER_DIR

    _, bin_dir = reversal_data
    log = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", USER_DIR, "--arch", "ea_transformer",
               "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16",
               "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
               "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--ea-cross-attn",
               "--optimizer", "adam", "--lr", "2e-3", "--max-tokens", "600", "--max-update", "40", "--cpu",
               flag, "--fp16-no-flatten-grads", "--save-dir", tmp_path, "--log-format", "simple",
               "--log-interval", "10", "--seed", "1"], timeout=600).stdout
    losses = [float(x) for x in re.findall(r"train_inner \| .* loss=([\d.]+)", log)]
    assert len(losses) >= 2 and losses[-1] < losses[0], log[-2000:]
    inner = [line for line in log.splitlines() if "train_inner |" in line]
    assert all(("loss_scale=" in line) == (flag == "--fp16") for line in inner)  # bfloat16 needs no scaling
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
