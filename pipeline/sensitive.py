"""Secrets and personal data in conversations: what a model must not learn to repeat.

Found: e-mail addresses, phone numbers, private key blocks, API tokens with the well-known provider
prefixes, and long high-entropy values after a key-like word (`api_key = ...`, `password: ...`).
A finding is never printed: errors show its kind, a masked shape and its sha256, which is what the
allowlist file takes (a line is either the exact text or `sha256:<hex>`; `#` starts a comment), so
a deliberate example (a documentation address, a revoked demo key) can be allowed without repeating it.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# (kind, pattern): the whole match is the finding.
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("private key", r"(?s)-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:.*?-----END [A-Z0-9 ]*-----|.*)"),
        ("AWS access key id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
        ("GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
        ("GitLab token", r"\bgl(?:pat|dt|rt|ptt|cbt|soat)-[A-Za-z0-9_-]{20,}"),
        ("Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
        ("Anthropic API key", r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
        ("OpenAI API key", r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_-]{20,}"),
        ("Hugging Face token", r"\bhf_[A-Za-z0-9]{30,}"),
        ("Google API key", r"\bAIza[0-9A-Za-z_-]{35}"),
        ("Stripe key", r"\b[sr]k_(?:live|test)_[0-9A-Za-z]{20,}"),
        ("JSON web token", r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
        ("e-mail address", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        # +44 20 7946 0958, (555) 123-4567, 555-123-4567, 07700 900123: digit groups with separators
        (
            "phone number",
            r"(?<![\w+.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,5}\)[ .-]?|\d{2,5}[ .-])\d{3,4}[ .-]?\d{3,5}(?!\w|\.\d)",
        ),
    )
)
# A value after a key-like word: `api_key = "..."`, `password: ...`, `Authorization: Bearer ...`.
KEY_LIKE = re.compile(
    r"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?key|auth[_-]?token|token|password|passwd|pwd|bearer)"
    r"\b[\"']?\s*(?:[:=]|=>)?\s*[\"']?(?:bearer\s+)?(?P<value>[A-Za-z0-9+/_=.\-]{16,})"
)
MIN_ENTROPY = 3.5  # bits per character: random keys are ~4-6, words and code identifiers lower
MIN_PHONE_DIGITS, MAX_PHONE_DIGITS = 9, 15


@dataclass(frozen=True)
class Finding:
    kind: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def masked(self) -> str:
        """Enough to find it in the file, not enough to use it."""
        return f"{self.text[:4]}… ({len(self.text)} characters)"


def entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def looks_random(value: str) -> bool:
    """High entropy and at least two of lower case, upper case, digits: keys, not words or identifiers."""
    classes = sum(any(test(c) for c in value) for test in (str.islower, str.isupper, str.isdigit))
    return classes >= 2 and entropy(value) >= MIN_ENTROPY


def findings(text: str) -> list[Finding]:
    found: list[Finding] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in PATTERNS:
        for match in pattern.finditer(text):
            span = match.span()
            if any(start < span[1] and span[0] < end for start, end in taken):
                continue  # already part of a finding (an e-mail inside a key block)
            if (
                kind == "phone number"
                and not MIN_PHONE_DIGITS <= sum(c.isdigit() for c in match[0]) <= MAX_PHONE_DIGITS
            ):
                continue
            taken.append(span)
            found.append(Finding(kind, match[0]))
    for match in KEY_LIKE.finditer(text):
        value, span = match["value"], match.span("value")
        if any(start < span[1] and span[0] < end for start, end in taken) or not looks_random(value):
            continue
        taken.append(span)
        found.append(Finding("high-entropy value after a key-like word", value))
    return found


@dataclass(frozen=True)
class Allowlist:
    texts: frozenset[str] = frozenset()
    digests: frozenset[str] = frozenset()

    def allows(self, finding: Finding) -> bool:
        return finding.text in self.texts or finding.digest in self.digests


def load_allowlist(path: Path | None) -> Allowlist:
    """The allowlist file; a missing file is an empty list (most datasets need none)."""
    if path is None or not Path(path).is_file():
        return Allowlist()
    texts, digests = set(), set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith("sha256:"):
            digests.add(entry.removeprefix("sha256:").strip().lower())
        else:
            texts.add(entry)
    return Allowlist(frozenset(texts), frozenset(digests))


def sensitive_errors(where: str, field: str, text: str, allowlist: Allowlist, allowlist_path: str) -> list[str]:
    """`file:line: field: reason` for every finding in one text that the allowlist does not allow."""
    return [
        f"{where}: {field}: {finding.kind} {finding.masked()}: a model learns to repeat it; remove it, or if it is a "
        f"deliberate example add `sha256:{finding.digest}` to {allowlist_path}"
        for finding in findings(text)
        if not allowlist.allows(finding)
    ]
