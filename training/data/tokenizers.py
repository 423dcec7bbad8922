"""Tokenizers for the LM data: a byte-level tiktoken encoding that needs nothing, GPT-2's BPE, and a Hugging Face
``tokenizer.json`` (``tokenizer=hf``: a checkpoint's own tokenizer, e.g. Llama's, read with the ``tokenizers``
library).

GPT-2's table is looked for locally first (a ``.tiktoken`` file named in the config, then tiktoken's own
cache), and only then downloaded, after a short reachability probe: without a network, loading fails in
seconds with a message saying how to get the table, never hangs in an HTTP call.
"""
from __future__ import annotations

import base64
import hashlib
import os
import socket
import tempfile
import threading

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
# Any byte sequence matches in chunks, so the byte encoding drops nothing; chunks bound the BPE work per piece.
_BYTE_PATTERN = r"[\s\S]{1,64}"
# GPT-2's pre-tokenizer regex (the r50k/gpt2 one tiktoken ships).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# The files tiktoken downloads for "gpt2" / "r50k_base" (same ranks), with the hashes it checks them against.
_GPT2_URLS = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
_R50K_HASH = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_PROBE_HOST = "openaipublic.blob.core.windows.net"


class Tokenizer:
    """A tiktoken encoding with the interface the trainer and eval use.

    ``encode`` treats its text literally (a literal ``<|endoftext|>`` in the text is not the special token);
    documents are separated by appending ``eot_token_id`` explicitly.
    """

    def __init__(self, encoding: tiktoken.Encoding, name: str):
        self.encoding = encoding
        self.name = name
        self.vocab_size = encoding.n_vocab
        self.eot_token_id = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids])

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (special tokens count 0: they are not text), for bits per byte."""
        special = set(self.encoding.special_tokens_set)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self.encoding.decode_single_token_bytes(i)
            lengths[i] = 0 if piece.decode("utf-8", "replace") in special else len(piece)
        return lengths

    def fingerprint(self) -> str:
        """Changes whenever any id would encode or decode differently: the data cache is keyed by it."""
        h = hashlib.sha256(self.encoding._pat_str.encode())
        for i in range(self.vocab_size):
            piece = self.encoding.decode_single_token_bytes(i)
            h.update(len(piece).to_bytes(4, "little") + piece)
        return h.hexdigest()

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def byte_tokenizer() -> Tokenizer:
    """256 single-byte ids plus end-of-text (id 256): vocab 257, works offline, lossless on any text."""
    enc = tiktoken.Encoding(
        name="bytes",
        pat_str=_BYTE_PATTERN,
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={EOT: 256},
    )
    return Tokenizer(enc, "bytes")


def read_tiktoken_file(path: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` table (one ``base64(token) rank`` per line) without tiktoken's URL cache."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer_file {path!r} does not exist")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"tokenizer_file {path!r}, line {lineno}: expected 'base64token rank'") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"tokenizer_file {path!r}: ranks must be 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _file_tokenizer(path: str, name: str) -> Tokenizer:
    ranks = read_tiktoken_file(path)
    enc = tiktoken.Encoding(name=name, pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={EOT: len(ranks)})
    return Tokenizer(enc, name)


def tiktoken_cache_dir() -> str:
    """Where tiktoken keeps downloaded tables (the same rule tiktoken itself follows)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cached_ok(url: str, sha256: str) -> bool:
    path = os.path.join(tiktoken_cache_dir(), hashlib.sha1(url.encode()).hexdigest())
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest() == sha256


def offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("TRIFORMER_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def network_reachable(host: str = _PROBE_HOST, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds.

    The probe runs in a daemon thread because name resolution ignores socket timeouts and can stall.
    """
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except Exception:  # any failure to connect (refused, unresolvable, blocked) means offline
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def gpt2_tokenizer(tokenizer_file: str | None = None) -> Tokenizer:
    """GPT-2's BPE (50257 ids, end-of-text 50256), from local files when they exist."""
    if tokenizer_file is not None:
        digest = _sha256_file(tokenizer_file)
        if digest != _R50K_HASH:
            raise ValueError(
                f"tokenizer_file {tokenizer_file!r} is not GPT-2's table (sha256 {digest[:12]}..., expected "
                f"{_R50K_HASH[:12]}...); use tokenizer=tiktoken_file for other tables"
            )
        return _file_tokenizer(tokenizer_file, "gpt2")
    if all(_cached_ok(u, h) for u, h in _GPT2_URLS.items()):
        return Tokenizer(tiktoken.get_encoding("gpt2"), "gpt2")
    if _cached_ok(_R50K_URL, _R50K_HASH):
        return Tokenizer(tiktoken.get_encoding("r50k_base"), "gpt2")
    if offline_requested() or not network_reachable():
        raise RuntimeError(
            "GPT-2's BPE table is not available locally and the network is unreachable (or offline mode is "
            f"set). Either copy {_R50K_URL} to a local file and set data.tokenizer_file=/path/to/gpt2.tiktoken, "
            "or on a machine with network run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` "
            f"and copy its cache directory to {tiktoken_cache_dir()} (or point TIKTOKEN_CACHE_DIR at it)."
        )
    return Tokenizer(tiktoken.get_encoding("gpt2"), "gpt2")


def _sha256_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer_file {path!r} does not exist")
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (as a ``save_pretrained`` directory holds it) with ``Tokenizer``'s
    interface. Text is encoded without the tokenizer's special tokens (no BOS); documents are separated by its
    end-of-sequence token, named by the directory's ``tokenizer_config.json`` (``eos_token``) or
    ``config.json`` (``eos_token_id``)."""

    def __init__(self, path: str | os.PathLike):
        import json
        from pathlib import Path

        from tokenizers import Tokenizer as _HF

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        file = directory / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer=hf needs a tokenizer.json; {file} does not exist")
        self.tokenizer = _HF.from_file(str(file))
        self.name = f"hf-{directory.name}"
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        eos = None
        for name, key in (("tokenizer_config.json", "eos_token"), ("config.json", "eos_token_id")):
            if (directory / name).is_file():
                value = json.loads((directory / name).read_text()).get(key)
                value = value.get("content") if isinstance(value, dict) else value
                value = value[0] if isinstance(value, list) and value else value
                eos = self.tokenizer.token_to_id(value) if isinstance(value, str) else value
                if isinstance(eos, int):
                    break
        if not isinstance(eos, int):
            raise ValueError(f"{directory}: no end-of-sequence token (eos_token in tokenizer_config.json or "
                             "eos_token_id in config.json) to separate documents with")
        self.eot_token_id = eos

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of each id decoded alone (special tokens 0). A token holding part of a multi-byte
        character decodes to U+FFFD, so bits per byte are approximate on such text."""
        special = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self.tokenizer.id_to_token(i)
            lengths[i] = 0 if token is None or token in special else len(self.tokenizer.decode([i]).encode())
        return lengths

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name: str, tokenizer_file: str | None = None) -> Tokenizer | HFTokenizer:
    """``name``: "bytes" (offline byte level), "gpt2", "tiktoken_file" (any table in ``tokenizer_file``,
    GPT-2's pre-tokenizer, end-of-text appended as the last id), or "hf" (``tokenizer_file``: a Hugging Face
    ``save_pretrained`` directory or its ``tokenizer.json``)."""
    if name in ("bytes", "byte"):
        if tokenizer_file is not None:
            raise ValueError("tokenizer_file is only used with tokenizer=gpt2 or tokenizer=tiktoken_file")
        return byte_tokenizer()
    if name == "gpt2":
        return gpt2_tokenizer(tokenizer_file)
    if name == "tiktoken_file":
        if tokenizer_file is None:
            raise ValueError("tokenizer=tiktoken_file needs tokenizer_file=/path/to/table.tiktoken")
        return _file_tokenizer(tokenizer_file, f"tiktoken-{_sha256_file(tokenizer_file)[:12]}")
    if name == "hf":
        if tokenizer_file is None:
            raise ValueError("tokenizer=hf needs tokenizer_file=/path/to/save_pretrained_dir (or its tokenizer.json)")
        return HFTokenizer(tokenizer_file)
    raise ValueError(f"tokenizer must be 'bytes', 'gpt2', 'tiktoken_file' or 'hf', got {name!r}")
