"""Benign-only ConvVAE anomaly detector (vae.py), its training and calibration, and the hybrid rescue."""
