"""Trained Exemplar-CNN descriptor weights, installed as ``exemplar_desc.weights``."""
