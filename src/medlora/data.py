"""CSV loading and validation, train/eval split, chat formatting with answer-only labels, collation.

The CSV is read and validated before any model is loaded, so bad input fails in seconds.
"""

from __future__ import annotations

import codecs
import csv
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import MedloraError

COLUMNS = ("qtype", "Question", "Answer")
IGNORE_INDEX = -100


@dataclass
class DataReport:
    path: str
    rows_read: int = 0
    dropped_empty: int = 0
    qtype_counts: dict = field(default_factory=dict)

    @property
    def rows_kept(self) -> int:
        return self.rows_read - self.dropped_empty


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel's "Unicode Text" and some exports
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise MedloraError(f"{path}: not valid UTF-16 text despite its byte order mark; save the CSV as UTF-8") \
                from None
    if b"\x00" in raw:
        raise MedloraError(f"{path}: not a text CSV file (contains NUL bytes; is it a spreadsheet or archive?)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise MedloraError(
            f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} on line {line}); "
            "save the CSV as UTF-8"
        ) from None


def _check_field_counts(path: Path, text: str) -> None:
    """Refuse a row with more non-empty fields than the header (an unquoted comma in a cell, or a column the
    header lacks): pandas would silently shift or drop them. Trailing empty fields (spreadsheet exports often
    end every row with a comma) are harmless and pass."""
    body = text.lstrip()
    skipped = text[: len(text) - len(body)].count("\n")  # blank lines above the header
    reader = csv.reader(io.StringIO(body))
    try:
        width = len(next(reader, []))
        for row in reader:
            if len(row) > width and any(cell.strip() for cell in row[width:]):
                raise MedloraError(
                    f"{path}: line {reader.line_num + skipped} has {len(row)} fields but the header has {width}; "
                    'quote cells that contain a comma ("like, this") or add the missing column names to the header')
    except csv.Error:  # a stray carriage return in an unquoted cell, say: pandas reads those, and judges the rest
        return


def load_qa_csv(path: str | Path) -> tuple[pd.DataFrame, DataReport]:
    """Read a qtype/Question/Answer CSV. Raises MedloraError with one clear line on bad input."""
    path = Path(path)
    if not path.exists():
        raise MedloraError(f"{path}: file not found")
    if not path.is_file():
        raise MedloraError(f"{path}: not a file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MedloraError(f"{path}: cannot read file ({e.strerror})") from None
    text = _decode(path, raw)
    if "\r" in text and "\n" not in text:  # old Mac / Excel "CSV (Macintosh)": bare CR line ends, which the csv
        text = text.replace("\r", "\n")  # module refuses; other files' cells keep their own line breaks
    if not text.strip():
        raise MedloraError(f"{path}: file is empty")
    header = text.lstrip().splitlines()[0]
    if "," not in header:
        for sep, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if sep in header:
                raise MedloraError(
                    f"{path}: looks {name}-separated; medlora expects a comma-separated CSV "
                    f"with columns {', '.join(COLUMNS)}"
                )
    _check_field_counts(path, text)
    try:
        # index_col=False: without it, rows with one field more than the header make pandas take the first
        # column as the index and shift every column by one (qtype <- Question, Question <- Answer).
        with warnings.catch_warnings():  # trailing empty fields (checked above) only
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skip_blank_lines=True,
                             index_col=False)
    except pd.errors.EmptyDataError:
        raise MedloraError(f"{path}: file is empty") from None
    except pd.errors.ParserError as e:
        raise MedloraError(f"{path}: malformed CSV ({str(e).strip()})") from None

    # Forgive case and surrounding spaces in header names; keep extra columns out of the way. Two headers that
    # are the same name (pandas would quietly rename one "Question.1") are ambiguous: refuse them.
    try:
        header_names = next(csv.reader(io.StringIO(text.lstrip())), [])
    except csv.Error:  # a bare carriage return in the header: pandas' names stand
        header_names = [str(c) for c in df.columns]
    seen: dict[str, str] = {}
    for name in header_names:
        key = name.strip().lower()
        if key in {c.lower() for c in COLUMNS} and key in seen:
            canonical = next(c for c in COLUMNS if c.lower() == key)
            raise MedloraError(f"{path}: the {canonical} column appears twice ({seen[key]!r} and {name!r}; header "
                               "case does not matter); keep one")
        seen.setdefault(key, name)
    by_key = {str(c).strip().lower(): c for c in df.columns}
    missing = [c for c in COLUMNS if c.lower() not in by_key]
    if missing:
        found = [" ".join(str(c).split()) or "''" for c in df.columns]  # one line, whatever the header holds
        raise MedloraError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(found)[:200]}); "
            f"expected {', '.join(COLUMNS)}"
        )
    df = df[[by_key[c.lower()] for c in COLUMNS]]
    df.columns = list(COLUMNS)
    report = DataReport(path=str(path), rows_read=len(df))
    if len(df) == 0:
        raise MedloraError(f"{path}: no data rows below the header")

    for col in COLUMNS:
        df[col] = df[col].astype(str).str.strip()
    empty = (df["Question"] == "") | (df["Answer"] == "")
    report.dropped_empty = int(empty.sum())
    df = df[~empty].reset_index(drop=True)
    if len(df) == 0:
        raise MedloraError(f"{path}: no usable rows (all {report.rows_read} rows have an empty Question or Answer)")
    df.loc[df["qtype"] == "", "qtype"] = "unknown"
    report.qtype_counts = {str(k): int(v) for k, v in df["qtype"].value_counts().items()}
    return df, report


