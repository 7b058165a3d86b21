"""The one stage interface. A stage is a plain function in `stages/` that takes paths, small records, the opened
data and a view of the config (`config`), and returns a record that describes itself in one line. Beside it, its
module declares it once as a `Stage`: its name, the CompressConfig fields it reads (the view lets through only those,
and the cache key hashes exactly those) and the files it writes into the run directory (a cached result whose files
are gone is recomputed). The orchestrator (stages/run) puts the stages in order; the CLI and the flow only say how to
run one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pipeline.config import CompressConfig, ConfigView

# the opened data's source, split, order and normalisation: read by every stage that gets it
DATA_FIELDS = frozenset({"data", "val_fraction", "seed", "mean", "std", "preprocessing", "resize", "crop",
                         "interpolation", "val_images", "memory_mb", "workers", "max_bad_fraction"})


@runtime_checkable
class StageResult(Protocol):
    def describe(self) -> str:
        """One line about the result, for the log and the terminal."""


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: `fn(**inputs, config=ConfigView)`, the fields `reads` (None: the whole config, and
    the stage is never cached), the `outputs` it writes into the run directory."""

    name: str
    fn: Callable[..., StageResult]
    reads: frozenset[str] | None = frozenset()
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.reads or ()) - set(CompressConfig.model_fields)
        if unknown:
            raise ValueError(f"stage {self.name}: not CompressConfig fields: {', '.join(sorted(unknown))}")

    @property
    def cached(self) -> bool:
        return self.reads is not None

    def config_for(self, config: CompressConfig) -> ConfigView | CompressConfig:
        """What the stage function gets as `config`: a view of the declared fields (the whole config when it reads
        everything)."""
        return config if self.reads is None else ConfigView(config, self.reads)

    def __call__(self, **kwargs: Any) -> StageResult:
        return self.fn(**kwargs)
