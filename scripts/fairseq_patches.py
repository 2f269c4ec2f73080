#!/usr/bin/env python3
"""Patch an unpacked fairseq 0.12.2 sdist so that it builds and runs on
Python 3.11 / torch >= 2.6 / numpy 2 / bitarray 3.

Used by ``scripts/install.sh``; it edits a pristine copy of the sdist before it
is built (never an installed site-packages tree). Every patch is written so
that it changes nothing where it is not needed (Python 3.8-3.10, torch 1.x,
numpy 1.x), and every patch checks that the text it replaces is really there,
so a different fairseq source fails loudly instead of being half-patched.

Usage: python fairseq_patches.py SRC_DIR        # patch in place
       python fairseq_patches.py --version      # print the patched version
"""

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

UPSTREAM_VERSION = "0.12.2"


@dataclass(frozen=True)
class Patch:
    path: str  # relative to the sdist root
    why: str
    old: str
    new: str
    count: int = 1  # exact number of occurrences of `old`


# torch.load: torch >= 2.6 defaults to weights_only=True, which cannot unpickle
# fairseq checkpoints (argparse.Namespace, omegaconf). Pass weights_only=False
# only where torch knows the argument (torch >= 1.13), so older torch is untouched.
_TORCH_LOAD_KW = (
    "\n# ea-fairseq patch: fairseq checkpoints hold Python objects (Namespace, configs)\n"
    "import inspect as _ea_inspect\n"
    "_EA_TORCH_LOAD_KW = (\n"
    '    {"weights_only": False}\n'
    '    if "weights_only" in _ea_inspect.signature(torch.load).parameters\n'
    "    else {}\n"
    ")\n"
)

