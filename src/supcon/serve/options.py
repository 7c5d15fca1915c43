"""The choices of ``supcon embed`` and ``supcon export``, apart from their code so that the command
line offers them without importing torch."""

EMBED_FORMATS = (".npz", ".parquet")
SPLITS = ("train", "test", "all")  # which images embed reads (all: train then test)
EMBED_SPACES = ("encoder", "projection")
PROJECTOR_COUNT = 5000  # images in the TensorBoard projector files by default
EXPORT_FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "safetensors": ".safetensors"}
EXPORT_SPACES = ("encoder", "projection", "classifier")
