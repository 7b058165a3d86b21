"""Union-find over the channel sets of the analysis."""

from __future__ import annotations


class ChannelSets:
    """Union-find over channel sets; a set created earlier is the root of a union (deterministic names)."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.creators: list[list[int]] = []  # node indices that create the set

    def new(self, size: int, creator: int | None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.creators.append([] if creator is None else [creator])
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ra, rb = min(ra, rb), max(ra, rb)
        assert self.size[ra] == self.size[rb], "callers unite sets of equal size only"
        self.parent[rb] = ra
        self.creators[ra] += self.creators[rb]
        return ra