PATCHES = [
    # --- Python 3.11 dataclasses --------------------------------------------
    # (the `x: T = T()` defaults are rewritten by _patch_dataclass_defaults)
    Patch(
        "fairseq/dataclass/initialize.py",
        "hydra_init reads .default of fields that now use default_factory",
        "        v = FairseqConfig.__dataclass_fields__[k].default\n",
        "        _f = FairseqConfig.__dataclass_fields__[k]\n"
        "        v = _f.default_factory() if callable(_f.default_factory) else _f.default\n",
    ),
    # --- torch >= 2.6: weights_only=True by default -------------------------
    Patch(
        "fairseq/checkpoint_utils.py",
        "module-level torch.load kwargs",
        "from fairseq.file_io import PathManager\n",
        "from fairseq.file_io import PathManager\n" + _TORCH_LOAD_KW,
    ),
    Patch(
        "fairseq/checkpoint_utils.py",
        "load_checkpoint_to_cpu: allow fairseq's pickled objects",
        '        state = torch.load(f, map_location=torch.device("cpu"))\n',
        '        state = torch.load(f, map_location=torch.device("cpu"), **_EA_TORCH_LOAD_KW)\n',
    ),
    Patch(
        "fairseq/checkpoint_utils.py",
        "load_pretrained_component_from_model: allow fairseq's pickled objects",
        "                lambda s, _: torch.serialization.default_restore_location(s, \"cpu\")\n"
        "            ),\n",
        "                lambda s, _: torch.serialization.default_restore_location(s, \"cpu\")\n"
        "            ),\n"
        "            **_EA_TORCH_LOAD_KW,\n",
    ),
    Patch(
        "fairseq/distributed/utils.py",
        "module-level torch.load kwargs",
        "import torch.distributed as dist\n",
        "import torch.distributed as dist\n" + _TORCH_LOAD_KW,
    ),
    Patch(
        "fairseq/distributed/utils.py",
        "broadcast_object: the broadcast object is a pickled Namespace/config",
        '        obj = torch.load(buffer, map_location="cpu")\n',
        '        obj = torch.load(buffer, map_location="cpu", **_EA_TORCH_LOAD_KW)\n',
    ),
    # --- the fused "BetterTransformer" encoder path --------------------------
    # It calls torch._transformer_encoder_layer_fwd with its torch 1.12/1.13
    # signature (torch 2 fails with "Mask Type should be defined") and it skips
    # the layer's own attention module. Keep it for torch 1.12-1.x only.
    Patch(
        "fairseq/modules/transformer_layer.py",
        "BT fast path only on torch 1.12-1.x",
        "                if self.int_version >= 1120:\n",
        "                if 1120 <= self.int_version < 2000:\n",
    ),
    Patch(
        "fairseq/modules/transformer_layer.py",
        "BT fast path only on torch 1.13-1.x (4-part versions)",
        "                if self.int_version >= 1130:\n",
        "                if 1130 <= self.int_version < 2000:\n",
    ),
    Patch(
        "fairseq/models/transformer/transformer_encoder.py",
        "BT fast path only on torch 1.12-1.x",
        "                if int_version >= 1120:\n",
        "                if 1120 <= int_version < 2000:\n",
    ),
    Patch(
        "fairseq/models/transformer/transformer_encoder.py",
        "BT fast path only on torch 1.13-1.x (4-part versions)",
        "                if int_version >= 1130:\n"
        "                    BT_version = True\n",
        "                if 1130 <= int_version < 2000:\n"
        "                    BT_version = True\n",
    ),
    # Its copies of the layer's weights (filled at checkpoint load, read only by
    # that inference path) are Parameters that never get a gradient: DDP's default
    # backend then fails ("Expected to have finished reduction ..."). Keep them in
    # the state dict (same checkpoint format) but out of autograd and the optimizer.
    Patch(
        "fairseq/modules/transformer_layer.py",
        "BetterTransformer weight copies are not trained",
        "        self.fc2_bias = torch.nn.Parameter(torch.zeros(self.fc2.bias.shape))\n",
        "        self.fc2_bias = torch.nn.Parameter(torch.zeros(self.fc2.bias.shape))\n"
        "        for _bt_param in (\n"
        "            self.in_proj_weight, self.in_proj_bias, self.out_proj_weight,\n"
        "            self.out_proj_bias, self.fc1_weight, self.fc1_bias,\n"
        "            self.fc2_weight, self.fc2_bias,\n"
        "        ):\n"
        "            _bt_param.requires_grad_(False)\n",
    ),
    # --- hydra 1.3 ---------------------------------------------------------------
    # Every checkpoint load (generate, interactive, resume) composes the config with
    # hydra 1.0's API, and hydra >= 1.1 prints four deprecation notices about it that
    # users cannot act on. Quiet them around that one call (no-op on hydra 1.0).
    Patch(
        "fairseq/dataclass/utils.py",
        "quiet hydra's notices about fairseq's use of its 1.0 API",
        "    with initialize(config_path=config_path):\n",
        "    with _ea_quiet_hydra(), initialize(config_path=config_path):\n",
    ),
    Patch(
        "fairseq/dataclass/utils.py",
        "the context manager for the patch above",
        "def convert_namespace_to_omegaconf(args: Namespace) -> DictConfig:\n",
        "import contextlib as _ea_contextlib\n"
        "import warnings as _ea_warnings\n\n\n"
        "@_ea_contextlib.contextmanager\n"
        "def _ea_quiet_hydra():\n"
        "    # ea-fairseq patch: hydra >= 1.1 deprecation notices (initialize/compose are no\n"
        "    # longer experimental, version_base, '# @package _group_' headers)\n"
        "    with _ea_warnings.catch_warnings():\n"
        '        _ea_warnings.simplefilter("ignore", UserWarning)\n'
        "        yield\n\n\n"
        "def convert_namespace_to_omegaconf(args: Namespace) -> DictConfig:\n",
    ),
    # torch warns at every data loader on a machine without accelerator that
    # pin_memory=True does nothing: pin only where CUDA is there (same on GPUs).
    Patch(
        "fairseq/data/iterators.py",
        "pin memory only with CUDA",
        "pin_memory=True,",
        "pin_memory=torch.cuda.is_available(),",
        count=2,
    ),
    # --- --help lists the model's (and task's, criterion's...) options -----------
    # parse_args_and_arch parses the command line once to learn --arch/--task/...,
    # then adds their options and parses again; with -h/--help argparse prints the
    # help (and exits) already in the first parse, before any model option exists,
    # so `fairseq-train --arch transformer --help` lists no --encoder-layers. Keep
    # -h/--help out of the first parse; the second one prints the complete help.
    Patch(
        "fairseq/options.py",
        "--help after the model/task/criterion options are added",
        "    args, _ = parser.parse_known_args(input_args)\n",
        "    # ea-fairseq patch: -h/--help is acted on in the second parse, once the\n"
        "    # model/task/criterion/optimizer options are in the parser\n"
        "    _ea_argv = sys.argv[1:] if input_args is None else list(input_args)\n"
        "    _ea_help = any(a in (\"-h\", \"--help\") for a in _ea_argv)\n"
        "    args, _ = parser.parse_known_args([a for a in _ea_argv if a not in (\"-h\", \"--help\")])\n",
    ),
    Patch(
        "fairseq/options.py",
        "--help without --arch: general help, as before",
        "        else:\n"
        "            raise RuntimeError()\n",
        "        elif not (_ea_help and args.arch is None):\n"
        "            raise RuntimeError()\n",
    ),
    Patch(
        "fairseq/options.py",
        "sys for the patch above",
        "import argparse\n",
        "import argparse\nimport sys\n",
    ),
    # --- torch deprecations reached from fairseq's own code -----------------------
    # torch >= 2.4 deprecates torch.cuda.amp.* (a FutureWarning at every training
    # step's first call, i.e. at the top of every training log). torch.amp.autocast
    # ("cuda", ...) exists since torch 1.10 (fairseq 0.12.2's minimum), so the same
    # call works everywhere; torch.amp.GradScaler("cuda", ...) only since torch 2.3.
    Patch(
        "fairseq/tasks/fairseq_task.py",
        "torch.cuda.amp.autocast is deprecated (torch >= 2.4): torch.amp.autocast('cuda')",
        "            with torch.cuda.amp.autocast(enabled=(isinstance(optimizer, AMPOptimizer))):\n",
        '            with torch.amp.autocast("cuda", enabled=(isinstance(optimizer, AMPOptimizer))):\n',
    ),
    Patch(
        "fairseq/optim/amp_optimizer.py",
        "torch.cuda.amp.GradScaler is deprecated (torch >= 2.4): torch.amp.GradScaler('cuda')",
        "        self._grad_scaler = torch.cuda.amp.GradScaler(**amp_kwargs)\n",
        '        if hasattr(torch.amp, "GradScaler"):  # ea-fairseq patch: torch >= 2.3\n'
        '            self._grad_scaler = torch.amp.GradScaler("cuda", **amp_kwargs)\n'
        "        else:\n"
        "            self._grad_scaler = torch.cuda.amp.GradScaler(**amp_kwargs)\n",
    ),
    # Five helpers of the non-autoregressive models are scripted at import time, so
    # every `import fairseq.models` calls torch.jit.script (deprecated in torch 2.13:
    # five DeprecationWarnings). Scripting them eagerly is not needed: scripting a
    # model that calls them compiles them recursively, and eager code runs them as
    # Python functions.
    Patch(
        "fairseq/models/model_utils.py",
        "no eager torch.jit.script at import (deprecated in torch 2.13)",
        "@torch.jit.script\n",
        "",
        count=5,
    ),
    # torch >= 2.0 deprecates a boolean key_padding_mask next to a float attn_mask in
    # F.multi_head_attention_forward ("Support for mismatched key_padding_mask and
    # attn_mask is deprecated"), which fairseq's decoder self-attention passes at every
    # padded batch. Hand torch the float (-inf) mask it would build itself: same result.
    Patch(
        "fairseq/modules/multihead_attention.py",
        "boolean key_padding_mask as a float mask next to a float attn_mask (torch >= 2.0)",
        "            else:\n"
        "                return F.multi_head_attention_forward(\n",
        "            else:\n"
        "                if (\n"
        "                    key_padding_mask is not None\n"
        "                    and attn_mask is not None\n"
        "                    and hasattr(F, \"_canonical_mask\")  # ea-fairseq patch: torch >= 2.0\n"
        "                    and attn_mask.is_floating_point()\n"
        "                    and not key_padding_mask.is_floating_point()\n"
        "                ):\n"
        "                    key_padding_mask = torch.zeros(\n"
        "                        key_padding_mask.shape, dtype=attn_mask.dtype, device=attn_mask.device\n"
        "                    ).masked_fill_(key_padding_mask.to(torch.bool), float(\"-inf\"))\n"
        "                return F.multi_head_attention_forward(\n",
    ),
    # --- checkpoint loading errors say why --------------------------------------
    # Trainer.load_checkpoint replaces any error of model.load_state_dict (a missing
    # key, a size mismatch, a model's own check) by "please ensure that the
    # architectures match", leaving the reason in the middle of a chained traceback.
    Patch(
        "fairseq/trainer.py",
        "keep the reason in the error of a failed checkpoint load",
        "            except Exception:\n"
        "                raise Exception(\n"
        "                    \"Cannot load model parameters from checkpoint {}; \"\n"
        "                    \"please ensure that the architectures match.\".format(filename)\n"
        "                )\n",
        "            except Exception as e:\n"
        "                raise Exception(\n"
        "                    \"Cannot load model parameters from checkpoint {}; \"\n"
        "                    \"please ensure that the architectures match: {}\".format(filename, e)\n"
        "                ) from e\n",
    ),
    # --- numpy 2 --------------------------------------------------------------
    Patch(
        "fairseq/data/data_utils.py",
        "np.int was removed (numpy 1.24); it was the builtin int",
        "                    np.int,\n",
        "                    int,\n",
    ),
    Patch(
        "fairseq/data/data_utils.py",
        "np.percentile(interpolation=) was removed (numpy 2); method= exists since 1.22",
        '            interpolation="lower",\n',
        '            **(\n'
        '                {"method": "lower"}\n'
        '                if np.lib.NumpyVersion(np.__version__) >= "1.22.0"\n'
        '                else {"interpolation": "lower"}\n'
        "            ),\n",
    ),
    Patch(
        "fairseq/modules/dynamic_crf_layer.py",
        "np.float was removed (numpy 1.24); it was the builtin float",
        'np.float("inf")',
        'float("inf")',
    ),
    Patch(
        "fairseq/data/token_block_dataset.py",
        "np.compat was removed (numpy 2); np.compat.long is int64 on Linux",
        "dtype=np.compat.long",
        "dtype=np.int64",
    ),
    Patch(
        "fairseq/data/language_pair_dataset.py",
        "np.compat was removed (numpy 2); np.compat.long is int64 on Linux",
        "otypes=[np.compat.long]",
        "otypes=[np.int64]",
    ),
    # --- bitarray 3 -------------------------------------------------------------
    Patch(
        "fairseq/data/huffman/huffman_coder.py",
        "bitarray.util.rindex was removed (bitarray 3)",
        "        remove_cnt = util.rindex(a, 1)\n",
        "        remove_cnt = len(a) - 1 - a[::-1].index(1)\n",
    ),
    # --- DDP on CPU (gloo) --------------------------------------------------------
    Patch(
        "fairseq/models/distributed_fairseq_model.py",
        "torch rejects device_ids for CPU modules",
        "            device_ids=[args.device_id],\n"
        "            output_device=args.device_id,\n"
        "            broadcast_buffers=args.broadcast_buffers,\n",
        '            device_ids=[args.device_id] if device.type == "cuda" else None,\n'
        '            output_device=args.device_id if device.type == "cuda" else None,\n'
        "            broadcast_buffers=args.broadcast_buffers,\n",
    ),
    # --- packaging -------------------------------------------------------------
    # The sdist lacks the C++ sources of libbase/libnat/alignment_train (only
    # libbleu is shipped), so a build that can import torch would fail on them.
    Patch(
        "setup.py",
        "skip extensions whose sources are not in the sdist",
        "def do_setup(package_data):\n",
        "extensions = [\n"
        "    e for e in extensions if all(os.path.exists(s) for s in e.sources)\n"
        "]\n\n\n"
        "def do_setup(package_data):\n",
    ),
    # fairseq's own pins (hydra-core<1.1, omegaconf<2.1) have metadata current pip
    # rejects; declare what it really runs on, so `pip check` stays truthful.
    # torchaudio is only imported by the speech tasks.
    Patch(
        "setup.py",
        "declare the dependencies fairseq runs on",
        '            "hydra-core>=1.0.7,<1.1",\n'
        '            "omegaconf<2.1",\n',
        '            "hydra-core>=1.3.2,<1.4",\n'
        '            "omegaconf>=2.3,<2.4",\n',
    ),
    Patch(
        "setup.py",
        "torchaudio is optional (speech tasks only)",
        '            "torchaudio>=0.8.0",\n',
        "",
    ),
]

