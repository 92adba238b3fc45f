"""Data layer: image decoding, manifests, leak-free splits, the preprocessing cache, dedup, checkpoints.

Everything downstream (generators, classifiers, anomaly detection, inference) reads images and writes weights
through this package, so there is one decoder, one resize rule and one checkpoint format in the project.
"""
