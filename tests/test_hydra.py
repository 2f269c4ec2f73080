"""fairseq-hydra-train honours every EA option, and builds the model that the same
settings build as fairseq-train flags.

One tiny run (d=16, 2+2 layers, 3 updates on the toy reversal task) through the real
`fairseq-hydra-train` with the shipped Multi30k config and a non-default value of every
EA option; the model it built is read back from its log (one line per attention
stack: each layer's EASpec, the conv weights' shapes) and from its checkpoint, and
compared with the model that `fairseq-train` flags build. One `fairseq-train` run with
flags (every stack on, the eager path) checks the other way round through a checkpoint.
Every shipped config is compared, key by key, with the --arch preset it mirrors."""

import os
import re
import subprocess
from typing import List

import pytest
import torch
from conftest import fairseq_cmd, run
from fairseq import checkpoint_utils, models, options, tasks
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from helpers import REPO, DummyTask, make_dictionary, parse_model_args
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import ea_fairseq
from ea_fairseq.config import CONFIG_DIR, CONFIG_NAMES
from ea_fairseq.models import EATransformerModel
from ea_fairseq.models.ea_config import EATransformerConfig
from ea_fairseq.models.ea_transformer import describe_ea
from ea_fairseq.modules.evolving_attention import EvolvingMultiheadAttention

SIZES = {"layers": 2, "embed_dim": 16, "ffn_embed_dim": 32, "attention_heads": 2}
# every EA option at a value other than its default
EA_HYDRA = {
    "ea_alpha": "0.3", "ea_beta": "0.7", "ea_kernel_size": "5", "ea_activation": "tanh",
    "ea_conv_init": "kaiming", "ea_no_encoder_self_attn": "true", "ea_no_decoder_self_attn": "true",
    "ea_cross_attn": "true", "ea_attn_impl": "eager",
}
EA_FLAGS = ["--ea-alpha", "0.3", "--ea-beta", "0.7", "--ea-kernel-size", "5", "--ea-activation", "tanh",
            "--ea-conv-init", "kaiming", "--ea-no-encoder-self-attn", "--ea-no-decoder-self-attn",
            "--ea-cross-attn", "--ea-attn-impl", "eager"]
# the Multi30k config's model (scripts/train.sh multi30k) at the tiny sizes, as flags
RECIPE_FLAGS = ["--arch", "ea_transformer", "--share-all-embeddings", "--dropout", "0.2"]
for _side in ("encoder", "decoder"):
    for _key, _value in SIZES.items():
        RECIPE_FLAGS += [f"--{_side}-{_key.replace('_', '-')}", str(_value)]


def _hydra_train(bin_dir, save_dir, *overrides: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [fairseq_cmd("fairseq-hydra-train"), "--config-dir", CONFIG_DIR, "--config-name", "multi30k",
         f"task.data={bin_dir}", f"checkpoint.save_dir={save_dir}", "optimization.max_update=3",
         "dataset.max_tokens=1000", "common.log_interval=1",
         *[f"model.{side}.{k}={v}" for side in ("encoder", "decoder") for k, v in SIZES.items()],
         *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=600)


def _ea_log_lines(log: str) -> List[str]:
    """The "evolving attention, <stack>: ..." lines a build logs (see describe_ea)."""
    return re.findall(r"evolving attention, (.*)$", log, re.M)


def _specs(model):
    return model.encoder.ea_specs, model.decoder.ea_self_specs, model.decoder.ea_cross_specs


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build_from_flags(bin_dir, flags):
    """The model fairseq-train builds from these flags (its own parse and config path)."""
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(bin_dir), "--user-dir", "ea_fairseq", *flags])
    cfg = convert_namespace_to_omegaconf(args)
    add_defaults(cfg)
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model)


@pytest.fixture(scope="module")
def hydra_run(reversal_data, tmp_path_factory):
    """fairseq-hydra-train, run as a user types it from another folder, with a
    non-default value of every EA option. Returns (save_dir, log)."""
    _, bin_dir = reversal_data
    save_dir = tmp_path_factory.mktemp("hydra_ckpt")
    proc = _hydra_train(bin_dir, save_dir, *[f"model.{k}={v}" for k, v in EA_HYDRA.items()],
                        cwd=tmp_path_factory.mktemp("elsewhere"))
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    return save_dir, proc.stdout + proc.stderr