# --- broken corners users meet (generation options, error messages) ---------------
# Applied after PATCHES (some edit lines PATCHES has already changed).
USABILITY_PATCHES = [
    # --no-repeat-ngram-size: the sdist lacks the C++/CUDA sources of
    # ngram_repeat_block_cuda, so the Python fallback is the only path, on CPU and
    # GPU. SequenceGenerator hands it the whole token buffer (bsz*beam, max_len + 2),
    # padded after `step`, and the fallback takes "the last n-1 tokens" of that
    # buffer: padding, which never matches, so nothing was ever banned (fairseq
    # issues #4709, #5206). Use the n-1 tokens that end at `step`, as the CUDA
    # kernel does. The start symbol (position 0) is never banned: with n=1 it would
    # forbid EOS and leave no token at the forced end of a hypothesis.
    Patch(
        "fairseq/ngram_repeat_block.py",
        "--no-repeat-ngram-size: compare the n-gram that ends at `step`, not the buffer's padded tail",
        "            check_start_pos = step + 2 - self.no_repeat_ngram_size\n"
        "            for bbsz_idx in range(bsz * beam_size):\n"
        "                ngram_to_check = cpu_tokens[bbsz_idx][\n"
        "                    -(self.no_repeat_ngram_size - 1) :\n"
        "                ]\n"
        "                for i in range(check_start_pos):\n",
        "            check_start_pos = step + 2 - self.no_repeat_ngram_size\n"
        "            for bbsz_idx in range(bsz * beam_size):\n"
        "                # ea-fairseq patch: the n-1 tokens ending at `step` (tokens is\n"
        "                # the whole buffer, padded after step); position 0 is the start\n"
        "                # symbol, never banned (n=1 would ban EOS)\n"
        "                ngram_to_check = cpu_tokens[bbsz_idx][check_start_pos : step + 1]\n"
        "                for i in range(1 if self.no_repeat_ngram_size == 1 else 0, check_start_pos):\n",
    ),
    # fairseq-interactive --print-alignment soft: the soft alignment is one list of
    # source probabilities per target token, not (src, tgt) pairs; print it the way
    # fairseq-generate does.
    Patch(
        "fairseq_cli/interactive.py",
        "--print-alignment soft: print rows of probabilities as fairseq-generate does",
        "                if cfg.generation.print_alignment:\n"
        "                    alignment_str = \" \".join(\n"
        "                        [\"{}-{}\".format(src, tgt) for src, tgt in alignment]\n"
        "                    )\n",
        "                if cfg.generation.print_alignment == \"soft\":\n"
        "                    # ea-fairseq patch: one comma-separated row per target token\n"
        "                    alignment_str = \" \".join(\n"
        "                        [\",\".join(src_probs) for src_probs in alignment]\n"
        "                    )\n"
        "                    print(\"A-{}\\t{}\".format(id_, alignment_str))\n"
        "                elif cfg.generation.print_alignment:\n"
        "                    alignment_str = \" \".join(\n"
        "                        [\"{}-{}\".format(src, tgt) for src, tgt in alignment]\n"
        "                    )\n",
    ),
    # --log-file: progress_bar() added a new FileHandler to its logger at every call
    # (each epoch's training and validation), so epoch N's lines were written N times
    # into the log file. Add one handler per file.
    Patch(
        "fairseq/logging/progress_bar.py",
        "--log-file: one file handler, not one more per epoch (lines repeated N times at epoch N)",
        "    if log_file is not None:\n"
        "        handler = logging.FileHandler(filename=log_file)\n"
        "        logger.addHandler(handler)\n",
        "    if log_file is not None and not any(  # ea-fairseq patch: one handler per file\n"
        "        isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(log_file)\n"
        "        for h in logger.handlers\n"
        "    ):\n"
        "        handler = logging.FileHandler(filename=log_file)\n"
        "        logger.addHandler(handler)\n",
    ),
    # An unknown model (a plugin's checkpoint loaded without its --user-dir) hit an
    # f-string whose config text was then run through str.format: "IndexError:
    # Replacement index 1 out of range". Say what is missing instead.
    Patch(
        "fairseq/models/__init__.py",
        "unknown model: a message naming it and --user-dir, not a format-string IndexError",
        "    assert model is not None, (\n"
        "        f\"Could not infer model type from {cfg}. \"\n"
        "        \"Available models: {}\".format(MODEL_DATACLASS_REGISTRY.keys())\n"
        "        + f\" Requested model type: {model_type}\"\n"
        "    )\n",
        "    if model is None:  # ea-fairseq patch: a message instead of a format-string IndexError\n"
        "        raise ValueError(\n"
        "            f\"unknown model {model_type!r}: no model or architecture of that name is \"\n"
        "            \"registered. If it comes from a plugin, add the plugin's --user-dir \"\n"
        "            \"(ea-fairseq's ea_transformer*: --user-dir ea_fairseq, or the path of the \"\n"
        "            \"installed ea_fairseq package).\"\n"
        "        )\n",
    ),
    # An empty or truncated checkpoint (a full disk, an interrupted copy) stopped
    # training with "EOFError: Ran out of input", naming no file. Name it, its size,
    # and the checkpoints beside it to resume from instead.
    Patch(
        "fairseq/checkpoint_utils.py",
        "unreadable checkpoint: name the file and the remedy",
        "    with open(local_path, \"rb\") as f:\n"
        "        state = torch.load(f, map_location=torch.device(\"cpu\"), **_EA_TORCH_LOAD_KW)\n",
        "    try:  # ea-fairseq patch: name an unreadable checkpoint and the remedy\n"
        "        with open(local_path, \"rb\") as f:\n"
        "            state = torch.load(f, map_location=torch.device(\"cpu\"), **_EA_TORCH_LOAD_KW)\n"
        "    except (EOFError, RuntimeError, ValueError, OSError, __import__(\"pickle\").UnpicklingError) as e:\n"
        "        if isinstance(e, FileNotFoundError):\n"
        "            raise\n"
        "        raise RuntimeError(_ea_unreadable_checkpoint(str(path), local_path, e)) from e\n",
    ),
    Patch(
        "fairseq/checkpoint_utils.py",
        "the message builder for the patch above",
        "def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):\n",
        "def _ea_unreadable_checkpoint(path, local_path, error):\n"
        "    \"\"\"ea-fairseq patch: what to tell a user whose checkpoint cannot be read.\"\"\"\n"
        "    try:\n"
        "        size = f\"{os.path.getsize(local_path)} bytes\"\n"
        "    except OSError:\n"
        "        size = \"size unknown\"\n"
        "    folder = os.path.dirname(os.path.abspath(local_path))\n"
        "    others = sorted(\n"
        "        n for n in os.listdir(folder)\n"
        "        if n.endswith(\".pt\") and n != os.path.basename(local_path)\n"
        "    ) if os.path.isdir(folder) else []\n"
        "    return (\n"
        "        f\"cannot read checkpoint {path} ({size}; {type(error).__name__}: {error}): \"\n"
        "        \"the file is empty or truncated (an interrupted save or copy, a full disk?). \"\n"
        "        \"Move it aside; to resume training, pass an intact checkpoint to --restore-file \"\n"
        "        + (f\"(in {folder}: {', '.join(others)})\" if others else \"(none other in its folder)\")\n"
        "        + \", or start from scratch without it.\"\n"
        "    )\n\n\n"
        "def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):\n",
    ),
    # --fp16 / --bf16 without a GPU: fairseq's FP16 optimizers keep their fp32 master
    # weights on the current CUDA device, so training died deep inside ("Torch not
    # compiled with CUDA enabled"; with --bf16, "'NoneType' object has no attribute
    # 'xla_device'", see below). Say which flag, why, and what works instead. Checked in
    # train.py's main, which fairseq-train and fairseq-hydra-train both run, before the
    # data and the model are loaded.
    Patch(
        "fairseq_cli/train.py",
        "--fp16/--bf16 without a GPU: a message naming the flag and the remedy",
        "def main(cfg: FairseqConfig) -> None:\n",
        "def _ea_check_half_precision(cfg) -> None:\n"
        "    \"\"\"ea-fairseq patch: fp16/bf16 training needs CUDA (or a TPU with --tpu), except with\n"
        "    --fp16-no-flatten-grads, whose master copies live beside each parameter.\"\"\"\n"
        "    c = cfg.common\n"
        "    flags = [f for f in (\"fp16\", \"bf16\", \"memory_efficient_fp16\", \"memory_efficient_bf16\")\n"
        "             if getattr(c, f, False)]\n"
        "    if not flags or getattr(c, \"tpu\", False) or (torch.cuda.is_available() and not c.cpu):\n"
        "        return\n"
        "    if getattr(c, \"fp16_no_flatten_grads\", False) and not flags[0].startswith(\"memory_efficient\"):\n"
        "        return  # fp32 master copies beside each parameter, on its device: works on a CPU\n"
        "    flag = \"--\" + flags[0].replace(\"_\", \"-\")\n"
        "    raise ValueError(\n"
        "        f\"{flag} trains in half precision on a GPU, and \"\n"
        "        + (\"--cpu is set\" if c.cpu else \"no CUDA GPU is visible\")\n"
        "        + \": fairseq's fp16/bf16 training keeps its flattened fp32 master weights on CUDA. \"\n"
        "        f\"Leave out {flag} (hydra: common.{flags[0]}=false) to train in fp32 on the CPU, \"\n"
        "        \"or train on a GPU, or add --fp16-no-flatten-grads (hydra: common.fp16_no_flatten_grads=true) \"\n"
        "        \"to keep a master copy beside each parameter, which works on the CPU (slowly: for tests). \"\n"
        "        \"(On the CPU, fairseq-generate and fairseq-interactive --fp16 decode in fp16.)\"\n"
        "    )\n\n\n"
        "def main(cfg: FairseqConfig) -> None:\n",
    ),
    Patch(
        "fairseq_cli/train.py",
        "call the check above once the config is complete",
        "    utils.import_user_module(cfg.common)\n"
        "    add_defaults(cfg)\n",
        "    utils.import_user_module(cfg.common)\n"
        "    add_defaults(cfg)\n"
        "    _ea_check_half_precision(cfg)  # ea-fairseq patch\n",
    ),
    # fairseq-train's parser turned --bf16 into --tpu as well (bf16 was TPU-only when it
    # was written), so that --bf16 on a GPU, or without one, asked torch_xla for a TPU
    # device ("'NoneType' object has no attribute 'xla_device'"; fairseq issue #4696).
    # fairseq-hydra-train keeps them apart (common.bf16 trains on a GPU); so does this.
    # TPU users pass --tpu, as fairseq's TPU instructions say.
    Patch(
        "fairseq/options.py",
        "--bf16 is bfloat16 on a GPU, not also --tpu",
        "    if args.bf16:\n"
        "        args.tpu = True\n",
        "    # ea-fairseq patch: --bf16 no longer implies --tpu (fairseq issue #4696)\n",
    ),
    # An empty line given to fairseq-interactive was translated from its end-of-sentence
    # symbol alone, which gives whatever the model makes of nothing (up to max_len_b = 200
    # tokens). Leave empty (and blank) lines out of the batches and print, at their place,
    # an empty hypothesis (score 0, the only output of an empty input), with a warning, so
    # that the output still has one S/H/D/P block per input line.
    Patch(
        "fairseq_cli/interactive.py",
        "empty input lines: an empty output with a warning, not a translation of nothing",
        "        results = []\n"
        "        for batch in make_batches(inputs, cfg, task, max_positions, encode_fn):\n",
        "        results = []\n"
        "        # ea-fairseq patch: empty lines are not translated (see below)\n"
        "        kept = [i for i, line in enumerate(inputs) if line]\n"
        "        for i, line in enumerate(inputs):\n"
        "            if not line:\n"
        "                logger.warning(\n"
        "                    \"input line %d is empty: nothing to translate, its output (id %d) is \"\n"
        "                    \"an empty hypothesis\", start_id + i + 1, start_id + i\n"
        "                )\n"
        "                eos = torch.tensor([tgt_dict.eos()])\n"
        "                empty = {\"tokens\": eos, \"score\": torch.tensor(0.0), \"alignment\": [],\n"
        "                         \"positional_scores\": torch.zeros(1)}\n"
        "                results.append((start_id + i, eos, [empty], {\"constraints\": [], \"time\": 0.0}))\n"
        "        lines = [inputs[i] for i in kept]\n"
        "        for batch in make_batches(lines, cfg, task, max_positions, encode_fn) if lines else []:\n",
    ),
    Patch(
        "fairseq_cli/interactive.py",
        "the ids of the translated lines are their places among all input lines",
        "                        start_id + id,\n",
        "                        start_id + kept[id],  # ea-fairseq patch: empty lines left out\n",
    ),
]

