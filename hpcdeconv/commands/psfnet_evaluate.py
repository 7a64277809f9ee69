"""``hpcdeconv psfnet evaluate``: R² of a trained PSF regressor on a samples store.

Dispatched by the ``psfnet`` verb (:mod:`hpcdeconv.commands.psfnet`). Prints R² per
parameter (eq. 15 of Shajkofci & Liebling 2020, on the samples where the parameter is
defined, in physical units), their mean, the accuracy of the validity output a0 and the
number of samples; ``--json`` writes the same numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hpcdeconv.commands.common import add_checkpoint_arguments, positive_int

NAME = "evaluate"
HELP = "R² per parameter of a trained PSF regressor on a samples store"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``hpcdeconv psfnet evaluate``."""
    add_checkpoint_arguments(p)
    p.add_argument("samples", type=Path, help="PSF-samples store (zarr) to evaluate on")
    p.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="test",
        help="which samples of the store (default: test)",
    )
    p.add_argument("--batch-size", type=positive_int, default=64, help="patches per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", type=Path, help="also write the scores to this JSON file")


def run(args: argparse.Namespace) -> int:
    """Evaluate the regressor; InputError (one line) for a store of another PSF model."""
    import json

    from hpcdeconv.data.safety import check_outputs

    check_outputs(
        [("--json", args.json, "file")],
        [("SAMPLES", args.samples), ("--checkpoint", args.checkpoint)],
        None,
    )
    report = evaluate(
        args.checkpoint, args.samples, args.split, args.batch_size, args.device, args.weights
    )
    width = max(len(n) for n in report["r2_per_parameter"])
    print(f"{report['checkpoint']}: PSF model {report['psf_model']}, split {args.split}")
    for name, value in report["r2_per_parameter"].items():
        count = report["valid_counts"][name]
        print(f"  R² {name:<{width}}  {value:.4f}  ({count} valid samples)")
    print(f"  R² mean {report['r2']:.4f}")
    print(f"  a0 accuracy {report['a0_accuracy']:.4f}  ({report['samples']} samples)")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def evaluate(
    checkpoint: Path,
    samples: Path,
    split: str,
    batch_size: int,
    device: str = "auto",
    weights: str = "auto",
) -> dict[str, Any]:
    """Scores of the regressor in ``checkpoint`` on ``split`` of the store ``samples``.

    Reads ``batch_size`` samples at a time.

    Returns
    -------
    dict
        ``checkpoint``, ``psf_model``, ``split``, ``samples`` (count), ``r2`` (mean),
        ``r2_per_parameter`` and ``valid_counts`` by name, ``a0_accuracy``.

    Raises
    ------
    InputError
        Not a regressor checkpoint; a store made with another PSF model (or other
        parameters, or patches of another size); an empty split.
    """
    import numpy as np
    import torch

    from hpcdeconv.data.samples import PSFSampleStore
    from hpcdeconv.errors import InputError
    from hpcdeconv.methods.psf_regression import regression_scores
    from hpcdeconv.psfnet.regressor import load_regressor

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_regressor(checkpoint, device, weights)  # type: ignore[arg-type]
    store = PSFSampleStore(samples)
    stored_model = (store.root.get("psf_model") or {}).get("model")
    if stored_model not in (None, loaded.model.name) or store.names != loaded.model.names:
        raise InputError(
            f"{samples} holds samples of PSF model {stored_model or '?'} "
            f"({', '.join(store.names)}); {loaded.checkpoint} was trained for "
            f"{loaded.model.name} ({', '.join(loaded.model.names)})"
        )
    shape = store.patch_shape()
    if shape != (1, loaded.window, loaded.window):
        raise InputError(
            f"{samples} holds patches of shape {list(shape)}; the regressor takes "
            f"[1, {loaded.window}, {loaded.window}]"
        )
    ids = store.split(split)
    if not ids:
        raise InputError(f"{samples} lists no {split} samples")
    preds, invalid, true, valid = [], [], [], []
    for start in range(0, len(ids), batch_size):
        part = store.read(ids[start : start + batch_size])
        p, a0 = loaded.predict(torch.from_numpy(part.patches))
        preds.append(p.cpu().numpy())
        invalid.append(a0.cpu().numpy())
        true.append(part.params)
        valid.append(part.valid)
    valid_all = np.concatenate(valid)
    names = loaded.model.names
    scores = regression_scores(
        names, np.concatenate(preds), np.concatenate(invalid), np.concatenate(true), valid_all
    )
    return {
        "checkpoint": str(loaded.checkpoint),
        "weights": loaded.weights,
        "psf_model": loaded.model.name,
        "samples_store": str(samples),
        "split": split,
        "samples": len(ids),
        "r2": scores["r2"],
        "r2_per_parameter": {n: scores[f"r2_{n}"] for n in names},
        "valid_counts": {n: int(c) for n, c in zip(names, valid_all.sum(axis=0), strict=True)},
        "a0_accuracy": scores["a0_accuracy"],
    }
