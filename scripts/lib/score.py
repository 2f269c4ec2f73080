#!/usr/bin/env python3
"""Score a fairseq-generate output file, two ways:

  * tokenised BLEU as papers report it: hypotheses (BPE removed by fairseq-generate)
    against the tokenised reference, with fairseq's compound splitting for En-De
    (a-b -> a ##AT##-##AT## b, as examples/scripts/compound_split_bleu.sh), scored by
    fairseq's own `fairseq-score`;
  * detokenised sacrebleu: Moses-detokenised hypotheses against the untokenised
    reference, with sacrebleu's signature.

Writes a JSON summary and prints one line per score.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import textprep  # noqa: E402


def read_hypotheses(gen: Path):
    """{id: text} from the H-<id> lines of fairseq-generate's output."""
    hyps = {}
    with open(gen, encoding="utf-8") as f:
        for line in f:
            if line.startswith("H-"):
                head, _score, text = (line.rstrip("\n").split("\t") + ["", ""])[:3]
                hyps[int(head[2:])] = text
    return hyps


def read_lines(path: Path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def fairseq_score(sys_lines, ref_lines) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        s, r = Path(tmp, "sys"), Path(tmp, "ref")
        s.write_text("".join(x + "\n" for x in sys_lines), encoding="utf-8")
        r.write_text("".join(x + "\n" for x in ref_lines), encoding="utf-8")
        out = subprocess.run(["fairseq-score", "--sys", str(s), "--ref", str(r)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"fairseq-score failed:\n{out.stderr[-3000:]}")
    m = re.search(r"BLEU4? = ([\d.]+), (.*)", out.stdout + out.stderr)
    if not m:
        raise SystemExit(f"no BLEU in fairseq-score's output:\n{out.stdout[-2000:]}")
    return {"score": float(m.group(1)), "detail": m.group(2).strip()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gen", type=Path, required=True, help="fairseq-generate output (with H- lines)")
    ap.add_argument("--ref-tok", type=Path, required=True, help="tokenised reference, one sentence per line")
    ap.add_argument("--ref-raw", type=Path, required=True, help="untokenised reference")
    ap.add_argument("--lang", required=True, help="target language (detokenisation)")
    ap.add_argument("--compound-split", action="store_true", help="En-De compound splitting for tokenised BLEU")
    ap.add_argument("--json", type=Path, required=True, help="write the scores here")
    ap.add_argument("--detok-out", type=Path, help="also write the detokenised hypotheses here")
    ap.add_argument("--ref-desc", default="", help="what the untokenised reference is (recorded in the JSON)")
    ap.add_argument("--meta", default="{}", help="JSON object merged into the output (model, checkpoint, ...)")
    args = ap.parse_args(argv)

    hyps = read_hypotheses(args.gen)
    ref_tok, ref_raw = read_lines(args.ref_tok), read_lines(args.ref_raw)
    if len(ref_tok) != len(ref_raw):
        raise SystemExit(f"{args.ref_tok} has {len(ref_tok)} lines but {args.ref_raw} has {len(ref_raw)}")
    if sorted(hyps) != list(range(len(ref_tok))):
        raise SystemExit(f"{args.gen}: {len(hyps)} hypotheses for {len(ref_tok)} references in {args.ref_tok} "
                         "(incomplete generation?)")
    sys_tok = [hyps[i] for i in range(len(ref_tok))]

    if args.compound_split:
        tok = fairseq_score(list(textprep.compound_split(sys_tok)), list(textprep.compound_split(ref_tok)))
    else:
        tok = fairseq_score(sys_tok, ref_tok)

    from sacrebleu.metrics import BLEU
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=args.lang)
    sys_detok = [detok.detokenize(h.split(), unescape=True) for h in sys_tok]
    bleu = BLEU()
    sacre = bleu.corpus_score(sys_detok, [ref_raw])
    if args.detok_out:
        args.detok_out.write_text("".join(x + "\n" for x in sys_detok), encoding="utf-8")

    result = {
        **json.loads(args.meta),
        "sentences": len(sys_tok),
        "tokenized_bleu": tok["score"],
        "tokenized_bleu_detail": tok["detail"],
        "tokenized_bleu_compound_split": bool(args.compound_split),
        "sacrebleu": round(sacre.score, 2),
        "sacrebleu_signature": str(bleu.get_signature()),
        "sacrebleu_reference": args.ref_desc or str(args.ref_raw),
        "sacrebleu_reference_file": str(args.ref_raw),
        "generate_output": str(args.gen),
    }
    tmp = args.json.with_suffix(args.json.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.json)
    split = " (compound-split)" if args.compound_split else ""
    print(f"tokenized BLEU{split} = {tok['score']:.2f}  ({tok['detail']})")
    print(f"sacreBLEU (detokenized) = {sacre.score:.2f}  {bleu.get_signature()}")


if __name__ == "__main__":
    main()
