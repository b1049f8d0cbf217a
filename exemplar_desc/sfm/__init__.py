"""Structure from motion with any descriptor of :func:`exemplar_desc.create_descriptor`.

Features and matches in hloc's HDF5 layout (:mod:`exemplar_desc.formats.hloc`, extracted by
:mod:`exemplar_desc.extraction`), COLMAP's verification and incremental mapper through
pycolmap. Modules: :mod:`.pairs` (which pairs to match), :mod:`.pair_matching`
(``matches.h5``), :mod:`.reconstruction` (database, verification, mapper), :mod:`.pipeline`
(:func:`run_sfm`) and the command line, ``python -m exemplar_desc.sfm``.
"""
