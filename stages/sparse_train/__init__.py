"""Stage `sparse-train`: the loop (`training`), its data-parallel launch and worker entry point (`worker`), and the
stage as the pipeline calls it (`stage`). The package imports none of them itself: torchrun runs `worker` as
`__main__`, which an import here would load a second time."""
