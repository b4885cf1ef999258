"""Inference: decoding a trained model (decoding.py), evaluating a checkpoint on the val split
(evaluation.py, with rendered pages: visual_evaluation.py) and writing generated pages as JSON
Lines (generation.py)."""
