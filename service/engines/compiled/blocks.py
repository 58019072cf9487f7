"""The KV cache's pages: which sequence holds which, and the prefix cache over them.

The cache is `blocks` pages of `block_size` token slots. A full page is identified by a hash chained over every
token before it and in it (vLLM's automatic prefix caching), so a page filled once (a system prompt, an earlier
turn of a conversation, a generated answer) is found again by any prompt that starts with the same tokens.
Pages no sequence holds stay in the prefix cache, least recently released first out, until a new page is needed.
Pages are handed out in increasing order where possible, so one sequence's pages are often contiguous and its
keys can be read as one view of the cache (attention.py).

Runs on the runner's thread only.
"""

from __future__ import annotations

from collections import OrderedDict


class OutOfBlocks(Exception):
    pass


class BlockManager:
    def __init__(self, blocks: int, block_size: int) -> None:
        self.blocks = blocks
        self.block_size = block_size
        self._free: list[int] = list(range(blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first
        self._refs = [0] * blocks
        self._hash_of: dict[int, int] = {}  # page → its chain hash, for full pages in the prefix cache
        self._page_of: dict[int, int] = {}  # chain hash → page
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages no sequence holds, oldest first

    # ------------------------------------------------------------------------------ what a sequence holds

    def available(self) -> int:
        return len(self._free) + len(self._idle)

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], int]:
        """The cached pages that hold the longest prefix of `tokens` in whole pages (held for the caller), leaving
        at least one token to compute, since the next token's logits come from the last one; and the chain hash
        after them (0 for none)."""
        pages: list[int] = []
        matched = parent = 0
        size = self.block_size
        for start in range(0, len(tokens) - 1 - size + 1, size):
            parent = _chain(parent, tokens[start : start + size])
            page = self._page_of.get(parent)
            if page is None:
                break
            pages.append(page)
            matched = parent
        for page in pages:
            self._hold(page)
        return pages, matched

    def allocate(self) -> int:
        """A free page (held for the caller), evicting the least recently released cached page if none is free."""
        if self._free:
            page = self._free.pop()
        elif self._idle:
            page, _ = self._idle.popitem(last=False)
            self._page_of.pop(self._hash_of.pop(page), None)
        else:
            raise OutOfBlocks()
        self._refs[page] = 1
        return page

    def publish(self, page: int, tokens: list[int], parent: int) -> int:
        """Record a page just filled with `tokens` (after the chain hash `parent`) in the prefix cache; returns its
        own chain hash."""
        chained = _chain(parent, tokens)
        if page not in self._hash_of and chained not in self._page_of:
            self._hash_of[page] = chained
            self._page_of[chained] = page
        return chained

    def release(self, pages: list[int]) -> None:
        # Released in reverse, so a sequence's last pages are evicted before its first (which a later prompt with
        # the same beginning needs most).
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)
        if len(self._free) > 1 and self._free[-1] > self._free[-2]:
            self._free.sort(reverse=True)

    def held(self) -> int:
        return sum(1 for r in self._refs if r)

    def _hold(self, page: int) -> None:
        if self._refs[page] == 0:
            self._idle.pop(page, None)
        self._refs[page] += 1


def _chain(parent: int, tokens: list[int]) -> int:
    return hash((parent, tuple(tokens)))
