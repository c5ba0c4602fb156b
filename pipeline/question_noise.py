"""Noisy copies of the training questions (train.question_noise).

A small model fine-tuned on one wording per fact learns the answer for that wording: asked in other words it
starts its answer another way and never reaches the fact, although the fact's reference is likely under the new
wording (docs/recipe.md, the Fennick stand-in: 0.19 nats/token, greedy answer wrong). Word dropout on the input
is the classic cheap augmentation against that (EDA's random deletion, Wei & Zou 2019): the model sees each
question also with some of its words missing, so the answer has to hang on the words that carry the fact, not on
the whole sentence. It needs no other model and no external data.

Each training conversation gets one copy in which every user turn's first line loses about `share` of its words
(at least one word is kept). Later lines of a user turn (code the question quotes) and every answer and system
message stay as they are. The random choice is seeded by `seed` and the conversation's own text, so a copy stays
the same when other conversations are added or reordered.
"""

from __future__ import annotations

import hashlib
import json
import random


def drop_words(text: str, share: float, rng: random.Random) -> str:
    """`text` with about `share` of its first line's words dropped (never all of them); later lines kept."""
    first, newline, rest = text.partition("\n")
    words = first.split()
    if not words:
        return text
    kept = [word for word in words if rng.random() >= share] or [max(words, key=len)]
    return " ".join(kept) + newline + rest


def noisy_copy(conversation: dict, share: float, seed: int) -> dict:
    """The conversation with its user turns' first lines thinned by `share` (seeded by its own text)."""
    key = hashlib.sha256(f"{seed}\0{json.dumps(conversation, sort_keys=True)}".encode()).digest()
    rng = random.Random(int.from_bytes(key[:8], "big"))
    messages = [
        {**message, "content": drop_words(message["content"], share, rng)} if message["role"] == "user" else message
        for message in conversation["messages"]
    ]
    return {**conversation, "messages": messages}


def with_noisy_copies(conversations: list[dict], share: float, seed: int) -> list[dict]:
    """`conversations`, then one noisy copy of each (none when `share` is 0)."""
    if share <= 0:
        return conversations
    return conversations + [noisy_copy(conversation, share, seed) for conversation in conversations]