def test_hydra_train_builds_every_ea_option(hydra_run):
    save_dir, log = hydra_run
    assert "num_updates: 3 >= max_update: 3" in log
    assert _ea_log_lines(log) == [
        "encoder self-attention: plain attention (--ea-no-encoder-self-attn)",
        "decoder self-attention: plain attention (--ea-no-decoder-self-attn)",
        "cross-attention: evolving in layers 1-2 of 2 (alpha=0.3 beta=0.7 causal=True activation=tanh "
        "init=kaiming impl=eager); conv weight (2, 2, 5, 5) in layers 2",
    ]
    # init: kaiming, not an identity (a Dirac kernel has one 1 per head at the centre)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))
    conv = state["model"]["decoder.layers.1.encoder_attn.ea_conv.conv.weight"]
    dirac = torch.zeros_like(conv)
    torch.nn.init.dirac_(dirac)
    assert conv.shape == (2, 2, 5, 5) and (conv - dirac).abs().max() > 0.05
    assert not any(".self_attn.ea_conv." in k for k in state["model"])  # both self-attention stacks plain
    # the config that was saved names every option at its value
    saved = state["cfg"]["model"]
    assert {k: str(saved[k]).lower() for k in EA_HYDRA} == EA_HYDRA


def test_the_same_settings_as_flags_build_the_same_model(hydra_run, reversal_data):
    save_dir, log = hydra_run
    _, bin_dir = reversal_data
    flags_model = _build_from_flags(bin_dir, RECIPE_FLAGS + EA_FLAGS)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(save_dir / "checkpoint_last.pt")])
    hydra_model = models[0]
    assert describe_ea(flags_model) == describe_ea(hydra_model) == _ea_log_lines(log)
    assert _specs(flags_model) == _specs(hydra_model)
    assert _shapes(flags_model) == _shapes(hydra_model)
    module_specs = [[m.ea for m in model.modules() if isinstance(m, EvolvingMultiheadAttention)]
                    for model in (flags_model, hydra_model)]
    assert len(module_specs[1]) == 2 and module_specs[0] == module_specs[1]


def test_hydra_checkpoint_loads_through_the_hub(hydra_run, reversal_data):
    save_dir, log = hydra_run
    _, bin_dir = reversal_data
    hub = EATransformerModel.from_pretrained(str(save_dir), checkpoint_file="checkpoint_last.pt",
                                             data_name_or_path=str(bin_dir))
    assert describe_ea(hub.models[0]) == _ea_log_lines(log)
    assert isinstance(hub.translate("a b c", beam=2, max_len_b=5), str)


def test_flags_checkpoint_round_trips_every_option(reversal_data, tmp_path):
    """fairseq-train with flags and an architecture preset (all three stacks on, the
    eager path), then the checkpoint through fairseq's loader (what fairseq-generate uses)."""
    _, bin_dir = reversal_data
    flags = ["--arch", "ea_transformer_iwslt_de_en"] + RECIPE_FLAGS[2:] + ["--ea-alpha", "0.3", "--ea-beta", "0.7", "--ea-kernel-size", "5",
                            "--ea-activation", "gelu", "--ea-conv-init", "kaiming", "--ea-cross-attn",
                            "--ea-attn-impl", "eager"]
    proc = run([fairseq_cmd("fairseq-train"), bin_dir, "--user-dir", "ea_fairseq", *flags,
                "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1000", "--max-update", "2", "--cpu",
                "--save-dir", tmp_path, "--no-epoch-checkpoints"], cwd=REPO)
    log = proc.stdout + proc.stderr
    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "checkpoint_last.pt")])
    assert cfg.model.ea_attn_impl == "eager"
    specs = [m.ea for m in models[0].modules() if isinstance(m, EvolvingMultiheadAttention)]
    assert len(specs) == 6 and {s.impl for s in specs} == {"eager"}
    assert describe_ea(models[0]) == _ea_log_lines(log) == describe_ea(_build_from_flags(bin_dir, flags))
    assert "impl=eager" in _ea_log_lines(log)[0] and "conv weight (2, 2, 5, 5) in layers 2" in _ea_log_lines(log)[0]


@pytest.mark.parametrize("override,fragments", [
    ("model.ea_alpah=0.3", ["Could not override 'model.ea_alpah'", "Key 'ea_alpah' not in 'EATransformerConfig'"]),
    ("model.ea_alpha=1.5", ["--ea-alpha must be a number in [0, 1], got 1.5 (hydra: model.ea_alpha)"]),
])
def test_hydra_refuses_a_mistyped_key_and_an_out_of_range_value(override, fragments, reversal_data, tmp_path):
    _, bin_dir = reversal_data
    proc = _hydra_train(bin_dir, tmp_path / "ckpt", override, cwd=tmp_path)
    assert proc.returncode != 0
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


