"""Synthetic, entity-rich image-caption world, written as raw downloads and prepared into the AGREE layout.

Modules: `world` (entities, scenes, relations), `render` (numpy rasteriser, masking,
storage formats), `captions` (target and pretraining caption styles, segs, preds),
`detector` (simulated detector boxes), `formats` (the raw download formats), `raw` (the world
as raw files), `writer` (the whole dataset on disk via dataprep's pipeline, docs/data.md).
"""
