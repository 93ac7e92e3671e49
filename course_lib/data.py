"""Raw instruction data to the records LoRA training reads.

The course's data is the pirate-speech version of Databricks' Dolly 15k
(``TeeZee/dolly-15k-pirate-speech`` on the Hugging Face Hub): JSON Lines whose rows hold
``instruction``, ``context`` (often empty), ``response`` and ``category``. ``mlx_lm``'s
trainers read other layouts (see ``mlx_lm/tuner/datasets.py``):

- chat: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``
- completions: ``{"prompt": ..., "completion": ...}``
- text: ``{"text": ...}``

This module converts Dolly rows to chat records (:func:`course_lib.chat.to_chat_record`:
the user turn holds the instruction and, when present, the context after a blank line),
passes the three ``mlx_lm`` layouts through unchanged, validates every row, splits with a
seeded shuffle (80/20 train/valid by default), optionally drops rows longer than
``max_tokens`` under a tokenizer (dropping, not truncating: a truncated row teaches the
model to stop mid-answer), and writes ``train.jsonl``/``valid.jsonl``/``test.jsonl``
atomically (:mod:`course_lib.atomic`).

CLI::

    python -m course_lib.data INPUT OUT_DIR [--valid-fraction 0.2] [--test-fraction 0]
        [--seed 0] [--max-tokens N --tokenizer PATH|default] [--skip-invalid]
    python -m course_lib.data --download DIR     # the full 15k set, when online
"""

from __future__ import annotations

if __name__ == "__main__":  # before MLX loads (the tokenizer filter imports it)
    from course_lib.blas import reexec_with_fast_blas

    reexec_with_fast_blas()

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from course_lib import atomic
from course_lib.chat import to_chat_record
from course_lib.models import ModelError, resolve

DOLLY_FIELDS = ("instruction", "context", "response", "category")
HF_REPO_ID = "TeeZee/dolly-15k-pirate-speech"
HF_FILENAME = "databricks-dolly-15k-arr.jsonl"
FORMATS = ("dolly", "messages", "completions", "text")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A row or file that cannot be used; the message names the file and line."""


class DatasetDownloadError(RuntimeError):
    """The full dataset could not be downloaded; the message says what to do instead."""


def row_format(row: dict) -> str | None:
    """Which layout a row is in: ``dolly``, ``messages``, ``completions``, ``text``, or None.

    Decided by its keys, in ``mlx_lm``'s order (prompt/completion, then messages, then
    text); a row with ``instruction`` and ``response`` is Dolly.
    """
    if "prompt" in row and "completion" in row:
        return "completions"
    if "messages" in row:
        return "messages"
    if "text" in row:
        return "text"
    if "instruction" in row or "response" in row:
        return "dolly"
    return None


def _nonempty_string(row: dict, key: str, may_be_empty: bool = False) -> str | None:
    """Why ``row[key]`` is not a (non-empty) string, or None when it is fine."""
    if key not in row:
        return f"missing field '{key}'"
    value = row[key]
    if not isinstance(value, str):
        return f"field '{key}' must be a string, got {type(value).__name__}"
    if not may_be_empty and not value.strip():
        return f"field '{key}' is empty"
    return None


def validate_row(row, fmt: str) -> str | None:
    """Why ``row`` is not a valid record of layout ``fmt``, or None when it is valid."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if fmt == "dolly":
        for key in DOLLY_FIELDS:
            problem = _nonempty_string(row, key, may_be_empty=key in ("context", "category"))
            if problem:
                return problem
        return None
    if fmt == "completions":
        return _nonempty_string(row, "prompt") or _nonempty_string(row, "completion")
    if fmt == "text":
        return _nonempty_string(row, "text")
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            return "field 'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                return f"messages[{i}] must be an object"
            if m.get("role") not in ROLES:
                return f"messages[{i}] has role {m.get('role')!r}; expected one of {ROLES}"
            problem = _nonempty_string(m, "content")
            if problem:
                return f"messages[{i}]: {problem}"
        if not any(m["role"] == "assistant" for m in messages):
            return "no assistant message to learn from"
        return None
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


@dataclass
class ReadResult:
    """What :func:`read_records` found: the records, their layout and what was skipped."""

    records: list[dict]
    fmt: str
    skipped: list[str] = field(default_factory=list)  # "file:line: reason", with skip_invalid


