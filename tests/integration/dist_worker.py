"""Worker the distributed tests start under each launcher (mpiexec, torchrun, srun).

Each rank discovers itself, joins a gloo process group, all-reduces ``(rank + 1) * [0, 1, 2,
3]`` and prints one JSON line with its :class:`~hpcdeconv.training.dist.DistEnv` and the
reduced vector, which the tests compare with the closed form ``W (W + 1) / 2 * [0, 1, 2, 3]``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import torch
import torch.distributed as tdist

from hpcdeconv.training import dist


def main() -> int:
    """Discover, join, reduce, report; returns the process exit status."""
    dist_env = dist.discover()
    dist.init_process_group(dist_env, backend="gloo", timeout_s=60.0)
    try:
        values = torch.arange(4, dtype=torch.float64) * (dist_env.rank + 1)
        tdist.all_reduce(values)
        report = asdict(dist_env) | {"reduced": values.tolist(), "main": dist.is_main()}
        dist.barrier()
        sys.stdout.write(json.dumps(report) + "\n")
        sys.stdout.flush()
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
