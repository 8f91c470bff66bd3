"""Synthetic, entity-rich image-caption world written in the AGREE release's file layout.

Modules: `world` (entities, scenes, relations), `render` (numpy rasteriser, masking,
storage formats), `captions` (target and pretraining caption styles, segs, preds),
`writer` (the whole dataset on disk, spec section 1).
"""
