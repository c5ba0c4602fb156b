"""SDPA over each conversation of a padding-free (or packed) row on its own.

A padding-free batch is one row of several conversations; TRL's collator marks where each starts
(`cu_seq_lens_q`). transformers' `sdpa` then builds a block-diagonal causal mask over the whole row
and attends densely: (sum of lengths)^2 work where sum(length^2) is needed, about 8x for a batch of 8
similar conversations, and SDPA's masked path on the CPU. `sdpa_packed` runs the causal kernel on each
conversation's slice instead: the same attention (the mask said exactly this), a fraction of the work.
Anything else (a padded batch, decoding with a cache, a sliding window shorter than a conversation)
goes to transformers' `sdpa` unchanged.
"""

from __future__ import annotations

import itertools

NAME = "sdpa_packed"
_SEQUENCE_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def segments(cu_seq_lens, length: int) -> list[tuple[int, int]] | None:
    """[(start, end)] of each conversation in a row of `length` tokens (`cu_seq_lens`: a tensor of the
    conversations' bounds, TRL's collator's), or None when the row is not packed."""
    if cu_seq_lens is None:
        return None
    bounds = [int(b) for b in cu_seq_lens.tolist()]
    if len(bounds) < 3 or bounds[0] != 0 or bounds[-1] != length:
        return None
    return [(start, end) for start, end in itertools.pairwise(bounds) if end > start]


def sdpa_packed_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: query [batch, heads, tokens, dim] -> ([batch, tokens, heads, dim], None)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = None
    causal = getattr(module, "is_causal", True) and kwargs.get("is_causal", True)
    if causal and query.shape[0] == 1 and query.shape[2] == key.shape[2] and kwargs.get("softcap") is None:
        spans = segments(kwargs.get("cu_seq_lens_q"), query.shape[2])
        window = getattr(module, "sliding_window", None)
        if spans and window is not None and max(end - start for start, end in spans) > window:
            spans = None  # the mask carries the window; keep it
    if not spans:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    rest = {name: item for name, item in kwargs.items() if name not in _SEQUENCE_KEYS}
    rest.pop("is_causal", None)
    outputs = [
        sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
                               dropout=dropout, scaling=scaling, is_causal=True, **rest)[0]
        for start, end in spans
    ]  # fmt: skip
    return torch.cat(outputs, dim=1), None


def register() -> str:
    """Make `attn_implementation="sdpa_packed"` loadable (idempotent); its masks are sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_packed_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME
