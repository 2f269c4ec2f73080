#!/usr/bin/env python3
"""Text steps of the data recipes, as filters (stdin -> stdout) or file tools.

They reproduce the Moses Perl scripts that fairseq's prepare-*.sh recipes call,
with sacremoses instead of a Perl checkout:

  iwslt-train     fairseq's grep/sed over IWSLT train.tags files (drop <url>,
                  <talkid>, <keywords> lines; strip <title>/<description> tags)
  segs            text of the <seg id=...> lines of IWSLT XML / WMT SGML files,
                  with ’ turned into ' (fairseq's grep | sed | sed | sed): the
                  model's input and the tokenised reference
  ref-segs        the same segments as released (sacreBLEU's own reading of the
                  SGML): the reference for sacreBLEU
  utf8            copy, stopping at invalid UTF-8 with the file and line
  drop-blank      drop training pairs with a whitespace-only side (with a warning)
  blank-lines     warn about whitespace-only lines of a test set (kept)
  inputs-changed / inputs-record   fingerprints (paths, sizes, times) of a
                  recipe's input files, so that changed inputs redo the steps
  tokenize        tokenizer.perl [-a] -l LANG (escaping on), optionally lowercased
                  (lowercase.perl); blank lines pass through
  normalize       normalize-punctuation.perl -l LANG | remove-non-printing-char.perl
  lowercase       lowercase.perl
  clean           clean-corpus-n.perl [-ratio R] CORPUS L1 L2 OUT MIN MAX
  every           keep (or drop) every N-th line (fairseq's awk NR%N split)
  spm-train / spm-encode / spm-decode   SentencePiece, as the alternative to subword-nmt
  compound-split  fairseq's compound splitting for En-De BLEU (a-b -> a ##AT##-##AT## b)
  detok           Moses detokenisation (sacremoses), for detokenised BLEU

Only the standard library, sacremoses and sentencepiece: no torch, no fairseq.
"""

import argparse
import io
import json
import os
import re
import sys
import unicodedata
from multiprocessing import Pool
from typing import Iterable, Iterator, List, Optional

# ---------------------------------------------------------------------- helpers

# what stdin is, for messages (--input-name; the recipes pass the user's file)
INPUT_NAME = "<stdin>"


def bad_utf8_message(name: str, lineno: int, raw: bytes, err: UnicodeDecodeError) -> str:
    return (f"{name}: line {lineno}: invalid UTF-8 (byte {raw[err.start:err.start + 1]!r} at byte "
            f"{err.start + 1} of the line: {raw[max(0, err.start - 20):err.start + 20]!r}). The recipes read "
            "UTF-8 only: convert the file (iconv -f <its encoding> -t UTF-8) or fix or remove that line")


