"""Datasets from local files: reading, chat rendering and padding (tokenizing and packing: nexus.packing).

Accepted `--dataset` values: a `.txt` file (one document per file), `.jsonl` / `.json` (records
with a `text` field, or a `messages` list rendered with the tokenizer's chat template), `.parquet`
(same fields; needs pyarrow), a folder of such files (read in sorted order), or a dataset saved
with Hugging Face `datasets.save_to_disk` (needs `datasets`). Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NexusError

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass
class Document:
    text: str
    source: str  # "file:record" for error messages and provenance


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def _record_text(record, source: str, text_field: str, tokenizer, path: Path) -> str:
    if not isinstance(record, dict):
        raise NexusError(f"{source}: expected a JSON object per record, got {type(record).__name__}")
    if text_field in record:
        value = record[text_field]
        if isinstance(value, str):
            return value
        if text_field != "messages" and not isinstance(value, list):
            raise NexusError(f"{source}: field '{text_field}' is {type(value).__name__}, expected a string")
    value = record.get("messages") if text_field in ("text", "messages") else None
    if isinstance(value, list):
        return render_chat(value, tokenizer, source)
    keys = ", ".join(sorted(record)) or "none"
    raise NexusError(f"{path}: record {source.rsplit(':', 1)[-1]} has no field '{text_field}'"
                     f"{' or messages' if text_field == 'text' else ''} (fields: {keys}); pass --text-field")


def render_chat(messages: list, tokenizer, source: str = "") -> str:
    """Render a chat (list of {role, content}) with the tokenizer's chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise NexusError(f"{source}: chat records ('messages') need a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors from malformed messages
        raise NexusError(f"{source}: cannot render messages with the chat template ({e})") from None


def _iter_file(path: Path, text_field: str, tokenizer) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield Document(path.read_text(encoding="utf-8", errors="replace"), f"{path}:0")
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NexusError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
                yield Document(_record_text(record, f"{path}:{i}", text_field, tokenizer, path), f"{path}:{i}")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise NexusError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise NexusError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}})")
        for i, record in enumerate(data):
            yield Document(_record_text(record, f"{path}:{i}", text_field, tokenizer, path), f"{path}:{i}")
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise NexusError(f"{path}: reading .parquet needs pyarrow (pip install 'nexus-moe[parquet]')") from None
        table = pq.read_table(path)
        for i, record in enumerate(table.to_pylist()):
            yield Document(_record_text(record, f"{path}:{i}", text_field, tokenizer, path), f"{path}:{i}")


def _iter_hf_dataset(path: Path, text_field: str, tokenizer, split: str | None) -> Iterator[Document]:
    try:
        import datasets
    except ImportError:
        raise NexusError(f"{path}: a saved Hugging Face dataset needs the `datasets` package") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise NexusError(f"{path}: no split '{name}' (splits: {', '.join(ds)})")
        ds = ds[name]
    for i, record in enumerate(ds):
        yield Document(_record_text(record, f"{path}:{i}", text_field, tokenizer, path), f"{path}:{i}")


def dataset_files(path: str | os.PathLike, flag: str = "--dataset") -> list[Path]:
    """The files a `--dataset` path stands for (a file, or a folder's supported files sorted)."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise NexusError(f"{flag} {p}: unsupported file type '{p.suffix}' (expected {', '.join(SUFFIXES)})")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise NexusError(f"{flag} {p}: folder holds no {', '.join(SUFFIXES)} files")
        return files
    raise NexusError(f"{flag} {p}: no such file or directory")


def iter_documents(path: str | os.PathLike, tokenizer=None, text_field: str = "text",
                   split: str | None = None, flag: str = "--dataset") -> Iterator[Document]:
    """Documents of a dataset, in a deterministic order; empty documents are skipped."""
    p = Path(path)
    if _is_saved_hf_dataset(p):
        source = _iter_hf_dataset(p, text_field, tokenizer, split)
    else:
        source = (d for f in dataset_files(p, flag) for d in _iter_file(f, text_field, tokenizer))
    for doc in source:
        if doc.text.strip():
            yield doc


def load_documents(path, tokenizer=None, text_field: str = "text", limit: int | None = None,
                   split: str | None = None) -> list[Document]:
    """All (or the first `limit`) documents; an empty dataset is a `NexusError`."""
    docs = []
    for doc in iter_documents(path, tokenizer, text_field, split):
        docs.append(doc)
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise NexusError(f"--dataset {path}: no non-empty documents")
    return docs


# Files of a saved tokenizer; a directory holding none of them has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "*.tiktoken")


class NoTokenizerError(NexusError):
    """A model directory without tokenizer files."""


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    p = Path(path)
    return any(any(p.glob(name)) if "*" in name else (p / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(model_path: str | os.PathLike, trust_remote_code: bool = False, what: str = "--model",
                   model_dir: bool = True):
    """The tokenizer of a model directory, or of an adapter's base model; errors name `what` (the flag).

    `model_dir=False` accepts a directory holding only a tokenizer (no config.json).
    """
    from transformers import AutoTokenizer

    from .adapter import is_adapter_dir, read_adapter_config, resolve_base
    from .base.loader import check_model_path, check_model_type

    path = Path(check_model_path(model_path, what, need_config=model_dir))
    if is_adapter_dir(path) and not (path / "tokenizer_config.json").is_file():
        what = f"base model of {what} {model_path}"
        path = Path(check_model_path(resolve_base(path, read_adapter_config(path).base_model_name_or_path),
                                     what, need_config=False))
    check_model_type(path, what, trust_remote_code)
    if path.is_dir() and not has_tokenizer_files(path):  # transformers would build an empty one from config.json
        raise NoTokenizerError(f"{what} {path}: no tokenizer files there ({', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise NexusError(f"{what} {path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of a tokenizer's vocabulary and special tokens (to match caches to models)."""
    import hashlib

    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()[:16]


def check_seq_len(model_or_config, seq_len: int, what: str) -> None:
    """--seq-len must fit the model's positions (`max_position_embeddings`, where the config has one)."""
    config = getattr(model_or_config, "config", model_or_config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise NexusError(f"--seq-len {seq_len} is above the {what}'s limit (max_position_embeddings = {limit})")


def pad_batch(seqs: list[list[int]], pad_id: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence (or `seq_len`). Returns input_ids (B, L) and attention_mask (B, L)."""
    length = seq_len or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:length]
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask
