"""What a resumed run may change: the configuration it was saved with against the one given.

A checkpoint records the whole configuration of its run. On resume every key that differs
is either *applied* (the run continues under the new value, the change is logged and
``config.yaml`` records it) or *refused* (one line lists every such key): a key is applied
only when the saved state does not depend on it, so the continued run is exactly the run
the new ``config.yaml`` describes from the resumed step on.

Applied: the budget and cadence of the loop (``train.steps``, ``*_every``,
``keep_checkpoints``), validation settings, the learning-rate schedule (``optim.lr``,
``optim.decay_start``: the schedule is recomputed from the new values at the resumed
step), where the run lives and runs (``output``, ``train.device``, ``data.num_workers``,
``strategy.backend``, ``strategy.timeout_s``) and speed-only switches
(``train.grad_checkpointing``, ``train.deterministic``). Refused: everything that shaped
the saved weights, optimiser and per-rank state: the method and its networks, the data and
its sampling (``data.path``, ``data.patch``, ``data.batch_size``, augmentation), the seed,
the optimiser (``optim.name``, ``optim.betas``, ``optim.weight_decay``: a restored optimiser
state carries them), the precision and the strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcdeconv.config import ExperimentConfig
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.training.checkpoint import LATEST, count_nonfinite, list_checkpoints

#: Keys (or key prefixes, ending in ".") a resumed run may change.
APPLIED = (
    "output",
    "train.steps",
    "train.device",
    "train.deterministic",
    "train.grad_checkpointing",
    "train.log_every",
    "train.val_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.image_every",
    "train.val_tile",
    "train.val_overlap",
    "train.val_crop",
    "train.best_metric",
    "optim.lr",
    "optim.decay_start",
    "data.num_workers",
    "data.val_volumes",
    "strategy.backend",
    "strategy.timeout_s",
)


@dataclass(frozen=True)
class Change:
    """One configuration key whose value differs from the checkpoint's."""

    key: str
    saved: Any
    given: Any

    @property
    def applied(self) -> bool:
        """Whether a resumed run may take the new value."""
        return any(self.key == k or self.key.startswith(k + ".") for k in APPLIED)

    def __str__(self) -> str:
        return f"{self.key} {self.saved!r} -> {self.given!r}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_changes(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[Change]:
    """Every key whose value differs between two JSON dumps of an experiment configuration.

    A key present in only one of them (a newer version's default) counts as a change only
    when the other side has a value for it.
    """
    old, new = flatten(saved), flatten(given)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key in old and key in new and old[key] != new[key]:
            changes.append(Change(key, old[key], new[key]))
    return changes


def check_resume_config(
    saved: Mapping[str, Any], given: Mapping[str, Any], checkpoint: str
) -> list[Change]:
    """The applied changes of a resume; refuses the others.

    Parameters
    ----------
    saved
        ``config`` of the checkpoint (``ExperimentConfig.model_dump(mode="json")``).
    given
        The configuration of this launch, dumped the same way.
    checkpoint
        Path of the checkpoint, for the message.

    Returns
    -------
    list of Change
        Keys the resumed run takes from ``given``.

    Raises
    ------
    ConfigError
        Some changed key shaped the saved state; the line lists every such key.
    """
    changes = config_changes(saved, given)
    refused = [c for c in changes if not c.applied]
    if refused:
        listed = "; ".join(str(c) for c in refused)
        raise ConfigError(
            f"cannot resume {checkpoint} with a changed {listed} (the saved state depends on "
            "it); resume with the run's config.yaml, or start a new run"
        )
    return [c for c in changes if c.applied]


def check_world_size(saved: int, given: int, checkpoint: str) -> None:
    """Refuse to resume with another number of processes, for every strategy.

    The global batch (``W`` × ``data.batch_size``), the ranks' patch streams and their
    history pools are all per rank: a run resumed on another ``W`` is no longer the run
    that was checkpointed.

    Raises
    ------
    ConfigError
        ``saved != given``.
    """
    if saved != given:
        raise ConfigError(
            f"checkpoint {checkpoint} was written by {saved} process(es), this launch has "
            f"{given}: the global batch and every rank's patch stream and history pool would "
            f"change; relaunch with {saved} process(es), or start a new run"
        )


def check_checkpoint(
    state: Mapping[str, Any],
    path: Path,
    given: ExperimentConfig,
    world_size: int,
    artefact: tuple[str, str],
) -> list[Change]:
    """Whether a loaded checkpoint can continue under this launch; the applied changes.

    Parameters
    ----------
    state
        The loaded checkpoint.
    path
        Its file (``RUN/checkpoints/step_*.pt``), for messages.
    given
        This launch's configuration.
    world_size
        This launch's number of processes.
    artefact
        ``(kind, key)`` of the artefact the method makes. A checkpoint without an
        ``artefact`` record (written before it existed) holds an image-to-image one
        under ``"deblur"``.

    Returns
    -------
    list of Change
        Keys the resumed run takes from ``given`` (see :func:`check_resume_config`).

    Raises
    ------
    InputError
        The checkpoint is of another method or artefact, or holds non-finite weights
        (the line names the earlier checkpoints to resume from instead).
    ConfigError
        Another world size, or a changed key that shaped the saved state.
    """
    if state.get("method") != given.method.name:
        raise InputError(
            f"checkpoint {path} is from method '{state.get('method')}', "
            f"the configuration asks for '{given.method.name}'"
        )
    check_world_size(int(state.get("world_size", 1)), world_size, str(path))
    applied = check_resume_config(state["config"], given.model_dump(mode="json"), str(path))
    saved = dict(state.get("artefact", {"kind": "image_to_image", "key": "deblur"}))
    kind, key = artefact
    if (saved.get("kind"), saved.get("key")) != (kind, key):
        raise InputError(
            f"checkpoint {path} holds a {saved.get('kind')} artefact under "
            f"'{saved.get('key')}', the method makes a {kind} one under '{key}'"
        )
    bad = count_nonfinite({k: state[k] for k in (key, f"{key}_ema", "groups") if k in state})
    if bad:
        earlier = [p.name for p in list_checkpoints(path.parent.parent) if p.name < path.name]
        how = (
            f"to resume from an earlier one ({', '.join(earlier)}), write its name into "
            f"{path.parent / LATEST}"
            if earlier
            else "start a new run"
        )
        raise InputError(
            f"checkpoint {path} holds {bad} non-finite weight(s): it was written after "
            f"training diverged; {how}"
        )
    return applied