def read_records(path: str | Path, skip_invalid: bool = False) -> ReadResult:
    """Read a JSON Lines file of one layout, validate every row, convert Dolly rows to chat.

    Every bad row (not JSON, not an object, a missing, non-string or empty field, a layout
    other than the file's first row's, a blank line) raises :class:`DataError` naming
    ``file:line``; with ``skip_invalid`` it is skipped and listed in ``skipped`` instead.
    An empty file, a missing file or one with no valid rows always raises.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records: list[dict] = []
    skipped: list[str] = []
    fmt = None
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last row
    if not lines:
        raise DataError(f"{path}: the file is empty")
    for lineno, line in enumerate(lines, 1):
        problem = None
        row = None
        if not line.strip():
            problem = "blank line"
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
        if problem is None:
            this = row_format(row) if isinstance(row, dict) else None
            if isinstance(row, dict) and this is None:
                problem = ("no known fields: expected instruction/context/response/category, "
                           "messages, prompt/completion or text")
            elif fmt is not None and this is not None and this != fmt:
                problem = f"row is in {this} layout but the file started in {fmt} layout"
            else:
                problem = validate_row(row, this or "dolly")
        if problem:
            message = f"{path}:{lineno}: {problem}"
            if not skip_invalid:
                raise DataError(message + " (use --skip-invalid to skip bad rows)")
            skipped.append(message)
            continue
        fmt = fmt or row_format(row)
        records.append(to_chat_record(row) if fmt == "dolly" else row)
    if not records:
        raise DataError(f"{path}: no valid rows ({len(skipped)} skipped)")
    return ReadResult(records, fmt, skipped)


def split_records(records: list, valid_fraction: float = 0.2, test_fraction: float = 0.0,
                  seed: int = 0) -> tuple[list, list, list]:
    """Seeded shuffle, then ``(train, valid, test)``.

    ``valid`` gets ``round(n * valid_fraction)`` rows and ``test`` ``round(n *
    test_fraction)``; train the rest. Raises ``ValueError`` for fractions outside [0, 1),
    summing to 1 or more, or leaving a non-zero share with no row.
    """
    import numpy as np

    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError("--valid-fraction plus --test-fraction must be below 1")
    n = len(records)
    order = np.random.default_rng(seed).permutation(n)
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    for name, frac, count in (("valid", valid_fraction, n_valid), ("test", test_fraction, n_test)):
        if frac > 0 and count == 0:
            raise ValueError(f"{n} rows are too few for a {name} share of {frac}")
    if n - n_valid - n_test < 1:
        raise ValueError(f"{n} rows leave no training rows")
    shuffled = [records[i] for i in order]
    valid = shuffled[:n_valid]
    test = shuffled[n_valid:n_valid + n_test]
    train = shuffled[n_valid + n_test:]
    return train, valid, test


def token_length(record: dict, tokenizer) -> int:
    """Tokens in ``record`` as ``mlx_lm``'s datasets tokenize it (chat template for chat and
    completions records; plain text plus the end-of-sequence token for text records)."""
    fmt = row_format(record)
    if fmt == "messages":
        return len(tokenizer.apply_chat_template(record["messages"], return_dict=False))
    if fmt == "completions":
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
        return len(tokenizer.apply_chat_template(messages, return_dict=False))
    ids = tokenizer.encode(record["text"])
    return len(ids) + (ids[-1] != tokenizer.eos_token_id)


def filter_by_tokens(records: list, tokenizer, max_tokens: int) -> tuple[list, list, list[int]]:
    """Drop (never truncate) records longer than ``max_tokens`` tokens.

    Returns ``(kept, dropped, lengths)`` where ``lengths`` are the token counts of all
    ``records`` in order. Raises ``ValueError`` when ``max_tokens < 1``.
    """
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    lengths = [token_length(r, tokenizer) for r in records]
    kept = [r for r, n in zip(records, lengths) if n <= max_tokens]
    dropped = [r for r, n in zip(records, lengths) if n > max_tokens]
    return kept, dropped, lengths


def load_tokenizer(name: str):
    """A tokenizer by course model name (``smollm2``, ``tiny``; ``default`` is the course's
    model, smollm2), model folder or Hugging Face id; named models are built on first use.
    Returns ``mlx_lm``'s ``TokenizerWrapper``."""
    from mlx_lm.utils import load_tokenizer as _load

    name = resolve("smollm2" if name == "default" else name)
    return _load(Path(name) if Path(name).exists() else name)


