"""Hyperparameter sweeps: Optuna search over training configurations, run as SLURM job arrays.

A sweep directory (:mod:`~hpcdeconv.sweep.layout`) holds the sweep's configuration, the
Optuna study in a journal file every array task appends to, one training run directory per
trial, the workers' state and logs, and the collected results. Modules:

- :mod:`~hpcdeconv.sweep.config`: the typed sweep configuration (YAML);
- :mod:`~hpcdeconv.sweep.space`: the search space checked against the base training config,
  parameter suggestion, grid points, each trial's training configuration;
- :mod:`~hpcdeconv.sweep.study`: opening the Optuna study, sampler and pruner;
- :mod:`~hpcdeconv.sweep.worker`: one array task: asks for trials and trains them until the
  budget is spent, checkpointing and requeueing itself through submitit;
- :mod:`~hpcdeconv.sweep.submit`: job arrays (split at ``MaxArraySize``), local workers;
- :mod:`~hpcdeconv.sweep.monitor`: dead trials found from SLURM's record and retried;
- :mod:`~hpcdeconv.sweep.results` and :mod:`~hpcdeconv.sweep.plots`: the ranked table,
  the best configuration and the figures.
"""
