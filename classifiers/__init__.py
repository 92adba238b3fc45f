"""Six classifier architectures behind one registry (models.py), their training, evaluation and Grad-CAM."""