def prepare(input_path: str | Path, out_dir: str | Path, valid_fraction: float = 0.2,
            test_fraction: float = 0.0, seed: int = 0, max_tokens: int | None = None,
            tokenizer=None, skip_invalid: bool = False) -> dict:
    """Read, validate, convert, split, filter and write ``train/valid[/test].jsonl``.

    Nothing is written unless every step succeeds, and each file is replaced atomically.
    ``tokenizer`` (an object with ``apply_chat_template``/``encode``) is required with
    ``max_tokens``. Returns a summary: counts per split, rows skipped and dropped, the
    longest row in tokens. Raises :class:`DataError` or ``ValueError`` on bad input.
    """
    if max_tokens is not None and tokenizer is None:
        raise ValueError("--max-tokens needs --tokenizer")
    result = read_records(input_path, skip_invalid=skip_invalid)
    records = result.records
    summary = {"input": str(input_path), "format": result.fmt, "rows": len(records),
               "skipped": len(result.skipped), "skipped_rows": result.skipped, "dropped": 0}
    if max_tokens is not None:
        records, dropped, lengths = filter_by_tokens(records, tokenizer, max_tokens)
        summary.update(dropped=len(dropped), max_tokens=max_tokens, longest=max(lengths))
        if not records:
            raise ValueError(f"every row is longer than --max-tokens {max_tokens}")
    train, valid, test = split_records(records, valid_fraction, test_fraction, seed)
    out_dir = atomic.make_folder(out_dir)
    splits = {"train": train, "valid": valid, "test": test}
    for name, rows in splits.items():
        if rows:
            atomic.write_jsonl(out_dir / f"{name}.jsonl", rows)
    summary.update({name: len(rows) for name, rows in splits.items()})
    summary["out_dir"] = str(out_dir)
    return summary


def _check_reachable(url: str, timeout: float = 5.0) -> None:
    """Raise ``OSError`` at once when ``url``'s host cannot be reached (no DNS, no route):
    ``huggingface_hub`` would otherwise retry for ~20 s, printing each retry. Skipped
    behind a proxy (``HTTPS_PROXY`` and friends: the host is reached through it) and with
    ``HF_HUB_OFFLINE`` set (the file comes from the local cache)."""
    import socket
    from urllib.parse import urlsplit

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in proxies):
        return

    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise OSError(f"no connection to {host}:{port}: {e}") from e


def download_dataset(dest_dir: str | Path | None = None, repo_id: str = HF_REPO_ID,
                     filename: str = HF_FILENAME) -> Path:
    """Download the full pirate Dolly set with ``huggingface_hub``; return the file's path.

    ``dest_dir`` (default: the Hugging Face cache) receives ``filename``. Raises
    :class:`DatasetDownloadError` with what to do when the Hub cannot be reached (offline,
    firewall) or the file is missing.
    """
    from huggingface_hub import constants, hf_hub_download

    try:
        _check_reachable(constants.ENDPOINT)
        path = hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset",
                               local_dir=str(dest_dir) if dest_dir else None)
    except Exception as e:  # huggingface_hub raises many kinds: offline, HTTP, not found
        raise DatasetDownloadError(
            f"could not download {filename} from the Hugging Face dataset {repo_id} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}).\n"
            "You are probably offline. Either connect and run this again, or fetch the file "
            f"on a machine that is online (https://huggingface.co/datasets/{repo_id}) and "
            "pass its path to `python -m course_lib.data FILE OUT_DIR`. The course's sample "
            "in data-sets/ needs no download."
        ) from e
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m course_lib.data",
        description="Convert raw instruction JSONL (pirate Dolly schema, or mlx_lm's chat, "
        "completions and text layouts) to train/valid/test splits for LoRA training.")
    parser.add_argument("input", nargs="?", help="raw JSON Lines file")
    parser.add_argument("out_dir", nargs="?", help="folder for train.jsonl, valid.jsonl, test.jsonl")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="validation share (default 0.2)")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="test share (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--max-tokens", type=int, help="drop rows longer than this many tokens")
    parser.add_argument("--tokenizer", help="whose tokenizer counts tokens: smollm2 (the course's "
                        "model; 'default' means it too), tiny, a model folder or a Hub id")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count bad rows instead of stopping")
    parser.add_argument("--download", metavar="DIR", help="download the full dataset into DIR and exit")
    args = parser.parse_args(argv)

    try:
        if args.download:
            print(download_dataset(args.download))
            return 0
        if not args.input or not args.out_dir:
            parser.error("INPUT and OUT_DIR are required (or --download DIR)")
        if args.max_tokens is not None and not args.tokenizer:
            parser.error("--max-tokens needs --tokenizer (smollm2, tiny, a model folder or a Hub id)")
        tokenizer = load_tokenizer(args.tokenizer) if args.max_tokens is not None else None
        s = prepare(args.input, args.out_dir, args.valid_fraction, args.test_fraction,
                    args.seed, args.max_tokens, tokenizer, args.skip_invalid)
    except (DataError, ValueError, DatasetDownloadError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except atomic.WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 5
    for line in s["skipped_rows"]:
        print(f"skipped {line}", file=sys.stderr)
    print(f"read {s['rows'] + s['skipped']} rows ({s['format']} layout) from {s['input']}: "
          f"{s['skipped']} skipped as invalid")
    if "max_tokens" in s:
        print(f"dropped {s['dropped']} rows longer than {s['max_tokens']} tokens "
              f"(longest: {s['longest']})")
    print(f"wrote {s['train']} train, {s['valid']} valid, {s['test']} test rows to {s['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
