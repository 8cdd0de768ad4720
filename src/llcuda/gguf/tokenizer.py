"""Tokenizers built from GGUF `tokenizer.ggml.*` metadata, behaving as llama.cpp's `llama_vocab`.

`Tokenizer.from_metadata(metadata)` reads the vocabulary the way llama.cpp's
`llama_vocab::impl::load` does (src/llama-vocab.cpp): token types become attributes, special ids
come from defaults then `*_token_id` keys, EOT-like tokens are found by their text, and
`add_bos` / `add_eos` / `add_space_prefix` follow the model's defaults unless the file overrides
them. `encode` first splits out special tokens (longest text first), then hands each raw-text
fragment to the model's algorithm: `llama` (SPM, tokenizer_spm.py) or `gpt2` (byte-level BPE,
tokenizer_bpe.py). `decode` and `token_to_piece` follow llama.cpp's `detokenize` and
`token_to_piece`, including the leading-space rule and BPE's `clean_spaces` passes.

Engine note: chat templates that begin with the BOS text (Gemma's does) must be encoded with
`add_special=False`, or the prompt starts with two BOS tokens (see `ChatTemplate.adds_bos`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from enum import IntFlag
from typing import Any

import numpy as np

from llcuda.gguf.reader import GGUFError
from llcuda.gguf.tokenizer_bpe import (
    BpeModel,
    apply_clean_spaces,
    bpe_pre,
    byte_decode,
    parse_merges,
)
from llcuda.gguf.tokenizer_spm import SpmEncoder


class TokenAttr(IntFlag):
    """llama.cpp's `llama_token_attr` bits (include/llama.h)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# `tokenizer.ggml.token_type` values (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
# 6 byte) -> attributes; anything else is UNDEFINED.
_TYPE_TO_ATTR = np.array(
    [0, TokenAttr.NORMAL, TokenAttr.UNKNOWN, TokenAttr.CONTROL, TokenAttr.USER_DEFINED,
     TokenAttr.UNUSED, TokenAttr.BYTE],
    dtype=np.int32,
)  # fmt: skip

# Plain ints for the hot paths (IntFlag arithmetic is slow).
_NORMAL = int(TokenAttr.NORMAL)
_CONTROL = int(TokenAttr.CONTROL)
_USER_DEFINED = int(TokenAttr.USER_DEFINED)
_BYTE = int(TokenAttr.BYTE)
_UNUSED = int(TokenAttr.UNUSED)
_LSTRIP = int(TokenAttr.LSTRIP)
_RSTRIP = int(TokenAttr.RSTRIP)
_SPECIAL = int(TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN)
_HIDDEN = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN)  # rendered only when special=True
_ASCII_SPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale

# Texts llama.cpp recognises by name (llama-vocab.cpp, "auto-detect special tokens by text").
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
)  # fmt: skip
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
)  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# Special-id metadata keys (note llama.cpp's spelling "seperator").
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
    "fim_pre": "tokenizer.ggml.fim_pre_token_id",
    "fim_suf": "tokenizer.ggml.fim_suf_token_id",
    "fim_mid": "tokenizer.ggml.fim_mid_token_id",
    "fim_pad": "tokenizer.ggml.fim_pad_token_id",
    "fim_rep": "tokenizer.ggml.fim_rep_token_id",
    "fim_sep": "tokenizer.ggml.fim_sep_token_id",
}
_DEPRECATED_ID_KEYS = {
    "fim_pre": "tokenizer.ggml.prefix_token_id",
    "fim_suf": "tokenizer.ggml.suffix_token_id",
    "fim_mid": "tokenizer.ggml.middle_token_id",
}


_FLAG_KEYS = (
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_sep_token",
    "tokenizer.ggml.add_space_prefix",
)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _describe(value: Any) -> str:
    """A short name of what a metadata value is, for errors: 'str', 'array of 3 INT32', ..."""
    if isinstance(value, np.ndarray):
        return f"an array of {value.size} {value.dtype.name}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value[:1000]})
        return f"an array of {len(value)} {'/'.join(kinds) or 'values'}"
    return f"{type(value).__name__} {value!r:.40}"


def _strings(metadata: Mapping[str, Any], key: str) -> list[str | bytes]:
    value = metadata[key]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, bytes)) for v in value):
        raise GGUFError(f"{key} must be an array of strings, got {_describe(value)}")
    return list(value)


