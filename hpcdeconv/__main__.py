"""``python -m hpcdeconv <verb>``: the same entry point as the ``hpcdeconv`` console script.

Launchers that start modules rather than scripts (``torchrun -m hpcdeconv``,
``srun python -m hpcdeconv``, ``mpiexec python -m hpcdeconv``) need this file.
"""

import sys

from hpcdeconv.cli import main

if __name__ == "__main__":
    sys.exit(main())
