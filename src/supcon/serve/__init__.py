"""Using a trained run: :func:`supcon.load` (``inference``: embeddings and predictions of images),
``supcon embed`` (``embed``: embeddings of a dataset, retrieval) and ``supcon export``
(``export``: TorchScript, ONNX or safetensors).

May import: ``supcon.runs.folder``, ``supcon.runs.modelinfo``, ``supcon.evaluation``,
``supcon.models``, ``supcon.data``, ``supcon.core``; never ``supcon.train``.
"""
