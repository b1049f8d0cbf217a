"""Structure from motion with any descriptor of :func:`exemplar_desc.create_descriptor`.

Features and matches in hloc's HDF5 layout, COLMAP's verification and incremental mapper
through pycolmap. Modules: :mod:`.features` (extraction, ``features.h5``), :mod:`.pairs`,
:mod:`.matching` (``matches.h5``), :mod:`.export` (uint8 descriptors, COLMAP text export),
:mod:`.reconstruction` (database, verification, mapper), :mod:`.pipeline` (:func:`run_sfm`)
and the command line, ``python -m exemplar_desc.sfm``.
"""
