"""Text stage: ``.txt`` (one document per file) and ``.jsonl`` (one record per line);
encoding detection (BOM, strict UTF-8, then charset-normalizer with the configured encodings
breaking ties and as the last resort), NFKC normalisation,
length and script stats, a content hash and a MinHash signature for deduplication."""
from __future__ import annotations

import codecs
import hashlib
import json
import re
import time
import unicodedata
from collections import Counter

import numpy as np

from pipelines.io import first_line

from .dedup import minhash
from .sources import FileTooLarge, read_bytes

BOMS = [(codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")]
CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SPACES_RE = re.compile(r"[ \t\u00a0\u3000]+")
SCRIPTS = [("han", 0x4E00, 0x9FFF), ("han", 0x3400, 0x4DBF), ("kana", 0x3040, 0x30FF),
           ("hangul", 0xAC00, 0xD7AF), ("cyrillic", 0x0400, 0x04FF), ("arabic", 0x0600, 0x06FF),
           ("greek", 0x0370, 0x03FF), ("devanagari", 0x0900, 0x097F)]
NUM_PERM = 64


class TextError(ValueError):
    """Bytes that are not usable text."""


def _plausible(text: str, encoding: str) -> bool:
    """gb18030 decodes many Latin-1 byte strings; accept it only when the non-ASCII
    characters are mostly CJK."""
    if encoding.replace("-", "").lower() not in ("gb18030", "gbk", "gb2312"):
        return True
    non_ascii = [c for c in text if ord(c) > 127]
    cjk = sum(1 for c in non_ascii if 0x3000 <= ord(c) <= 0x9FFF or 0xFF00 <= ord(c) <= 0xFFEF)
    return not non_ascii or cjk >= 0.8 * len(non_ascii)


def detect(data: bytes, preferred: list[str]) -> tuple[str, str] | None:
    """``(text, encoding)`` detected by charset-normalizer, or None. Among its equally good
    best guesses, the first of ``preferred`` that fits (and is plausible) wins: short texts
    often tie (a few Chinese characters are also valid EUC-KR, French also valid cp1250)."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(data))
    if not matches:
        return None
    best = matches[0]
    tied = [m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
    for enc in preferred:
        for m in tied:
            if _codec(enc) in {_codec(c) for c in m.could_be_from_charset}:
                try:
                    text = data.decode(enc)
                except UnicodeDecodeError:
                    continue
                if _plausible(text, enc):
                    return text, enc
    return str(best), best.encoding


def _codec(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return name


def decode_text(data: bytes, encodings: list[str]) -> tuple[str, str]:
    """``(text, encoding)``: a BOM wins, else strict UTF-8, else the encoding charset-normalizer
    detects (ties broken by the order of ``encodings``), else the first of ``encodings`` that
    decodes strictly (and plausibly); binary content is a TextError."""
    for bom, enc in BOMS:
        if data.startswith(bom):
            try:
                return data.decode(enc), enc
            except UnicodeDecodeError as e:
                raise TextError(f"{enc} BOM but undecodable at byte {e.start}") from None
    if b"\x00" in data[:4096]:
        raise TextError("binary content (NUL bytes) in a text file")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    found = detect(data, encodings)
    if found:
        return found
    for enc in encodings:
        try:
            text = data.decode(enc)
        except (UnicodeDecodeError, LookupError):
            continue
        if _plausible(text, enc):
            return text, enc
    raise TextError(f"undecodable (not UTF-8, no encoding detected, not {', '.join(encodings)})")


def normalize(text: str) -> str:
    """NFKC, control characters removed, runs of spaces collapsed, lines stripped,
    at most one blank line in a row."""
    text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = CONTROL_RE.sub("", text)
    lines = [SPACES_RE.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def script_of(text: str) -> str:
    """Dominant writing system of the letters: latin, han, kana, hangul, cyrillic, ... ("none"
    for no letters). Kana anywhere beside Han means Japanese, so it wins."""
    counts: Counter = Counter()
    for c in text:
        if not c.isalpha():
            continue
        o = ord(c)
        name = next((s for s, lo, hi in SCRIPTS if lo <= o <= hi), "latin" if o < 0x250 else "other")
        counts[name] += 1
    if not counts:
        return "none"
    if counts["kana"] and counts["han"]:
        return "kana"
    return counts.most_common(1)[0][0]


def text_record(text: str, shingle: int, max_chars: int) -> dict:
    """Stats, hashes and the (possibly truncated) text of one normalised document."""
    return {
        "text": text[:max_chars], "n_chars": len(text), "n_words": len(text.split()),
        "n_lines": text.count("\n") + 1, "script": script_of(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "minhash": minhash(text, k=shingle, num_perm=NUM_PERM),
    }


def iter_documents(path: str, data: bytes, encodings: list[str], jsonl_field: str):
    """Yield ``(record_index, raw_text, encoding, error)`` for a .txt or .jsonl file."""
    text, enc = decode_text(data, encodings)
    if not path.lower().endswith(".jsonl"):
        yield 0, text, enc, None
        return
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield i + 1, None, enc, f"line {i + 1}: invalid JSON ({e.msg})"
            continue
        value = obj.get(jsonl_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            yield i + 1, None, enc, f"line {i + 1}: no string field {jsonl_field!r}"
            continue
        yield i + 1, value, enc, None


COLUMNS = ["path", "record", "text", "encoding", "n_chars", "n_words", "n_lines", "script",
           "sha256", "reason"]


class TextReader:
    """``map_batches`` stage: text files -> one row per document/record (bad records keep a
    ``reason``); yields a batch per ``rows_per_batch`` rows, so one big JSONL file becomes
    many blocks. Each file is decoded whole, so files over ``max_bytes`` (``text.max_file_mb``)
    are not read: one row with reason ``too_large: ...``."""

    def __init__(self, encodings: list[str], jsonl_field: str = "text", shingle: int = 3,
                 min_chars: int = 1, max_chars: int = 100_000, endpoint: str | None = None,
                 rows_per_batch: int = 1024, max_bytes: int = 10 << 20):
        self.encodings, self.jsonl_field, self.shingle = list(encodings), jsonl_field, shingle
        self.min_chars, self.max_chars, self.endpoint = min_chars, max_chars, endpoint
        self.rows_per_batch, self.max_bytes = rows_per_batch, max_bytes

    def _rows(self, path: str):
        try:
            docs = list(iter_documents(path, read_bytes(path, self.endpoint, self.max_bytes), self.encodings,
                                       self.jsonl_field))
        except (TextError, FileTooLarge, OSError) as e:
            yield {"path": path, "record": 0, "reason": first_line(e)}
            return
        for record, raw, enc, error in docs:
            if error:
                yield {"path": path, "record": record, "encoding": enc, "reason": error}
                continue
            text = normalize(raw)
            if len(text) < max(self.min_chars, 1):
                yield {"path": path, "record": record, "encoding": enc,
                       "reason": f"empty text after normalisation (< {max(self.min_chars, 1)} chars)"}
                continue
            yield {"path": path, "record": record, "encoding": enc, "reason": "",
                   **text_record(text, self.shingle, self.max_chars)}

    def __call__(self, batch: dict):
        rows, start = [], time.perf_counter()
        for path in batch["path"]:
            for row in self._rows(str(path)):
                rows.append(row)
                if len(rows) >= self.rows_per_batch:
                    yield self._batch(rows, start)
                    rows, start = [], time.perf_counter()
        if rows:
            yield self._batch(rows, start)

    @staticmethod
    def _batch(rows: list[dict], start: float) -> dict:
        n = len(rows)
        out = {c: np.array([r.get(c) for r in rows], dtype=object) for c in COLUMNS}
        for c in ("record", "n_chars", "n_words", "n_lines"):
            out[c] = np.array([r.get(c) or 0 for r in rows], np.int64)
        for c in ("text", "encoding", "script", "sha256", "reason"):
            out[c] = np.array([r.get(c) or "" for r in rows], dtype=object)
        out["minhash"] = np.array([r["minhash"].tobytes() if r.get("minhash") is not None else b""
                                   for r in rows], dtype=object)
        out["decode_s"] = np.full(n, (time.perf_counter() - start) / n, np.float32)
        return out
