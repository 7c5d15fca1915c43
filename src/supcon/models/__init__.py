"""Networks: encoders in a registry (the Keras example's CNN, CIFAR and ImageNet ResNets, timm
backbones), heads, pre-trained weights, the BCL model, the fused CPU kernels, and the builders that
assemble them from a config.

- ``encoders``: the registry and ``build_encoder``; ``keras_cnn``, ``resnet``: its entries;
- ``heads``: projection and classifier heads; ``bcl``: BCL's model; ``pretrained``: backbone
  weights from files; ``kernels``: C kernels for the Keras CNN on the CPU;
- ``build``: models of a phase from a config (``Classifier``, ``ContrastiveModel``), freezing.

May import: ``supcon.core`` and the types of ``supcon.data``.
"""