def decoded_lines(binary: Iterable[bytes], name: str) -> Iterator[str]:
    """UTF-8 lines without their newline; invalid UTF-8 stops with a message naming
    the file, the line and the byte (not a bare UnicodeDecodeError)."""
    for lineno, raw in enumerate(binary, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            sys.exit(bad_utf8_message(name, lineno, raw, err))
        yield line[:-1] if line.endswith("\n") else line


def stdin_lines() -> Iterator[str]:
    yield from decoded_lines(sys.stdin.buffer, INPUT_NAME)


def stdout() -> io.TextIOWrapper:
    return io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", write_through=False)


def write_lines(lines: Iterable[str]) -> None:
    out = stdout()
    for line in lines:
        out.write(line)
        out.write("\n")
    out.flush()


def _chunks(lines: Iterable[str], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def parallel_map(fn, initializer, initargs, lines: Iterable[str], workers: int) -> Iterator[str]:
    """fn over chunks of lines in worker processes, order kept."""
    if workers <= 1:
        initializer(*initargs)
        for chunk in _chunks(lines, 1000):
            yield from fn(chunk)
        return
    with Pool(workers, initializer=initializer, initargs=initargs) as pool:
        for out in pool.imap(fn, _chunks(lines, 1000), chunksize=1):
            yield from out


# ------------------------------------------------------------------ IWSLT / WMT

_IWSLT_DROP = ("<url>", "<talkid>", "<keywords>")
_IWSLT_STRIP = re.compile(r"</?(title|description)>")


def iwslt_train(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        if any(tag in line for tag in _IWSLT_DROP):
            continue
        yield _IWSLT_STRIP.sub("", line)


_SEG = re.compile(r'<seg id="?[0-9]*"?>\s*')
_SEG_END = re.compile(r"\s*</seg>\s*")


_SACREBLEU_SEG = re.compile(r"<seg.*?>(.*)</seg>.*?")


_XML_ENTITY = re.compile(r"&(amp|lt|gt|quot|apos|#[0-9]+|#x[0-9a-fA-F]+);")
_XML_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _xml_entity(m: "re.Match[str]") -> str:
    name = m.group(1)
    if name.startswith("#x") or name.startswith("#X"):
        return chr(int(name[2:], 16))
    if name.startswith("#"):
        return chr(int(name[1:]))
    return _XML_NAMED[name]


def ref_segs(lines: Iterable[str]) -> Iterator[str]:
    """The segments of an IWSLT XML / WMT SGML file as released, for sacreBLEU:
    sacreBLEU's own reading of SGML test sets (sacrebleu.dataset.fake_sgml, what
    `sacrebleu -t wmt14/full` scores against: lines starting with "<seg ", the text
    between the tags, whitespace stripped and runs of it collapsed), with XML's
    entities decoded (&amp; -> &, as an XML parser reads IWSLT's files; a bare & as
    in newstest2014 stays). Nothing else changes: no ’ -> ', no tokenisation."""
    for line in lines:
        if line.startswith("<seg "):
            text = re.sub(r"\s+", " ", _SACREBLEU_SEG.sub("\\1", line).strip())
            yield _XML_ENTITY.sub(_xml_entity, text)


def segs(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        if "<seg id" not in line:
            continue
        line = _SEG.sub("", line)
        line = _SEG_END.sub("", line)
        yield line.replace("\u2019", "'")


# ----------------------------------------------------------------- tokenisation

_TOK = {}


_ENDS_WITH_PERIOD = re.compile(r"^(\S+)\.$")


def _perl_parity_tokenizer(lang: str):
    """sacremoses' MosesTokenizer plus the one rule of tokenizer.perl it lacks: the
    last word of a line loses its final period even when it looks like a
    non-breaking prefix ("usw." -> "usw ."; Perl: "split last words independently
    as they are unlikely to be non-breaking prefixes")."""
    from sacremoses import MosesTokenizer

    class PerlParityTokenizer(MosesTokenizer):
        def handles_nonbreaking_prefixes(self, text):
            tokens = super().handles_nonbreaking_prefixes(text).split()
            if tokens:
                m = _ENDS_WITH_PERIOD.search(tokens[-1])
                if m:
                    tokens[-1] = m.group(1) + " ."
            return " ".join(tokens)

    return PerlParityTokenizer(lang=lang)


def _init_tokenizer(lang: str, aggressive: bool, lowercase: bool) -> None:
    _TOK["tok"] = _perl_parity_tokenizer(lang)
    _TOK["aggressive"] = aggressive
    _TOK["lowercase"] = lowercase


def _tokenize_chunk(chunk: List[str]) -> List[str]:
    tok, aggressive, lc = _TOK["tok"], _TOK["aggressive"], _TOK["lowercase"]
    out = []
    for line in chunk:
        if line.strip() == "":
            text = line  # tokenizer.perl prints blank lines unchanged
        else:
            text = tok.tokenize(line, aggressive_dash_splits=aggressive, return_str=True, escape=True)
        out.append(text.lower() if lc else text)
    return out


def _init_normalizer(lang: str) -> None:
    from sacremoses import MosesPunctNormalizer

    _TOK["norm"] = MosesPunctNormalizer(lang=lang, perl_parity=True)


def _remove_non_printing(text: str) -> str:
    # remove-non-printing-char.perl: s/\p{C}/ /g
    return "".join(" " if unicodedata.category(c)[0] == "C" else c for c in text)


def _normalize_chunk(chunk: List[str]) -> List[str]:
    norm = _TOK["norm"]
    return [_remove_non_printing(norm.normalize(line)) for line in chunk]


# ------------------------------------------------------------------------ clean

def clean(corpus: str, l1: str, l2: str, out: str, lo: int, hi: int, ratio: float) -> None:
    """clean-corpus-n.perl: squeeze whitespace, drop empty pairs, pairs with a side
    outside [lo, hi] words, or a length ratio above `ratio` (either way)."""
    n_in = n_out = n_empty = 0
    with open(f"{corpus}.{l1}", encoding="utf-8", newline="\n") as f1, \
            open(f"{corpus}.{l2}", encoding="utf-8", newline="\n") as f2, \
            open(f"{out}.{l1}", "w", encoding="utf-8", newline="\n") as o1, \
            open(f"{out}.{l2}", "w", encoding="utf-8", newline="\n") as o2:
        factored = None
        for a in f1:
            b = f2.readline()
            if b == "":
                sys.exit(f"{corpus}.{l2} has fewer lines than {corpus}.{l1} (at line {n_in + 1})")
            n_in += 1
            a, b = a.rstrip("\n"), b.rstrip("\n")
            if factored is None:
                factored = "|" in a or "|" in b
            if not factored:
                a, b = a.replace("|", ""), b.replace("|", "")
            a = " ".join(a.split())
            b = " ".join(b.split())
            if not a or not b:
                n_empty += 1
                continue
            na, nb = len(a.split(" ")), len(b.split(" "))
            if not (lo <= na <= hi and lo <= nb <= hi):
                continue
            if na / nb > ratio or nb / na > ratio:
                continue
            if re.search(r"[^\s|]{1001}", a) or re.search(r"[^\s|]{1001}", b):
                continue
            o1.write(a + "\n")
            o2.write(b + "\n")
            n_out += 1
        if f2.readline() != "":
            sys.exit(f"{corpus}.{l2} has more lines than {corpus}.{l1}")
    print(f"clean: {corpus}.{{{l1},{l2}}}: {n_in} pairs in, {n_out} out ({n_empty} dropped for an empty "
          "or whitespace-only side)", file=sys.stderr)


def drop_blank(corpus: str, l1: str, l2: str, out: str, name: Optional[str] = None) -> None:
    """Drop the pairs of CORPUS.{l1,l2} with a whitespace-only side (as the cleaning
    step of fairseq's recipes drops empty pairs), report how many and which
    (calling the pair `name` if given)."""
    dropped: List[int] = []
    n = 0
    with open(f"{corpus}.{l1}", "rb") as f1, open(f"{corpus}.{l2}", "rb") as f2, \
            open(f"{out}.{l1}", "w", encoding="utf-8", newline="\n") as o1, \
            open(f"{out}.{l2}", "w", encoding="utf-8", newline="\n") as o2:
        for a, b in zip(decoded_lines(f1, f"{corpus}.{l1}"), decoded_lines(f2, f"{corpus}.{l2}")):
            n += 1
            if not a.strip() or not b.strip():
                dropped.append(n)
                continue
            o1.write(a + "\n")
            o2.write(b + "\n")
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (" ..." if len(dropped) > 10 else "")
        print(f"WARNING: {name or f'{corpus}.{{{l1},{l2}}}'}: dropped {len(dropped)} of {n} training pairs with a "
              f"whitespace-only side (lines {shown})", file=sys.stderr)


def blank_lines(paths: List[str], what: str, name: Optional[str] = None) -> None:
    """Warn about whitespace-only lines, which are kept (a test set stays aligned
    with its references). `name`: what to call a single file in the message."""
    for path in paths:
        shown_name = name if name and len(paths) == 1 else path
        with open(path, "rb") as f:
            found = [i for i, line in enumerate(decoded_lines(f, shown_name), 1) if not line.strip()]
        if found:
            shown = ", ".join(map(str, found[:10])) + (" ..." if len(found) > 10 else "")
            print(f"WARNING: {shown_name}: {len(found)} whitespace-only line(s) in the {what} (lines {shown}), "
                  "kept so that its lines stay aligned", file=sys.stderr)


# ----------------------------------------------------------- input fingerprints

def _stat(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def inputs_changed(record: str, paths: List[str]) -> Optional[str]:
    """Why the inputs differ from those recorded (None if they do not): another set
    of paths, or a file whose size or modification time changed. A recorded file
    that is absent now (a download cache emptied) is not a change."""
    if not os.path.exists(record):
        return None
    with open(record, encoding="utf-8") as f:
        old = json.load(f)
    now = {os.path.abspath(p): _stat(p) for p in paths}
    if set(now) != set(old):
        new = sorted(set(now) - set(old))
        gone = sorted(set(old) - set(now))
        return (f"other input files: {len(new)} new, e.g. {new[0] if new else '-'}, "
                f"instead of {gone[0] if gone else '-'}")
    for path, stat in now.items():
        if stat is not None and old[path] is not None and stat != old[path]:
            return f"{path} changed (size/time {old[path]} -> {stat})"
    return None


def inputs_record(record: str, paths: List[str]) -> None:
    old = {}
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            old = json.load(f)
    now = {}
    for p in paths:
        key = os.path.abspath(p)
        now[key] = _stat(p) or old.get(key)
    tmp = record + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(now, f, indent=0, sort_keys=True)
    os.replace(tmp, record)


# ------------------------------------------------------------------ SentencePiece

def spm_train(inputs: List[str], prefix: str, vocab_size: int, threads: int, max_sentences: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(inputs), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, num_threads=max(1, threads), input_sentence_size=max_sentences,
        shuffle_input_sentence=True, minloglevel=1,
        # fairseq's dictionary adds its own specials: keep only <unk>
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
    )


def _init_spm(model: str) -> None:
    import sentencepiece as spm

    _TOK["spm"] = spm.SentencePieceProcessor(model_file=model)


def _spm_encode_chunk(chunk: List[str]) -> List[str]:
    sp = _TOK["spm"]
    return [" ".join(sp.encode(line, out_type=str)) for line in chunk]


# ------------------------------------------------------------------- evaluation

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        yield _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def _init_detok(lang: str) -> None:
    from sacremoses import MosesDetokenizer

    _TOK["detok"] = MosesDetokenizer(lang=lang)


def _detok_chunk(chunk: List[str]) -> List[str]:
    detok = _TOK["detok"]
    return [detok.detokenize(line.split(), unescape=True) for line in chunk]


# ------------------------------------------------------------------------- main

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("iwslt-train", help="fairseq's tag filtering of IWSLT train.tags (stdin -> stdout)")
    ap.add_argument("--input-name", default="<stdin>", help="what stdin is, for error messages")
    sub.add_parser("segs", help="<seg> texts of an XML/SGML file (stdin -> stdout)")
    sub.add_parser("utf8", help="copy stdin to stdout, stopping at invalid UTF-8 with file and line")
    sub.add_parser("ref-segs", help="<seg> texts of a WMT SGML file as sacreBLEU reads them (stdin -> stdout)")
    p = sub.add_parser("drop-blank", help="drop pairs with a whitespace-only side, with a warning")
    for name in ("corpus", "l1", "l2", "out"):
        p.add_argument(name)
    p = sub.add_parser("blank-lines", help="warn about whitespace-only lines (kept)")
    p.add_argument("--what", default="test set")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("inputs-changed", help="exit 0 and say why if FILES differ from RECORD, else exit 1")
    p.add_argument("record")
    p.add_argument("files", nargs="*")
    p = sub.add_parser("inputs-record", help="record paths, sizes and times of FILES in RECORD")
    p.add_argument("record")
    p.add_argument("files", nargs="*")
    p = sub.add_parser("tokenize", help="Moses tokenisation (stdin -> stdout)")
    p.add_argument("-l", "--lang", required=True)
    p.add_argument("-a", "--aggressive", action="store_true", help="aggressive hyphen splitting (tokenizer.perl -a)")
    p.add_argument("--lowercase", action="store_true", help="then lowercase (lowercase.perl)")
    p.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("normalize", help="Moses punctuation normalisation + non-printing chars (stdin -> stdout)")
    p.add_argument("-l", "--lang", required=True)
    p.add_argument("--workers", type=int, default=1)
    sub.add_parser("lowercase", help="lowercase.perl (stdin -> stdout)")
    p = sub.add_parser("clean", help="clean-corpus-n.perl")
    p.add_argument("--ratio", type=float, default=9.0)
    for name in ("corpus", "l1", "l2", "out"):
        p.add_argument(name)
    p.add_argument("min", type=int)
    p.add_argument("max", type=int)
    p = sub.add_parser("every", help="lines whose 1-based number is (not) a multiple of N (stdin -> stdout)")
    p.add_argument("n", type=int)
    p.add_argument("--invert", action="store_true", help="keep the other lines")
    p = sub.add_parser("spm-train", help="train a SentencePiece BPE model")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-sentences", type=int, default=10_000_000, help="sample at most this many lines")
    p = sub.add_parser("spm-encode", help="SentencePiece pieces (stdin -> stdout)")
    p.add_argument("--model", required=True)
    p.add_argument("--workers", type=int, default=1)
    sub.add_parser("compound-split", help="fairseq's compound splitting for En-De BLEU (stdin -> stdout)")
    p = sub.add_parser("detok", help="Moses detokenisation (stdin -> stdout)")
    p.add_argument("-l", "--lang", required=True)
    p.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    global INPUT_NAME
    INPUT_NAME = args.input_name

    if args.cmd == "iwslt-train":
        write_lines(iwslt_train(stdin_lines()))
    elif args.cmd == "segs":
        write_lines(segs(stdin_lines()))
    elif args.cmd == "utf8":
        write_lines(stdin_lines())
    elif args.cmd == "ref-segs":
        write_lines(ref_segs(stdin_lines()))
    elif args.cmd == "drop-blank":
        drop_blank(args.corpus, args.l1, args.l2, args.out, None if INPUT_NAME == "<stdin>" else INPUT_NAME)
    elif args.cmd == "blank-lines":
        blank_lines(args.files, args.what, None if INPUT_NAME == "<stdin>" else INPUT_NAME)
    elif args.cmd == "inputs-changed":
        why = inputs_changed(args.record, args.files)
        if why is None:
            sys.exit(1)
        print(why)
    elif args.cmd == "inputs-record":
        inputs_record(args.record, args.files)
    elif args.cmd == "tokenize":
        write_lines(parallel_map(_tokenize_chunk, _init_tokenizer, (args.lang, args.aggressive, args.lowercase),
                                 stdin_lines(), args.workers))
    elif args.cmd == "normalize":
        write_lines(parallel_map(_normalize_chunk, _init_normalizer, (args.lang,), stdin_lines(), args.workers))
    elif args.cmd == "lowercase":
        write_lines(line.lower() for line in stdin_lines())
    elif args.cmd == "clean":
        clean(args.corpus, args.l1, args.l2, args.out, args.min, args.max, args.ratio)
    elif args.cmd == "every":
        write_lines(line for i, line in enumerate(stdin_lines(), 1) if (i % args.n == 0) != args.invert)
    elif args.cmd == "spm-train":
        spm_train(args.input, args.prefix, args.vocab_size, args.threads, args.max_sentences)
    elif args.cmd == "spm-encode":
        write_lines(parallel_map(_spm_encode_chunk, _init_spm, (args.model,), stdin_lines(), args.workers))
    elif args.cmd == "compound-split":
        write_lines(compound_split(stdin_lines()))
    elif args.cmd == "detok":
        write_lines(parallel_map(_detok_chunk, _init_detok, (args.lang,), stdin_lines(), args.workers))


if __name__ == "__main__":
    main()
