"""Images and labels: datasets in a registry, image folders, CSV manifests, the on-disk image store,
long-tailed subsets, epoch orders, batched augmentation and batches read ahead.

- ``dataset``: the types the layers above use (:class:`~supcon.data.dataset.ImageDataset`,
  ``Normalize``, ``Split``); ``labels``: single- vs multi-label helpers;
- ``datasets``: the registry's loaders and a run's train/validation split; ``download``,
  ``archives``: CIFAR's official files; ``imagefolder``, ``manifest``, ``store``, ``imageset``,
  ``files``: image files on disk, in memory or in the memory-mapped store; ``diskio``: files and
  folders under faults (regular files only, the cache folder, locks, allocated space);
- ``longtail``, ``sampler``: long-tailed training sets and class-balanced epoch orders;
- ``augment``: batched augmentation of uint8 tensors on the training device; ``prefetch``: the
  CPU side of a step read ahead in threads.

May import: ``supcon.core``.
"""
