"""Data: the OASIS readers, the built-in MNI152 demo slices, the TFDS builder and the grain pipelines."""
