"""A SentencePiece `tokenizer.model` rebuilt from a GGUF's vocabulary, for bases shipped only as a GGUF.

Its own module: stage base (through pipeline.models) needs only this, not the rest of GGUF conversion.
"""

from __future__ import annotations

from pathlib import Path


def sentencepiece_model_from_gguf(gguf_path: Path) -> bytes | None:
    """A SentencePiece `tokenizer.model` holding a GGUF's SentencePiece vocabulary (`tokenizer.ggml.model`
    llama): every piece with its score and type, in id order, and the special ids. For a base that ships only
    as a GGUF (the embedded Gemma 3 270M): its pieces are what llama.cpp's converter read from the upstream
    tokenizer.model, and sentencepiece_vocab then writes them back unchanged. A GGUF does not record the
    trainer's model type; BPE (byte fallback when the vocabulary has byte pieces) is how llama.cpp's
    SentencePiece tokenizer uses the scores. None for another vocabulary (BPE: SmolLM2's needs no model file)."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    reader = gguf.GGUFReader(str(gguf_path))

    def value(key: str, default=None):
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    if value("tokenizer.ggml.model") != "llama":
        return None
    tokens, scores, types = (value(f"tokenizer.ggml.{key}") for key in ("tokens", "scores", "token_type"))
    proto = sentencepiece_model_pb2.ModelProto()
    for text, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=text, score=score, type=kind)  # GGUF's token types are SentencePiece's numbers
    spec = proto.trainer_spec
    spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = int(gguf.TokenType.BYTE) in types
    for role, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = value(f"tokenizer.ggml.{key}_token_id", -1)
        setattr(spec, f"{role}_id", token_id)
        if token_id >= 0:
            setattr(spec, f"{role}_piece", tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(value("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()