# `name: SomeConfig = SomeConfig()` and `field(default=SomeConfig())`: Python 3.11
# refuses unhashable (non-frozen dataclass) defaults; default_factory works on
# every Python version.
_DC_ANNOTATED = re.compile(r"^(\s+)(\w+): (\w+) = \3\(\)[ \t]*$", re.M)
_DC_FIELD = re.compile(r"field\(default=(\w+)\(\)\)")
_DC_IMPORT = re.compile(r"^from dataclasses import ([^\n]+)$", re.M)


def _patch_dataclass_defaults(root: Path) -> int:
    changed = 0
    for path in sorted(root.glob("fairseq/**/*.py")):
        text = path.read_text(encoding="utf-8")
        new = _DC_ANNOTATED.sub(r"\1\2: \3 = field(default_factory=\3)", text)
        new = _DC_FIELD.sub(r"field(default_factory=\1)", new)
        if new == text:
            continue
        imp = _DC_IMPORT.search(new)
        if imp is None:
            raise SystemExit(f"{path}: dataclass defaults patched but no 'from dataclasses import' line")
        names = [n.strip() for n in imp.group(1).split(",")]
        if "field" not in names:
            new = new[: imp.start(1)] + ", ".join(names + ["field"]) + new[imp.end(1) :]
        path.write_text(new, encoding="utf-8")
        changed += 1
    return changed