def split(df: pd.DataFrame, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic shuffled split (same rows for the same file, test_size and seed)."""
    # datasets.Dataset.train_test_split would do the same, but needs a pyarrow round trip of the whole
    # CSV; a seeded permutation gives the identical guarantee in two lines.
    n_eval = int(np.ceil(len(df) * test_size))
    if n_eval < 1 or len(df) - n_eval < 1:
        raise MedloraError(
            f"cannot split {len(df)} usable rows with test_size={test_size}: need at least one train and one eval row"
        )
    order = np.random.default_rng(seed).permutation(len(df))
    return (df.iloc[order[n_eval:]].reset_index(drop=True), df.iloc[order[:n_eval]].reset_index(drop=True))


def chat_messages(system_prompt: str, question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def prompt_text(tokenizer, system_prompt: str, question: str) -> str:
    """Exactly the text the model sees at inference time, ending where the answer starts."""
    return tokenizer.apply_chat_template(
        chat_messages(system_prompt, question), tokenize=False, add_generation_prompt=True
    )


def encode_example(tokenizer, system_prompt: str, question: str, answer: str, max_seq_len: int) -> dict:
    """Tokenise one QA pair with answer-only labels.

    Returns input_ids/attention_mask/labels, plus ``truncated`` (bool) and ``prompt_len``; returns
    ``None`` when the prompt alone leaves no room for an answer token.

    The prompt and the answer are tokenised separately so the prompt tokens are exactly those seen
    at inference. Labels are -100 on the prompt and on template whitespace after the end-of-turn
    token; the end-of-turn token itself stays in the loss even when pad == eos, or the model never
    learns to stop.
    """
    return _encode_rows(tokenizer, system_prompt, [question], [answer], max_seq_len)[0]


def _render(tokenizer, system_prompt: str, question: str, answer: str) -> tuple[str, str]:
    """(prompt, answer part) as text: the prompt exactly as inference renders it, the rest of the conversation."""
    prompt = prompt_text(tokenizer, system_prompt, question)
    full = tokenizer.apply_chat_template(chat_messages(system_prompt, question, answer), tokenize=False)
    if not full.startswith(prompt):
        raise MedloraError("the model's chat template renders the prompt differently with and without the answer; "
                           "answer-only masking needs a template whose prompt is a prefix of the full conversation")
    return prompt, full[len(prompt):]


def _assemble(prompt_ids: list[int], answer_ids: list[int], special: set[int], max_seq_len: int) -> dict | None:
    last_special = max((i for i, t in enumerate(answer_ids) if t in special), default=len(answer_ids) - 1)
    answer_labels = answer_ids[: last_special + 1] + [IGNORE_INDEX] * (len(answer_ids) - last_special - 1)
    if len(prompt_ids) >= max_seq_len:
        return None
    room = max_seq_len - len(prompt_ids)
    input_ids = prompt_ids + answer_ids[:room]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_labels[:room],
        "truncated": len(answer_ids) > room,
        "prompt_len": len(prompt_ids),
        "full_len": len(prompt_ids) + len(answer_ids),
    }


def _encode_rows(tokenizer, system_prompt: str, questions, answers, max_seq_len: int) -> list[dict | None]:
    """encode_example for many rows. The texts are tokenised in one batch call: the Rust tokenizer's per-call
    overhead (~1.5 ms) otherwise dominates, and one call per text made MedQuAD take a minute to prepare."""
    texts = [_render(tokenizer, system_prompt, q, a) for q, a in zip(questions, answers)]
    if not texts:
        return []
    from .cpu import tokenizing_on_every_core

    with tokenizing_on_every_core():
        prompt_ids = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer([a for _, a in texts], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    return [_assemble(p, a, special, max_seq_len) for p, a in zip(prompt_ids, answer_ids)]


@dataclass
class EncodedSplit:
    examples: list[dict]
    skipped_long_prompt: int = 0
    truncated: int = 0

    def features(self) -> list[dict]:
        """What the collator needs (drops the bookkeeping keys)."""
        keep = ("input_ids", "attention_mask", "labels")
        return [{k: ex[k] for k in keep} for ex in self.examples]


def encode_frame(tokenizer, df: pd.DataFrame, system_prompt: str, max_seq_len: int, progress: bool = False) -> EncodedSplit:
    out = EncodedSplit(examples=[])
    from .progress import bar as progress_bar

    bar = progress_bar(total=len(df), desc="tokenizing", unit="row", leave=False, disable=not progress)
    for i in range(0, len(df), ENCODE_CHUNK):
        chunk = df.iloc[i: i + ENCODE_CHUNK]
        bar.update(len(chunk))
        for ex in _encode_rows(tokenizer, system_prompt, chunk["Question"], chunk["Answer"], max_seq_len):
            if ex is None:
                out.skipped_long_prompt += 1
                continue
            out.truncated += ex["truncated"]
            out.examples.append(ex)
    bar.close()
    return out


ENCODE_CHUNK = 1000  # rows tokenised per batch call (and per progress-bar tick)


def make_collator(tokenizer):
    """Right-pads input_ids with the pad token and labels with -100 (pad positions never count)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def length_stats(encoded: EncodedSplit, max_seq_len: int) -> dict:
    lengths = np.array([ex["full_len"] for ex in encoded.examples] or [0])
    pct = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 95, 99)}
    n = len(encoded.examples) + encoded.skipped_long_prompt
    return {
        "tokens": {**pct, "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)},
        "max_seq_len": max_seq_len,
        "truncated_answers": encoded.truncated,
        "truncated_rate": round(encoded.truncated / n, 4) if n else 0.0,
        "skipped_long_prompt": encoded.skipped_long_prompt,
    }


def check_file(path: str | Path, load_tokenizer, tokenizer_name: str, max_seq_len: int, system_prompt: str) -> dict:
    """`medlora data check`: the CSV validated as `train` reads it (every error one line, before
    ``load_tokenizer()`` loads the tokenizer), then row counts, qtypes and token lengths at ``max_seq_len``."""
    df, report = load_qa_csv(path)
    encoded = encode_frame(load_tokenizer(), df, system_prompt, max_seq_len, progress=len(df) > 2000)
    if not encoded.examples:  # what `train` would refuse, said here rather than an "OK" over empty statistics
        raise MedloraError(f"{report.path}: no row fits max_seq_len {max_seq_len}: all {report.rows_kept} prompts "
                           "(system prompt and question) are longer; train would refuse it. Give a larger "
                           "--max_seq_len")
    return {
        "file": report.path,
        "rows_read": report.rows_read,
        "rows_kept": report.rows_kept,
        "rows_dropped_empty": report.dropped_empty,
        "qtype_counts": report.qtype_counts,
        "tokenizer": tokenizer_name,
        **length_stats(encoded, max_seq_len),
    }


def check_text(stats: dict) -> str:
    """``check_file``'s statistics as the lines `medlora data check` prints."""
    t = stats["tokens"]
    return "\n".join([
        f"{stats['file']}: OK",
        f"  rows: {stats['rows_read']} read, {stats['rows_kept']} kept, {stats['rows_dropped_empty']} dropped (empty "
        "question or answer)",
        f"  tokens per example ({stats['tokenizer']} chat template, system prompt included):",
        f"    p50 {t['p50']}  p90 {t['p90']}  p95 {t['p95']}  p99 {t['p99']}  max {t['max']}  mean {t['mean']}",
        f"  at max_seq_len {stats['max_seq_len']}: {stats['truncated_answers']} answers truncated "
        f"({100 * stats['truncated_rate']:.1f}%), {stats['skipped_long_prompt']} rows skipped (prompt alone too long)",
        "  qtype counts:",
        *[f"    {k:<20} {v}" for k, v in stats["qtype_counts"].items()],
    ])
