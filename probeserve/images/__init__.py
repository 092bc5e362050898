"""Image data for probes: ImageNet-style folders or Parquet files, and synthetic images.

- `index`: resolves `data.kind: images` to a frozen example index (which keys, with which
  labels, in which order, per split) from a folder tree or Parquet files, locally or on S3.
- `decode`: decoding and the standard evaluation preprocessing of one encoded image, and
  reading the bytes of a task's examples. It runs in the decode worker processes, so it
  imports neither torch nor the spec.
- `workers`: the decode worker processes and the pool that feeds them tasks in order.
- `dataset`: `ImageDataset`, which turns the decoded uint8 images into normalised float32
  batches on the device; `SyntheticImageDataset`, seeded images made on the device.

This package's `__init__` imports nothing, so that a decode worker that imports
`probeserve.images.workers` loads only what decoding needs.
"""
