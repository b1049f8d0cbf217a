"""Unsupervised Exemplar-CNN training.

Modules: :mod:`.config` (the run's settings and their checks), :mod:`.presets` (named
recipes), :mod:`.seeds` (unlabeled images and seed patches), :mod:`.transforms` (the
surrogate-class transformations, one record per family), :mod:`.init_model` (starting from
a saved model), :mod:`.checkpoint` (the run's state and its checkpoint), :mod:`.schedule`
(progress and learning rate), :mod:`.signals` (stopping on SIGINT/SIGTERM), :mod:`.loop`
(the training loop, data-parallel under torchrun through :mod:`exemplar_desc.distributed`),
:mod:`.head` (the descriptor head's fit) and :mod:`.magnification` (choosing the patch
magnification). The command line is ``python -m exemplar_desc.train``.
"""
