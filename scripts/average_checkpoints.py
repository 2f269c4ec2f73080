#!/usr/bin/env python3
"""Average the parameters of the last N fairseq checkpoints of a save dir.

fairseq's own scripts/average_checkpoints.py is not part of the fairseq package on
PyPI, so this is ours: it reads and writes checkpoints with fairseq's
checkpoint_utils, keeps the newest checkpoint's other contents (cfg, optimizer
history, extra state) and averages every floating-point tensor of "model".

    python scripts/average_checkpoints.py --inputs SAVE_DIR --num-epoch-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs SAVE_DIR --num-update-checkpoints 5 --output avg.pt
    python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt
"""

import argparse
import collections
import os
import re
import sys
from typing import List

import torch


def last_checkpoints(folder: str, n: int, by_update: bool) -> List[str]:
    """The n newest checkpoint{epoch}.pt or checkpoint_{epoch}_{update}.pt files."""
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt$" if by_update else r"checkpoint(\d+)\.pt$")
    found = []
    for name in os.listdir(folder):
        m = pattern.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    found.sort()
    if len(found) < n:
        kind = "update" if by_update else "epoch"
        raise SystemExit(f"{folder}: {len(found)} {kind} checkpoints, --num-{kind}-checkpoints asks for {n}")
    return [path for _, path in found[-n:]]


def average(paths: List[str]) -> dict:
    from fairseq import checkpoint_utils

    total: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    newest = None
    for path in paths:
        try:
            state = checkpoint_utils.load_checkpoint_to_cpu(path)
        except Exception as e:  # fairseq's message names the file (scripts/fairseq_patches.py)
            others = [p for p in paths if p != path]
            raise SystemExit(f"cannot average {len(paths)} checkpoints ({', '.join(map(os.path.basename, paths))}): "
                             f"{e} To average the others only: --inputs {' '.join(others)}") from e
        model = state.get("model") if isinstance(state, dict) else None
        if not isinstance(model, dict):
            raise SystemExit(f"{path}: not a fairseq checkpoint (no 'model' weights in it)")
        if total and set(model) != set(total):
            raise SystemExit(f"{path}: its parameters differ from {paths[0]}'s (different model?)")
        for key, value in model.items():
            if key not in total:
                total[key] = value.clone().double() if value.is_floating_point() else value.clone()
            elif value.is_floating_point():
                total[key] += value.double()
        newest = state
    for key, value in total.items():
        if value.is_floating_point():
            total[key] = (value / len(paths)).to(newest["model"][key].dtype)
    newest["model"] = total
    return newest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", nargs="+", required=True, help="checkpoint files, or one save dir")
    ap.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int, help="average the last N checkpoint{epoch}.pt")
    group.add_argument("--num-update-checkpoints", type=int, help="average the last N checkpoint_{epoch}_{update}.pt")
    args = ap.parse_args(argv)

    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    if n is not None:
        if len(args.inputs) != 1 or not os.path.isdir(args.inputs[0]):
            ap.error("--num-*-checkpoints needs exactly one save dir in --inputs")
        paths = last_checkpoints(args.inputs[0], n, by_update=args.num_update_checkpoints is not None)
    else:
        paths = args.inputs
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"{p}: no such checkpoint")
    print(f"averaging {len(paths)} checkpoints: {', '.join(os.path.basename(p) for p in paths)}", file=sys.stderr)
    state = average(paths)
    from fairseq import checkpoint_utils

    tmp = args.output + ".tmp"
    checkpoint_utils.torch_persistent_save(state, tmp)
    os.replace(tmp, args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
