"""Exemplar-CNN local feature descriptor (Dosovitskiy et al., NIPS 2014 / TPAMI 2016)."""
