"""GGUF vocabulary: the tokenizer keys llama.cpp's convert_hf_to_gguf.py writes, built with gguf-py.

Two kinds, chosen as upstream does for Llama-family models:

- SentencePiece (`tokenizer.model` present) -> `tokenizer.ggml.model = llama`: pieces, scores and
  token types from the SentencePiece model, then the tokens added on top of it;
- GPT-2-style BPE (`tokenizer.json` only) -> `gpt2`: tokens and types from the HF tokenizer, merges,
  and `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp must use, identified by hashing the token
  ids of a fixed text (PRE_TOKENIZERS), as upstream does; a vocabulary upstream's table does not
  know (retrained, or the tiny test models) by its pre-tokenizer's own definition instead
  (PRE_TOKENIZER_DEFINITIONS), where upstream would stop.

Both are padded to the embedding rows with `[PAD<i>]` placeholders, as upstream does; a tokenizer
with more tokens than embedding rows is an error (llama.cpp would refuse the file at load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from pipeline.common import PipelineError

# SentencePiece / GGUF token types (gguf.TokenType), as plain ints so that this table needs no import.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PLACEHOLDER_SCORE = -10000.0  # rows the tokenizer does not use
ADDED_SCORE = -1000.0  # tokens added on top of the SentencePiece model

# The text llama.cpp hashes the token ids of (convert_hf_to_gguf.py, get_vocab_base_pre), verbatim.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(token ids of CHKTXT)) -> llama.cpp's name for the pre-tokenizer (same table upstream).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3, 3.1, 3.2
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}

# sha256 of a tokenizer.json's normalizer + pre_tokenizer (definition_digest) -> llama.cpp's pre-tokenizer
# that splits text the same way. Only definitions llama.cpp implements verbatim belong here.
PRE_TOKENIZER_DEFINITIONS = {
    # NFC, Qwen's regex split (Isolated), ByteLevel without prefix space: Qwen2/2.5/3 (transformers' Qwen2Tokenizer)
    "f64ce79efdd97727e8943eeb2749e209c6559130bb7d7faf0497f2362ea6f884": "qwen2",
    # no normalizer, Llama-3's regex split (Isolated), ByteLevel without prefix space: Llama-3/3.1/3.2 as Meta's
    # conversion writes them (transformers' TikTokenConverter)
    "0b203869fced33203d17c133c3b3bb0e54e41e8ef4730e07ea9ade11879b840e": "llama-bpe",
}

# Added tokens that upstream marks CONTROL even when the tokenizer does not call them special.
SPECIAL_LOOKING = ({"<pad>", "<mask>", "<2mass>", "[@BOS@]"}, (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">")))

# llama.cpp's converter sets add_bos_token false for this vocabulary size (Granite; SmolLM2's
# unchanged vocabulary has the same size and adds no BOS either).
ADD_BOS_BY_VOCAB_SIZE = {49152: False}


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    placeholders: int = 0  # [PAD<i>] rows beyond the tokenizer
    added: list[str] = field(default_factory=list)  # tokens added on top of the base vocabulary


def looks_special(token: str) -> bool:
    names, affixes = SPECIAL_LOOKING
    return token in names or any(token.startswith(a) and token.endswith(b) for a, b in affixes)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _too_many_tokens(size: int, rows: int) -> PipelineError:
    return PipelineError(
        f"the tokenizer has {size} tokens but the embeddings have {rows} rows: llama.cpp would refuse the GGUF "
        f"(token_embd.weight has wrong shape). Resize the embeddings to the tokenizer (train and merge do) "
        f"and set config.vocab_size to match"
    )


def sentencepiece_vocab(model_dir: Path, rows: int, phi3: bool = False) -> Vocab:
    """`tokenizer.model` pieces, then added tokens, then placeholders up to `rows` (upstream's
    _create_vocab_sentencepiece, plus tokenizer.json's added tokens: transformers >= 5 no longer
    writes added_tokens_decoder into tokenizer_config.json, and upstream then writes `[PAD<id>]`).
    `phi3`: upstream's Phi3MiniModel reads tokenizer.json itself: every added token there, inside the
    model too, takes its id (control if special, else user-defined, as written), score ADDED_SCORE."""
    from sentencepiece import sentencepiece_model_pb2

    # the model's own records, read directly: each piece's type is GGUF's number for it, user-defined included
    # (the processor API would call those normal; Gemma's runs of spaces are user-defined)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    base = len(proto.pieces)
    tokens = [f"[PAD{i}]".encode() for i in range(rows)]
    scores = [PLACEHOLDER_SCORE] * rows
    types = [UNUSED] * rows
    for i, piece in enumerate(proto.pieces[:rows]):
        tokens[i], scores[i], types[i] = piece.piece.encode("utf-8"), piece.score, piece.type

    # (id, text, special) from every place a tokenizer directory records added tokens; later wins.
    added: list[tuple[int, str, bool | None]] = [
        (i, text, None) for text, i in _read_json(model_dir / "added_tokens.json").items()
    ]
    config = _read_json(model_dir / "tokenizer_config.json")
    added += [(int(i), d["content"], d.get("special")) for i, d in config.get("added_tokens_decoder", {}).items()]
    # ids inside the SentencePiece model keep its own types, as upstream (not Phi-3's), except its
    # normal and user-defined pieces (Gemma's <start_of_turn>): tokenizer.json says what they are, as
    # tokenizer_config.json did before transformers 5 (else llama.cpp would split them)
    added += [
        (d["id"], d["content"], d.get("special"))
        for d in _read_json(model_dir / "tokenizer.json").get("added_tokens", [])
        if phi3 or d["id"] >= base or (d["id"] < rows and types[d["id"]] in (NORMAL, USER_DEFINED))
    ]
    size = max([base, *(i + 1 for i, _, _ in added)])
    if size > rows:
        raise _too_many_tokens(size, rows)
    new: list[str] = []
    for i, text, special in added:
        if special is None:  # added_tokens.json: user-defined, as upstream
            kind = USER_DEFINED
        elif phi3:
            kind = CONTROL if special else USER_DEFINED
        elif special or looks_special(text):
            kind = CONTROL
        else:
            kind, text = USER_DEFINED, text.replace("▁", " ")  # llama.cpp expects pre-normalised spaces
        tokens[i], scores[i], types[i] = text.encode("utf-8"), ADDED_SCORE, kind
        if i >= base and text not in new:
            new.append(text)
    return Vocab("llama", "default", tokens, types, scores, placeholders=rows - size, added=new)


def _drop_offsets(node):
    """The definition without `trim_offsets` (it moves offsets only, never tokens; transformers 5 saves it true)."""
    if isinstance(node, dict):
        return {key: _drop_offsets(value) for key, value in node.items() if key != "trim_offsets"}
    if isinstance(node, list):
        return [_drop_offsets(value) for value in node]
    return node


def definition_digest(tokenizer) -> str:  # a tokenizers.Tokenizer
    """sha256 of what splits text before BPE: the normalizer and pre-tokenizer of tokenizer.json."""
    saved = json.loads(tokenizer.to_str())
    definition = _drop_offsets({key: saved.get(key) for key in ("normalizer", "pre_tokenizer")})
    return sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()


def pre_tokenizer(tokenizer) -> str:  # a tokenizers.Tokenizer
    """llama.cpp's name for the tokenizer's pre-tokenizer, from the hash of its ids for CHKTXT, else
    from its definition."""
    digest = sha256(str(tokenizer.encode(CHKTXT).ids).encode()).hexdigest()  # with special tokens, as upstream
    if digest not in PRE_TOKENIZERS and definition_digest(tokenizer) in PRE_TOKENIZER_DEFINITIONS:
        return PRE_TOKENIZER_DEFINITIONS[definition_digest(tokenizer)]
    if digest not in PRE_TOKENIZERS:
        raise PipelineError(
            f"unknown BPE pre-tokenizer (hash {digest}): llama.cpp would split text differently. If llama.cpp "
            f"supports this tokenizer, find the hash in its convert_hf_to_gguf.py (get_vocab_base_pre) and add "
            f"'{digest}': '<its res name>' to PRE_TOKENIZERS in pipeline/gguf_vocab.py"
        )
    return PRE_TOKENIZERS[digest]


def bpe_vocab(model_dir: Path, rows: int) -> Vocab:
    """Tokens and types from tokenizer.json, padded to `rows` (upstream's get_vocab_base; read with
    `tokenizers` directly, which is what transformers' fast tokenizer runs, without importing torch)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    by_id = {i: text for text, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    size = max(by_id) + 1
    if size > rows:
        raise _too_many_tokens(size, rows)
    pre = pre_tokenizer(tokenizer)
    added = tokenizer.get_added_tokens_decoder()
    base = tokenizer.get_vocab_size(with_added_tokens=False)
    tokens: list[bytes] = []
    types: list[int] = []
    new: list[str] = []
    for i in range(rows):
        if i not in by_id:
            text, kind = f"[PAD{i}]", UNUSED
        elif i in added:
            text = by_id[i]
            if not added[i].normalized:  # llama.cpp assumes added tokens are pre-normalised
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or looks_special(text):
                kind = CONTROL
            else:
                kind, text = USER_DEFINED, text.replace("▁", " ")
            if i >= base:
                new.append(text)
        else:
            text, kind = by_id[i], NORMAL
        tokens.append(text.encode("utf-8"))
        types.append(kind)
    return Vocab("gpt2", pre, tokens, types, placeholders=rows - len(by_id), added=new)


def special_vocab(model_dir: Path, n_vocab: int | None, load_merges: bool):
    """gguf-py's SpecialVocab (special ids, add-BOS/EOS flags, chat template, merges), with the rule
    newer upstream gguf-py adds: a ByteLevel post-processor means "adds neither BOS nor EOS" unless
    another post-processor step says otherwise. And one of ours: for SentencePiece, a TemplateProcessing
    post-processor of the text alone means "adds no BOS" (transformers 5 writes Phi-3's so and drops its add_bos_token
    false; upstream then writes no flag, and llama.cpp's SentencePiece default would add a BOS that
    training never saw)."""
    import gguf

    special = gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)
    post = _read_json(model_dir / "tokenizer.json").get("post_processor") or {}
    steps = [step.get("type") for step in post.get("processors", [post])]
    singles = [
        step.get("single") for step in post.get("processors", [post]) if step.get("type") == "TemplateProcessing"
    ]
    sentencepiece = not load_merges  # llama.cpp's SentencePiece default is to add a BOS
    if sentencepiece and singles and all(len(single) == 1 and "Sequence" in single[0] for single in singles):
        special.add_special_token.setdefault("bos", False)
    if "ByteLevel" in steps:
        flags = special.add_special_token
        flags.setdefault("bos", False)
        flags.setdefault("eos", False)
        if steps[0] == "ByteLevel":  # upstream meets it first (Llama-3's Sequence): bos and eos are its first flags
            special.add_special_token = {"bos": flags.pop("bos"), "eos": flags.pop("eos"), **flags}
    return special


