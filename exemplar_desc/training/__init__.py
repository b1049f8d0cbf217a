"""Unsupervised Exemplar-CNN training.

Modules: :mod:`.seeds` (unlabeled images and seed patches), :mod:`.transforms` (the
surrogate-class transformations), :mod:`.loop` (the training loop, data-parallel under torchrun through
:mod:`exemplar_desc.distributed`), :mod:`.head` (the descriptor head's fit) and
:mod:`.magnification` (choosing the patch magnification). The command line is
``python -m exemplar_desc.train``.
"""
