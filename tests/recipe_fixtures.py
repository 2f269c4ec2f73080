"""Small fixtures in the real download formats, built from the real corpora in
../shared/data (EA_SHARED_DATA): a mini IWSLT14 de-en.tgz with its tag layout, and
WMT14-style archives (Europarl / Common Crawl / News Commentary / UN / Giga-FrEn text,
dev.tgz, test-full.tgz with the SGML test sets)."""

import gzip
import io
import os
import re
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence

SHARED = Path(os.environ.get("EA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
IWSLT_TESTS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
               "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _text(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _iwslt_docs(xml: Path) -> List[Dict]:
    """The <doc> elements of an IWSLT XML file: header fields and segment texts."""
    docs, doc = [], None
    for line in xml.read_text(encoding="utf-8").splitlines():
        if line.startswith("<doc "):
            doc = {"segs": []}
            docs.append(doc)
        elif doc is not None:
            m = re.match(r"<(url|description|keywords|talkid|title)>(.*)</\1>$", line)
            if m:
                doc[m.group(1)] = m.group(2)
            m = re.match(r'<seg id="\d+">\s*(.*?)\s*</seg>', line)
            if m:
                doc["segs"].append(m.group(1))
    return docs


def iwslt_train_tags(xml: Path) -> List[str]:
    """A train.tags file in IWSLT's layout: per talk, the header tag lines (<url>,
    <keywords>, <talkid>, <title>, <description>: the fields of the same release's
    XML <doc> headers, and the tags fairseq's recipe filters), then the transcript,
    one or more sentences per line."""
    lines = []
    for i, doc in enumerate(_iwslt_docs(xml)):
        lines += [
            f"<url>{doc.get('url', '')}</url>",
            f"<keywords>{doc.get('keywords', '')}</keywords>",
            f"<talkid>{doc.get('talkid', i)}</talkid>",
            f"<title>{doc.get('title', '')}</title>",
            f"<description>{doc.get('description', '')}</description>",
        ]
        lines += doc["segs"]
    return lines


def make_iwslt_tgz(dest: Path, train_from: str = "IWSLT14.TED.tst2010", extra_en_line: bool = False) -> Path:
    """de-en.tgz: de-en/train.tags.de-en.{de,en} (from the real talks of one XML
    set, in the train.tags layout) and the five real dev/test XML files."""
    orig = SHARED / "iwslt14" / "orig_xml"
    with tarfile.open(dest, "w:gz") as tar:
        for lang in ("de", "en"):
            lines = iwslt_train_tags(orig / f"{train_from}.de-en.{lang}.xml")
            if extra_en_line and lang == "en":
                lines.append("one line too many")
            _add(tar, f"de-en/train.tags.de-en.{lang}", _text(lines))
            for t in IWSLT_TESTS:
                name = f"{t}.de-en.{lang}.xml"
                _add(tar, f"de-en/{name}", (orig / name).read_bytes())
    return dest


def _detok(lines: Sequence[str], lang: str) -> List[str]:
    """The small WMT files are Moses-tokenised; the real corpora are not."""
    from sacremoses import MosesDetokenizer

    d = MosesDetokenizer(lang=lang)
    return [d.detokenize(line.split(), unescape=True) for line in lines]


def _read(path: Path) -> List[str]:
    return path.read_text(encoding="utf-8").splitlines()


def make_wmt_cache(cache: Path, pair: str, train_lines: int = 3000, dev_lines: int = 500) -> Path:
    """The archives of scripts/prepare-wmt14.sh, with their real member names, in a
    download cache: training corpora from the first ``train_lines`` lines of the small
    WMT files (detokenised, shared out among the pair's corpora), newstest2013 from the
    first ``dev_lines`` of their newstest2012 dev set, newstest2014 from the real SGML."""
    cache.mkdir(parents=True, exist_ok=True)
    tgt = pair.split("-")[1]
    if pair == "en-de":
        small = SHARED / "wmt_small" / "en-de_10k"
        en, xx = _read(small / "src-train.txt"), _read(small / "tgt-train.txt")
        dev_en, dev_xx = _read(small / "src-val.txt"), _read(small / "tgt-val.txt")
        corpora = [("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
                   ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
                   ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.de-en")]
        sgm = ("newstest2014-deen-src.en.sgm", "newstest2014-deen-ref.de.sgm",
               "newstest2014-deen-src.de.sgm", "newstest2014-deen-ref.en.sgm")
    else:
        small = SHARED / "wmt_small" / "fr-en_europarl20k"
        en, xx = _read(small / "europarl-v7.fr-en.en"), _read(small / "europarl-v7.fr-en.fr")
        dev_en, dev_xx = _read(small / "newstest2012.en"), _read(small / "newstest2012.fr")
        corpora = [("training-parallel-europarl-v7.tgz", "training/europarl-v7.fr-en"),
                   ("training-parallel-commoncrawl.tgz", "commoncrawl.fr-en"),
                   ("training-parallel-un.tgz", "un/undoc.2000.fr-en"),
                   ("training-parallel-nc-v9.tgz", "training/news-commentary-v9.fr-en"),
                   ("training-giga-fren.tar", "giga-fren.release2.fixed")]
        sgm = ("newstest2014-fren-src.en.sgm", "newstest2014-fren-ref.fr.sgm",
               "newstest2014-fren-src.fr.sgm", "newstest2014-fren-ref.en.sgm")
    en, xx = _detok(en[:train_lines], "en"), _detok(xx[:train_lines], tgt)
    per = len(en) // len(corpora)
    for k, (archive, member) in enumerate(corpora):
        part_en, part_xx = en[k * per:(k + 1) * per], xx[k * per:(k + 1) * per]
        gz = archive.endswith(".tar")  # Giga-FrEn: gzipped text inside a plain tar
        with tarfile.open(cache / archive, "w" if gz else "w:gz") as tar:
            for lang, lines in (("en", part_en), (tgt, part_xx)):
                if gz:
                    _add(tar, f"{member}.{lang}.gz", gzip.compress(_text(lines)))
                else:
                    _add(tar, f"{member}.{lang}", _text(lines))
    with tarfile.open(cache / "dev.tgz", "w:gz") as tar:
        _add(tar, "dev/newstest2013.en", _text(_detok(dev_en[:dev_lines], "en")))
        _add(tar, f"dev/newstest2013.{tgt}", _text(_detok(dev_xx[:dev_lines], tgt)))
    with tarfile.open(cache / "test-full.tgz", "w:gz") as tar:
        for name in sgm:
            _add(tar, f"test-full/{name}", (SHARED / "wmt14" / "newstest2014_sgm" / name).read_bytes())
    return cache


MULTI30K_FILES = [f"{split}.{lang}.gz" for split in ("train", "val", "test_2016_flickr") for lang in ("de", "en")]


def make_multi30k_dir(dest: Path, n_train: int = 300, n_eval: int = 60) -> Path:
    """A local Multi30k copy in the release's format ({train,val,test_2016_flickr}.{de,en}.gz,
    UTF-8, one caption per line), cut to the first lines of the real files."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MULTI30K_FILES:
        n = n_train if name.startswith("train") else n_eval
        with gzip.open(SHARED / "multi30k" / name, "rb") as f:
            data = b"".join(line for _, line in zip(range(n), f))
        (dest / name).write_bytes(gzip.compress(data))
    return dest


def edit_gz_line(path: Path, lineno: int, new: bytes) -> None:
    """Replace line `lineno` (1-based) of a gzipped text file by the bytes `new`."""
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    lines[lineno - 1] = new
    path.write_bytes(gzip.compress(b"\n".join(lines)))
