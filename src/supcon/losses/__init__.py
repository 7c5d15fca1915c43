"""Losses as pure tensor functions with thin ``nn.Module`` wrappers.

- ``supcon``: the supervised contrastive loss (L_out, L_in, npairs; labels, masks, multi-label,
  memory keys, several processes), exact and tiled; ``inputs``, ``tiles``: its parts;
- ``queue``: the label-aware memory queue of past keys; ``bcl``: Balanced Contrastive Learning's
  loss and the logit-adjusted cross-entropy.

May import: ``supcon.core``.
"""
