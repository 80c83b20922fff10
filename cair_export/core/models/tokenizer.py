"""A small CLIP tokenizer: a byte-level BPE learnt from a word list (the tiny presets', the `shapes` model's).

The vocabulary is laid out like OpenAI CLIP's: the 256 byte symbols, the same with the end-of-word
marker `</w>`, one entry per merge, then `<|startoftext|>` and `<|endoftext|>`. Since every single
byte is a token, words outside the captions still tokenise (into pieces). Every listed word is one
token. The folder holds vocab.json + merges.txt (transformers `CLIPTokenizer`) and the equivalent
`tokenizer.json` (`tokenizers` library format).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character map of GPT-2/CLIP byte-level BPE (port of OpenAI CLIP's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that join each of `words` into one token (most frequent pair first, ties by name)."""
    symbols = [tuple(w[:-1]) + (w[-1] + END_OF_WORD,) for w in words]
    merges = []
    while True:
        pairs = Counter(p for word in symbols for p in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        symbols = [_merge(word, best) for word in symbols]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary and merges for `words` (lower-case ASCII)."""
    byte_symbols = list(bytes_to_unicode().values())
    merges = learn_merges(words)
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(path: Path, words: list[str], model_max_length: int) -> "CLIPTokenizer":  # noqa: F821
    """Write vocab.json, merges.txt, tokenizer.json and configs for `words` into `path`."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    # merges.txt: a version header line, then one "left right" pair per line (CLIP's format).
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.backend_tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tokenizer


# --- T5 (PixArt's text encoder) ----------------------------------------------------------------

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's sentencepiece model


def write_t5_tokenizer(path: Path, words: list[str], model_max_length: int) -> "T5TokenizerFast":  # noqa: F821
    """A sentencepiece-style (Unigram, ``▁`` word marker) T5 tokenizer for `words`, written to `path`.

    Laid out as T5's: ``<pad>``, ``</s>``, ``<unk>``, then the pieces; each listed word is one piece
    (``▁word``) and single printable ASCII characters cover other words, as sentencepiece falls back to
    smaller pieces; other characters are ``<unk>``. Every sequence ends with ``</s>``. No extra ids.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [(token, 0.0) for token in T5_SPECIALS]
    pieces += [("▁" + word, -1.0 - 1e-3 * i) for i, word in enumerate(words)]
    characters = string.ascii_lowercase + string.digits + string.punctuation + string.ascii_uppercase
    pieces += [("▁", -5.0)] + [(c, -6.0 - 1e-3 * i) for i, c in enumerate(characters)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=T5_SPECIALS.index("<unk>")))
    backend.normalizer = normalizers.Replace(" {2,}", " ")  # T5's normalizer folds runs of spaces
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", T5_SPECIALS.index("</s>"))])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(path))
    return tokenizer


# --- Gemma (Sana's text encoder) ---------------------------------------------------------------

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0-4, as Gemma's sentencepiece model


def write_gemma_tokenizer(path: Path, words: list[str], model_max_length: int) -> "GemmaTokenizer":  # noqa: F821
    """A Gemma tokenizer (transformers' ``GemmaTokenizer``: BPE with byte fallback, spaces as ``▁``, no
    prefix space) whose merges make each of `words` one token, with and without a ``▁`` before it; written
    to `path`.

    Laid out as Gemma's: ``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``, ``<mask>``, the 256 byte tokens, the
    printable ASCII characters and newline, then one token per merge. Every sequence starts with ``<bos>``
    and has no end token.
    """
    import string

    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(GEMMA_SPECIALS)}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    for character in "▁\n" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(character, len(vocab))
    symbols = [tuple(prefix + word) for word in words for prefix in ("", "▁")]
    merges = []
    while True:
        pairs = Counter(p for word in symbols for p in zip(word, word[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab.setdefault("".join(best), len(vocab))
        symbols = [_merge(word, best) for word in symbols]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False,
                               padding_side="right", model_max_length=model_max_length)
    tokenizer.save_pretrained(str(path))
    return tokenizer
