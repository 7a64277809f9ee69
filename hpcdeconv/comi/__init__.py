"""Training sets for COMI (Zhang et al., "Correction of out-of-focus microscopic images by
deep learning", CSBJ 20, 2022): in-focus / out-of-focus plane pairs split by field of view.

:mod:`~hpcdeconv.comi.stacks` reads real planes (z-stacks, and folders of single-plane
files such as BBBC006), :mod:`~hpcdeconv.comi.defocus` renders synthetic ones with the
Zernike defocus PSF, and :mod:`~hpcdeconv.comi.dataset` splits, maps intensities and writes
the store that ``hpcdeconv comi make-dataset`` makes.
"""