def _array(metadata: Mapping[str, Any], key: str, n: int, kinds: str) -> np.ndarray | None:
    """metadata[key] as a 1-D numpy array of n numbers of a dtype kind in `kinds` ('iu', 'fiu')."""
    if key not in metadata:
        return None
    value = metadata[key]
    what = "integers" if kinds == "iu" else "numbers"
    arr = None
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged nested lists
            arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in kinds or arr.shape[0] != n:
        raise GGUFError(
            f"{key} must be an array of {n} {what} (one per token), got {_describe(value)}"
        )
    return arr


def _validate_metadata(metadata: Mapping[str, Any]) -> None:
    """Refuse wrongly typed `tokenizer.ggml.*` values at load, naming the key and the type wanted
    (llama.cpp's gguf_get_* refuse a key of the wrong type the same way)."""
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        if key in metadata and not isinstance(metadata[key], (str, bytes)):
            raise GGUFError(f"{key} must be a string, got {_describe(metadata[key])}")
    for key in _FLAG_KEYS:
        if key in metadata and not isinstance(metadata[key], (bool, np.bool_)):
            raise GGUFError(f"{key} must be a bool, got {_describe(metadata[key])}")
    for key in (*_ID_KEYS.values(), *_DEPRECATED_ID_KEYS.values()):
        value = metadata.get(key)
        if value is not None and (
            isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer))
        ):
            raise GGUFError(f"{key} must be an integer token id, got {_describe(value)}")
    if "tokenizer.ggml.merges" in metadata:
        _strings(metadata, "tokenizer.ggml.merges")


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's tokenize / token_to_piece / detokenize behaviour.

    Build it with `Tokenizer.from_metadata(metadata)`; `metadata` maps GGUF keys to plain
    values (strings, ints, bools, lists or numpy arrays).
    """

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        if "tokenizer.ggml.model" not in metadata:
            raise GGUFError("GGUF metadata has no tokenizer.ggml.model")
        _validate_metadata(metadata)
        self.model = _as_str(metadata["tokenizer.ggml.model"])
        if self.model not in ("llama", "gpt2"):
            raise GGUFError(
                f"unsupported tokenizer model tokenizer.ggml.model={self.model!r} "
                "(supported: 'llama' (SPM), 'gpt2' (BPE))"
            )
        if "tokenizer.ggml.tokens" not in metadata:
            raise GGUFError("GGUF metadata has no tokenizer.ggml.tokens")
        texts = _strings(metadata, "tokenizer.ggml.tokens")
        if set(map(type, texts)) != {str}:
            texts = [_as_str(t) for t in texts]
        n = len(texts)
        if n == 0:
            raise GGUFError("tokenizer.ggml.tokens is empty")
        if "" in texts:  # llama.cpp renames empty tokens so they stay distinct
            texts = [t or f"[EMPTY_{i}]" for i, t in enumerate(texts)]
        self._texts = texts
        # Later duplicates win, as with llama.cpp's `token_to_id[word] = i`.
        self._token_to_id: dict[str, int] = dict(zip(texts, range(n), strict=True))

        scores = _array(metadata, "tokenizer.ggml.scores", n, "fiu")
        if scores is not None and not np.isfinite(scores).all():
            bad = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise GGUFError(f"tokenizer.ggml.scores[{bad}] is {scores[bad]}, not a finite number")
        self._scores: list[float] = (
            [0.0] * n if scores is None else scores.astype(np.float32).tolist()
        )
        types = _array(metadata, "tokenizer.ggml.token_type", n, "iu")
        if types is None:
            attrs = np.full(n, _NORMAL, dtype=np.int32)
        else:
            types = types.astype(np.int64)  # uint64 ids above 2**63 wrap negative: UNDEFINED
            for tid in np.flatnonzero(types == 6).tolist():  # BYTE tokens render as <0xNN>
                if not _BYTE_TOKEN.fullmatch(texts[tid]):
                    raise GGUFError(
                        f"tokenizer.ggml.token_type[{tid}] marks {texts[tid]!r:.40} as a byte "
                        f"token, but byte tokens are written <0xNN>"
                    )
            in_range = (types >= 0) & (types < len(_TYPE_TO_ATTR))
            attrs = np.where(in_range, _TYPE_TO_ATTR[np.clip(types, 0, len(_TYPE_TO_ATTR) - 1)], 0)
        # A numpy array while the load-time fixes below run, a list afterwards (fast indexing).
        self._attrs: Any = attrs.astype(np.int32)

        pre_name = _as_str(metadata.get("tokenizer.ggml.pre", ""))
        self.pre = pre_name
        self._bpe: BpeModel | None = None
        self._spm: SpmEncoder | None = None
        if self.model == "llama":
            self._spm = SpmEncoder(self._token_to_id, self._scores, self._byte_to_token)
            ids = {"bos": 1, "eos": 2, "unk": 0}
            self.add_space_prefix, self.add_bos, self.add_eos = True, True, False
            self.clean_spaces = False
        else:
            if "tokenizer.ggml.merges" not in metadata:
                raise GGUFError("BPE tokenizer (gpt2) needs tokenizer.ggml.merges")
            try:
                pre = bpe_pre(pre_name)
            except ValueError as exc:
                raise GGUFError(str(exc)) from None
            merges = parse_merges(_strings(metadata, "tokenizer.ggml.merges"))
            self._bpe = BpeModel(pre, self._token_to_id, merges)
            ids = {"bos": 11, "eos": 11}
            self.add_space_prefix, self.add_bos, self.add_eos = False, bool(pre.add_bos), False
            self.clean_spaces = pre.clean_spaces
        if "tokenizer.ggml.add_space_prefix" in metadata:
            self.add_space_prefix = bool(metadata["tokenizer.ggml.add_space_prefix"])

        # Special ids: defaults outside the vocabulary are disabled; metadata ids win when valid.
        self._ids: dict[str, int | None] = {}
        for name, key in _ID_KEYS.items():
            default = ids.get(name)
            if default is not None and default >= n:
                default = None
            for k in (key, _DEPRECATED_ID_KEYS.get(name)):
                if k is not None and k in metadata and 0 <= int(metadata[k]) < n:
                    default = int(metadata[k])
            self._ids[name] = default
        if "tokenizer.ggml.add_bos_token" in metadata:
            self.add_bos = bool(metadata["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_eos_token" in metadata:
            self.add_eos = bool(metadata["tokenizer.ggml.add_eos_token"])
        # out-of-range ids are ignored above (llama.cpp warns and keeps the default), but a
        # prompt cannot start with a BOS that does not exist: refuse now, not at the first prompt
        for name, flag in (("bos", self.add_bos), ("eos", self.add_eos)):
            if flag and self._ids[name] is None:
                key = _ID_KEYS[name]
                why = (
                    f"{key} = {metadata[key]} is not an id in [0, {n})"
                    if key in metadata
                    else f"no {key} and the default id is not in the vocabulary of {n}"
                )
                raise GGUFError(
                    f"tokenizer.ggml.add_{name}_token is set but there is no {name.upper()} "
                    f"token: {why}"
                )

        self._detect_special_by_text()
        self.eog_ids: frozenset[int] = self._find_eog()
        for text in _ALWAYS_RENDERED:
            tid = self._token_to_id.get(text)
            if tid is not None:
                self._attrs[tid] = _USER_DEFINED

        # Special tokens for the pre-split, longest UTF-8 text first (llama.cpp sorts by byte
        # length; equal lengths keep id order here, where llama.cpp's std::sort is unspecified).
        special = np.nonzero(self._attrs & _SPECIAL)[0].tolist()
        self._attrs = self._attrs.tolist()
        special.sort(key=lambda i: -len(texts[i].encode("utf-8")))
        self._special_order = {tid: rank for rank, tid in enumerate(special)}
        self._special_trie = self._build_trie(special)
        self._set_strip_attrs(metadata, special)
        self._piece_cache: dict[int, bytes] = {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (`tokenizer.ggml.*`, plus `general.name` for llama.cpp's
        per-model token attribute fixes)."""
        return cls(metadata)

    # ---- construction helpers ----------------------------------------------------------------

    def _first_id(self, candidates: Iterable[str]) -> int | None:
        found = [self._token_to_id[t] for t in candidates if t in self._token_to_id]
        return min(found) if found else None

    def _make_control(self, tid: int) -> None:
        self._attrs[tid] |= _CONTROL

    def _detect_special_by_text(self) -> None:
        # llama.cpp picks whichever matching token its hash map yields first; we take the lowest
        # id. The chosen token is forced to CONTROL, as llama.cpp does.
        for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), *_FIM_TEXTS.items()):
            if self._ids.get(name) is None:
                tid = self._first_id(texts)
                if tid is not None:
                    self._ids[name] = tid
                    self._make_control(tid)
        # Control tokens named "...unused..." are unused.
        for tid in np.nonzero(self._attrs & _CONTROL)[0].tolist():
            if "unused" in self._texts[tid]:
                self._attrs[tid] |= _UNUSED

    def _find_eog(self) -> frozenset[int]:
        eog: set[int] = set()
        for name in ("fim_pad", "fim_rep", "fim_sep"):
            if self._ids[name] is not None:
                eog.add(self._ids[name])
        for text in _EOG_TEXTS:
            tid = self._token_to_id.get(text)
            if tid is not None:
                eog.add(tid)
                self._make_control(tid)
        for name in ("eos", "eot", "eom"):
            if self._ids[name] is not None:
                eog.add(self._ids[name])
        by_text = {self._texts[t]: t for t in eog}
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation.
        if "<|end|>" in by_text and (
            ("<|return|>" in by_text and ("<|call|>" in by_text or "<|calls|>" in by_text))
            or (("<|call|>" in by_text or "<|calls|>" in by_text) and "<|flush|>" in by_text)
        ):
            end = by_text["<|end|>"]
            eog.discard(end)
            self._attrs[end] = _USER_DEFINED
        # gemma4 / plamo: "</s>" is an ordinary token there.
        if "</s>" in by_text and ("<|tool_response>" in by_text or "<|plamo:eos|>" in by_text):
            s = by_text["</s>"]
            eog.discard(s)
            self._attrs[s] = _NORMAL
        return frozenset(eog)

    def _build_trie(self, special: Sequence[int]) -> dict:
        # Character trie of special-token texts; key None holds the token id ending there.
        root: dict = {}
        for tid in special:
            node = root
            for ch in self._texts[tid]:
                node = node.setdefault(ch, {})
            node.setdefault(None, tid)
        return root

    def _set_strip_attrs(self, metadata: Mapping[str, Any], special: Sequence[int]) -> None:
        # llama.cpp sets LSTRIP/RSTRIP for a few models by name (GGUF files do not carry them).
        name = _as_str(metadata.get("general.name", "")).lower()
        arch = _as_str(metadata.get("general.architecture", ""))
        get = self._token_to_id.get

        def set_attr(tid: int | None, attr: TokenAttr, value: bool) -> None:
            if tid is not None:
                bit = int(attr)
                self._attrs[tid] = (self._attrs[tid] | bit) if value else (self._attrs[tid] & ~bit)

        if any(p in self.pre for p in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
            a in arch for a in ("nomic-bert-moe", "jina-bert-v3")
        ):
            set_attr(get("<mask>"), TokenAttr.LSTRIP, True)
        elif "phi-3" in name or "phi3" in name:
            for tid in special:
                set_attr(tid, TokenAttr.RSTRIP, True)
            set_attr(get("</s>"), TokenAttr.RSTRIP, True)
            for text in ("<unk>", "<s>", "<|endoftext|>"):
                set_attr(get(text), TokenAttr.RSTRIP, False)
        elif "modern-bert" in name:
            set_attr(get("[MASK]"), TokenAttr.LSTRIP, True)

    # ---- properties ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._texts)

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def eot_id(self) -> int | None:
        return self._ids["eot"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    def _check_id(self, token_id: int) -> int:
        if not isinstance(token_id, (int, np.integer)) or isinstance(token_id, bool):
            raise TypeError(f"token id must be an int, got {type(token_id).__name__}")
        if not 0 <= token_id < len(self._texts):
            raise ValueError(f"token id {token_id} out of range [0, {len(self._texts)})")
        return int(token_id)

    def token_text(self, token_id: int) -> str:
        """The vocabulary string of a token (`▁` and `<0xNN>` left as stored)."""
        return self._texts[self._check_id(token_id)]

    def token_attr(self, token_id: int) -> TokenAttr:
        return TokenAttr(self._attrs[self._check_id(token_id)])

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[self._check_id(token_id)] & _CONTROL)

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def text_to_token(self, text: str) -> int | None:
        return self._token_to_id.get(text)

    # ---- encode --------------------------------------------------------------------------------

    def _byte_to_token(self, b: int) -> int:
        tid = self._token_to_id.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:
            tid = self._token_to_id.get(chr(b))
        if tid is None:
            raise ValueError(f"vocabulary has no byte token for 0x{b:02X}")
        return tid

    def _find_specials(self, text: str, parse_special: bool) -> list[int]:
        """Special tokens whose text occurs in `text`, in llama.cpp's partition order."""
        root = self._special_trie
        found: set[int] = set()
        n = len(text)
        for i in range(n):
            node = root.get(text[i])
            j = i + 1
            while node is not None:
                tid = node.get(None)
                if tid is not None:
                    found.add(tid)
                if j == n:
                    break
                node = node.get(text[j])
                j += 1
        if not parse_special:
            found = {t for t in found if not self._attrs[t] & _HIDDEN}
        return sorted(found, key=self._special_order.__getitem__)

    def partition(self, text: str, parse_special: bool = True) -> list[str | int]:
        """Split raw text into raw-text fragments (str) and special token ids (int), applying
        each special token in turn, longest first (llama.cpp's `tokenizer_st_partition`)."""
        if not text:
            return []
        frags: list[str | int] = [text]
        for tid in self._find_specials(text, parse_special):
            special = self._texts[tid]
            attr = self._attrs[tid]
            out: list[str | int] = []
            for frag in frags:
                if not isinstance(frag, str):
                    out.append(frag)
                    continue
                pos = 0
                while (match := frag.find(special, pos)) != -1:
                    left = frag[pos:match]
                    if attr & _LSTRIP:
                        left = left.rstrip(_ASCII_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    pos = match + len(special)
                    if attr & _RSTRIP:
                        while pos < len(frag) and frag[pos] in _ASCII_SPACE:
                            pos += 1
                if pos < len(frag):
                    out.append(frag[pos:])
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text` as llama.cpp's `llama_tokenize(vocab, text, add_special,
        parse_special)`: BOS/EOS per `add_bos`/`add_eos` when `add_special`; special-token text
        becomes its token when `parse_special` (user-defined tokens always do)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        out: list[int] = []
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos is set but the vocabulary has no BOS token")
            out.append(self.bos_id)
        frags = self.partition(text, parse_special)
        if self._bpe is None:
            prev_special = True  # the first fragment counts as following a special token
            for frag in frags:
                if isinstance(frag, str):
                    if self.add_space_prefix and prev_special:
                        frag = " " + frag
                    out += self._spm(frag.replace(" ", "▁"))
                    prev_special = False
                else:
                    out.append(frag)
                    prev_special = True
        else:
            for frag in frags:
                if isinstance(frag, str):
                    out += self._bpe.tokenize(frag)
                else:
                    out.append(frag)
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos is set but the vocabulary has no EOS token")
            out.append(self.eos_id)
        return out

    # ---- decode --------------------------------------------------------------------------------

    def _piece(self, tid: int) -> bytes:
        """The token's bytes as rendered with special=True (llama.cpp's piece cache)."""
        piece = self._piece_cache.get(tid)
        if piece is not None:
            return piece
        attr = self._attrs[tid]
        text = self._texts[tid]
        if attr & (_HIDDEN | _USER_DEFINED):
            piece = text.encode("utf-8")
        elif attr & _NORMAL:
            if self._bpe is None:
                piece = text.replace("▁", " ").encode("utf-8")
            else:
                piece = byte_decode(text)
        elif attr & _BYTE:
            piece = bytes([int(text[3:5], 16)])
        else:  # UNUSED / UNDEFINED render as nothing
            piece = b""
        self._piece_cache[tid] = piece
        return piece

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """Raw bytes of one token as llama.cpp's `token_to_piece`: `▁` -> space, `<0xNN>` ->
        that byte, BPE byte characters -> bytes; control/unknown tokens are empty unless
        `special`."""
        tid = self._check_id(token_id)
        if not special and self._attrs[tid] & _HIDDEN:
            return b""
        return self._piece(tid)

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = True) -> bytes:
        """llama.cpp's `detokenize(remove_special=skip_special, unparse_special=not
        skip_special)`, before UTF-8 decoding."""
        ids = [self._check_id(t) for t in ids]
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False  # the BOS "carried" the prefix space
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        buf = bytearray()
        for tid in ids:
            piece = self.token_to_piece(tid, special=not skip_special)
            if remove_space and piece[:1] == b" ":
                piece = piece[1:]
            remove_space = False
            buf += piece
        return apply_clean_spaces(bytes(buf)) if self.clean_spaces else bytes(buf)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids` (llama.cpp `detokenize` semantics; invalid UTF-8 becomes U+FFFD)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", "replace")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"
        )
