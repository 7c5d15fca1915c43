"""Measuring trained models: features, accuracy and kNN (``evaluate``), retrieval metrics
(``retrieval``, ``retrieval_report``), multi-label metrics (``multilabel``), long-tail groups
(``longtail``), and the run report with its plots (``report``, ``plots``).

May import: ``supcon.models``, ``supcon.losses``, ``supcon.data``, ``supcon.core``.
"""
