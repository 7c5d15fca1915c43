"""Training: the loop (:func:`supcon.train.loop.fit`), the phases (cross-entropy, contrastive
pre-training, the classifier on the encoder) and their steps, optimizers and schedules.

- ``context``: :class:`~supcon.train.context.Run`, what a phase needs from the run driving it;
- ``loop``: shuffle, step, log, checkpoint, resume, stop; ``rng``: the random streams it saves;
- ``phases``: each phase's model, data feed and step; ``steps``: the contrastive and BCL steps;
  ``extras``: the memory queue, the momentum encoder and the joint classifier as modules;
- ``optim``: optimizers (SGD, Adam, AdamW, LARS) and lr schedules; ``collapse``: the collapse sign.

May import: ``supcon.evaluation`` and everything below it; never ``supcon.runs``, ``supcon.serve``,
``supcon.experiments`` or ``supcon.cli``.
"""
