"""Benchmarks of the MS-CLIP implementation (``python -m benchmarks.run``, ``python -m benchmarks.scaling``).

* `benchmarks.harness`: interleaved timing, peak-memory and FLOP measurement, machine description;
* `benchmarks.setups`: the models and batches being compared (our CLIP vs transformers' ``CLIPModel`` at identical
  sizes, MS-CLIP, MS-CLIP-S), captions of a documented length distribution;
* `benchmarks.run`: the benchmark sections and the command line;
* `benchmarks.scaling`: per-rank memory tables (ZeRO stages, contrastive logits) computed from the presets, measured
  DDP / ZeRO-2 / ZeRO-3 runs (``--measure``, each rank being `benchmarks.scaling_worker`), the nCLIP heads' memory
  (``--nclip_memory``) and a 64-GPU projection (``--projection``);
* `benchmarks.ddp_find_unused`: 2-rank DDP step time with ``--ddp_find_unused_parameters`` true vs false.
"""
