"""The orchestrator, written once: the order of the stages (`order`), the cache of their results (`calls`), the
checks made before any work (`checks`), the sweep over sparsities and methods (`sweep`) and the one-off commands
that compose stages outside a run (`tools`). The CLI and the Prefect flows hand it only a way to run one stage."""
