"""What the load generator sends: prompt and output length distributions and a shared-prefix ratio, turned
into a reproducible sequence of chat requests.

Prompts are random sequences of common English words that are one token each in SmolLM2's tokenizer (checked
against it), so "a 1,000-token system prompt" is about 1,000 tokens on the real model too; the reports use the
prompt tokens the servers count, not this estimate. A shared-prefix request starts with the one shared system
prompt; every other request gets a system prompt of the same length that no other request starts with (a cold
prompt for the prefix cache). Each target gets its own stream of cold prompts, so two targets behind the same
service cannot warm each other's cache.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

# One token each (with the leading space) in SmolLM2's byte-level BPE tokenizer.
WORDS = ["time", "year", "people", "way", "day", "man", "thing", "woman", "life", "child", "world", "school", "state", "family", "student", "group", "country", "problem", "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work", "government", "number", "night", "point", "home", "water", "room", "mother", "area", "money", "story", "fact", "month", "lot", "right", "study", "book", "eye", "job", "word", "business", "issue", "side", "kind", "head", "house", "service", "friend", "father", "power", "hour", "game", "line", "end", "member", "law", "car", "city", "community", "name", "president", "team", "minute", "idea", "kid", "body", "information", "back", "parent", "face", "others", "level", "office", "door", "health", "person", "art", "war", "history", "party", "result", "change", "morning", "reason", "research", "girl", "guy", "moment", "air", "teacher", "force", "education", "river", "garden", "forest", "mountain", "window", "table", "chair", "paper", "letter", "music", "voice", "light", "color", "apple", "bread", "stone", "road", "ship", "train", "bird", "horse", "fish", "tree", "flower", "cloud", "rain", "snow", "wind", "fire", "earth", "sun", "moon", "star", "sea", "island", "village", "castle", "king", "queen", "doctor", "farmer", "artist", "writer", "painter", "dream", "journey", "secret", "market", "bridge", "tower", "lamp", "candle", "clock", "mirror", "gold", "silver", "iron", "glass"]


@dataclass(frozen=True)
class Dist:
    """A length: fixed ("64") or uniform over a closed range ("32:128")."""

    lo: int
    hi: int

    @classmethod
    def parse(cls, text: str | int) -> Dist:
        if isinstance(text, int):
            return cls(text, text)
        lo, _, hi = str(text).partition(":")
        d = cls(int(lo), int(hi or lo))
        if d.lo < 0 or d.hi < d.lo:
            raise ValueError(f"bad length {text!r}: use N or LO:HI")
        return d

    def sample(self, rng: random.Random) -> int:
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}:{self.hi}"


@dataclass(frozen=True)
class Workload:
    prompt_tokens: Dist = Dist(64, 64)  # the user message
    output_tokens: Dist = Dist(32, 32)  # max_tokens
    shared_prefix_tokens: int = 0  # the system prompt's length; 0: no system prompt
    shared_prefix_ratio: float = 0.0  # share of requests whose system prompt is the shared one
    ignore_eos: bool = False  # ask our stack to run every request to max_tokens (the peer does not know it)
    seed: int = 0

    def describe(self) -> str:
        text = f"prompt {self.prompt_tokens} tokens, output {self.output_tokens} tokens"
        if self.shared_prefix_tokens:
            text += f", system prompt {self.shared_prefix_tokens} tokens ({self.shared_prefix_ratio:.0%} shared)"
        if self.ignore_eos:
            text += ", ignore_eos"
        return text


@dataclass(frozen=True, slots=True)
class Work:
    """One request, as every target sends it."""

    system: str | None
    user: str
    max_tokens: int
    shared: bool
    ignore_eos: bool

    def messages(self) -> list[tuple[str, str]]:
        out = [("system", self.system)] if self.system is not None else []
        return [*out, ("user", self.user)]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class WorkSource:
    """An endless, reproducible sequence of requests for one target."""

    def __init__(self, workload: Workload, salt: str = "") -> None:
        self.workload = workload
        self._rng = random.Random(workload.seed * 1_000_003 + zlib.crc32(salt.encode()))
        # The shared prompt is the same for every target and every run of this workload.
        shared_rng = random.Random(workload.seed)
        self.shared_prefix = _words(shared_rng, workload.shared_prefix_tokens) if workload.shared_prefix_tokens else None

    def next(self) -> Work:
        w, rng = self.workload, self._rng
        shared = self.shared_prefix is not None and rng.random() < w.shared_prefix_ratio
        if self.shared_prefix is None:
            system = None
        elif shared:
            system = self.shared_prefix
        else:
            system = _words(rng, w.shared_prefix_tokens)
        # The instruction keeps the real model writing until max_tokens more often than not.
        length = max(1, w.prompt_tokens.sample(rng) - 8)
        user = f"Write a long story about these words: {_words(rng, length)}"
        return Work(system, user, w.output_tokens.sample(rng), shared, w.ignore_eos)
