"""Run folders: where a run goes and whether a folder may be reused (``folder``), opening one
(``open``: validate, lock, write the config, resolve the runtime), its lock (``lock``), what its
weights need to be used again (``modelinfo``, ``model.json``), and repeats over seeds (``seeds``).

May import: ``supcon.train`` and everything below it. ``folder`` and ``modelinfo`` import no
training module: inference reads run folders through them.
"""