def patch_level() -> str:
    """Short hash of this file: part of the installed version, so that a changed
    patch set is detected and reinstalled."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


def patched_version() -> str:
    return f"{UPSTREAM_VERSION}+ea.{patch_level()}"


def apply(root: Path) -> None:
    version_file = root / "fairseq" / "version.txt"
    if not version_file.is_file():
        raise SystemExit(f"{root}: not a fairseq source tree (no fairseq/version.txt)")
    found = version_file.read_text().strip()
    if found != UPSTREAM_VERSION:
        raise SystemExit(f"{version_file}: expected fairseq {UPSTREAM_VERSION}, found {found!r}")
    for p in PATCHES + USABILITY_PATCHES:
        path = root / p.path
        text = path.read_text(encoding="utf-8")
        n = text.count(p.old)
        if n != p.count:
            raise SystemExit(
                f"{path}: expected {p.count} occurrence(s) of the text to patch "
                f"({p.why}), found {n}; is this the pristine fairseq {UPSTREAM_VERSION} sdist?"
            )
        path.write_text(text.replace(p.old, p.new), encoding="utf-8")
    n_dc = _patch_dataclass_defaults(root)
    if n_dc == 0:
        raise SystemExit(f"{root}: found no dataclass defaults to patch")
    version_file.write_text(patched_version() + "\n")
    print(f"patched fairseq {UPSTREAM_VERSION}: {len(PATCHES) + len(USABILITY_PATCHES)} text patches, "
          f"dataclass defaults in {n_dc} files; version {patched_version()}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", type=Path, help="unpacked fairseq-0.12.2 sdist (patched in place)")
    ap.add_argument("--version", action="store_true", help="print the version the patched fairseq reports")
    args = ap.parse_args(argv)
    if args.version:
        print(patched_version())
        return
    if args.src is None:
        ap.error("SRC is required unless --version is given")
    apply(args.src)


if __name__ == "__main__":
    main()
