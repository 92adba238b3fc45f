"""Data layer: image decoding, manifests, leak-free splits, the preprocessing cache, dedup, checkpoints, the
dataset configurations (configs.py) and the repository's folders (paths.py).

Everything downstream (generators, classifiers, anomaly detection, inference) reads images and writes weights
through this package, so there is one decoder, one resize rule and one checkpoint format in the project.
"""