def test_the_dataclass_types_and_checks_the_ea_keys():
    base = OmegaConf.structured(EATransformerConfig)
    for bad in ({"ea_attn_impl": "fast"}, {"ea_activation": "swish"}, {"ea_kernel_size": "five"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            OmegaConf.merge(base, bad)
    cfg = OmegaConf.merge(base, {"decoder": {"embed_dim": 16}})
    assert cfg.decoder.output_dim == cfg.decoder.input_dim == 16  # they follow embed_dim


# the --arch preset and train.sh's recipe flags that each shipped config mirrors
PRESETS = {
    "multi30k": ["--arch", "ea_transformer", "--share-all-embeddings", "--dropout", "0.2",
                 "--encoder-layers", "3", "--decoder-layers", "3", "--encoder-embed-dim", "128",
                 "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512", "--decoder-ffn-embed-dim", "512",
                 "--encoder-attention-heads", "4", "--decoder-attention-heads", "4"],
    "iwslt14_de_en": ["--arch", "ea_transformer_iwslt_de_en", "--share-decoder-input-output-embed",
                      "--dropout", "0.3"],
    "wmt14_en_de": ["--arch", "ea_transformer_vaswani_wmt_en_de_big", "--share-all-embeddings", "--dropout", "0.3"],
}


@pytest.mark.parametrize("name", CONFIG_NAMES)
# fairseq stores its config schema under the config's name (hydra_init); hydra 1.3 says so
@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema:UserWarning")
def test_shipped_configs_compose_to_the_model_of_their_arch(name, reversal_data):
    """The config, composed by hydra as fairseq-hydra-train does, gives the model config
    that fairseq builds from the --arch preset (every key of TransformerConfig and EA)."""
    _, bin_dir = reversal_data
    hydra_init(name)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(name, overrides=[f"task.data={bin_dir}"])
    finally:
        GlobalHydra.instance().clear()
    from_yaml = OmegaConf.to_object(cfg.model)
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       [str(bin_dir), "--user-dir", "ea_fairseq", *PRESETS[name]])
    from_flags = EATransformerConfig.from_namespace(args)
    for f in from_yaml.__dataclass_fields__:
        if f != "_name":
            assert getattr(from_yaml, f) == getattr(from_flags, f), f
    assert cfg.common.user_dir == os.path.dirname(ea_fairseq.__file__)


def test_a_flat_model_config_keeps_its_ea_keys():
    """The path that used to drop every ea_* key (TransformerConfig.from_namespace copies
    unknown keys with vars(), which a DictConfig does not have): a hydra model config in
    fairseq's legacy style, an architecture and flat keys."""
    flat = {"encoder_layers": 2, "decoder_layers": 2, "encoder_embed_dim": 16, "decoder_embed_dim": 16,
            "encoder_ffn_embed_dim": 32, "decoder_ffn_embed_dim": 32, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "ea_alpha": 0.3, "ea_beta": 0.7, "ea_kernel_size": 5,
            "ea_activation": "tanh", "ea_conv_init": "kaiming", "ea_no_decoder_self_attn": True,
            "ea_cross_attn": True, "ea_attn_impl": "eager"}
    task = DummyTask(make_dictionary())
    model = models.build_model(OmegaConf.create({"_name": "ea_transformer_iwslt_de_en", **flat}), task)
    args = parse_model_args("ea_transformer_iwslt_de_en",
                            [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                             for k, v in flat.items()])
    assert describe_ea(model) == describe_ea(EATransformerModel.build_model(args, task))
    assert describe_ea(model)[0].startswith("encoder self-attention: evolving in layers 1-2 of 2 (alpha=0.3 beta=0.7 ")
    assert describe_ea(model)[1].startswith("decoder self-attention: plain attention")
    assert describe_ea(model)[2].endswith("impl=eager); conv weight (2, 2, 5, 5) in layers 2")


def test_an_architecture_name_in_a_structured_config_is_refused():
    cfg = OmegaConf.merge(OmegaConf.structured(EATransformerConfig), {"_name": "ea_transformer_iwslt_de_en"})
    with pytest.raises(ValueError, match="model._name=ea_transformer_iwslt_de_en: the ea_transformer_\\* "
                                         "architectures are presets of the command line"):
        models.build_model(cfg, DummyTask(make_dictionary()))