def add_vocab_to_gguf(
    writer,
    model_dir: Path,
    rows: int,
    config_vocab_size: int,
    space_prefix: bool | None = None,
    phi3: bool = False,
) -> Vocab:
    """Write every tokenizer key; raise PipelineError (before any file is written) if the vocabulary
    cannot match the embeddings. `rows` = embedding rows; `space_prefix`, when given, is the
    architecture's add_space_prefix (written last, as upstream's Gemma models do); `phi3`: as
    upstream's Phi3MiniModel writes it."""
    config = _read_json(model_dir / "tokenizer_config.json")
    if (model_dir / "tokenizer.model").is_file():
        vocab = sentencepiece_vocab(model_dir, rows, phi3)
    elif (model_dir / "tokenizer.json").is_file():
        vocab = bpe_vocab(model_dir, rows)
    else:
        raise PipelineError(f"{model_dir}: no tokenizer (tokenizer.model or tokenizer.json)")

    # LlamaModel's key, not Phi3MiniModel's; an architecture's own space_prefix replaces it
    if space_prefix is None and not phi3 and (prefix := config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(prefix)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    # BPE: upstream leaves special ids unchecked against the vocabulary size (n_vocab None).
    is_bpe = vocab.model == "gpt2"
    special = special_vocab(model_dir, None if is_bpe else len(vocab.tokens), load_merges=is_bpe)
    if is_bpe and not special.merges:
        raise PipelineError(f"{model_dir}/tokenizer.json: a BPE tokenizer without merges")
    special.add_to_gguf(writer, quiet=True)
    if (add_bos := ADD_BOS_BY_VOCAB_SIZE.get(config_vocab_size)) is not None:
        writer.add_add_bos_token(add_bos)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    return vocab
