"""Transposed convolution vs resize-convolution up-sampling in the demo's setting.

``make demo`` trains the blind cycleGAN (``configs/blind.yaml``) for 200 steps on the
simulated microtubules (``configs/simulate_microtubules.yaml``); its deconvolved test
volume shows a grid in XZ. The U-Net's 2×2×2 stride-2 transposed convolutions give each
of the 8 output phases its own taps: when they learn unequal sums the output carries a
period-2 pattern (Odena, Dumoulin & Olah, "Deconvolution and checkerboard artifacts",
Distill 2016; COMI's paper reports the same artefact). Resize-convolution
(``method.generator.upsample: resize``) doubles by repetition and then convolves, which
cannot.

This script runs the demo twice through the real CLI, once per ``upsample`` value, with
everything else equal (same data, seed and steps), predicts the first test volume with
each run, and reports per output

* the checkerboard measure along X and along Z: the power of the volume's spectrum at the
  period-2 (Nyquist) frequency of that axis relative to the mean power of the four
  frequencies just below it, in dB (about 0 dB or less for a smooth spectrum, positive
  when a period-2 grid stands out), the same for the blurred input and the truth;
* PSNR against the truth (its peak-to-peak range as the reference, as in validation).

It writes a side-by-side XZ figure to ``docs/figures/upsampling.png`` and the table to
``docs/benchmarks.md``. Run from the repository root:
``.venv/bin/python benchmarks/upsampling.py`` (two 200-step trainings of the CPU demo
plus one simulation and two predictions). ``--steps 2 --no-report`` is a quick smoke run
that writes nothing into ``docs/``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section
from hpcdeconv.data.zarr_io import BLURRED, SHARP, get_split, open_array, open_dataset
from hpcdeconv.metrics import psnr

ROOT = Path(__file__).resolve().parent.parent
FIGURE = ROOT / "docs" / "figures" / "upsampling.png"
MODES = ("transpose", "resize")
#: Frequencies just below the period-2 one that form its neighbourhood.
NEIGHBOURS = 4
#: Side of the zoomed XZ crop in the figure's second row, in voxels.
ZOOM = 32


def cli(*args: str) -> None:
    """Run ``hpcdeconv ARGS`` as a user would; raise with its output if it fails."""
    cmd = [sys.executable, "-m", "hpcdeconv", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")


def checkerboard_db(volume: np.ndarray, axis: int) -> float:
    """Power at the period-2 frequency of ``axis`` relative to its neighbourhood, in dB.

    Parameters
    ----------
    volume
        (Z, Y, X); the length along ``axis`` must be even (the period-2 frequency is then
        a bin of the discrete spectrum).
    axis
        0 (Z) or 2 (X).

    Returns
    -------
    float
        ``10 log10(P(N/2) / mean(P(N/2 - NEIGHBOURS … N/2 - 1)))``, where ``P`` is the power
        spectrum along ``axis`` averaged over the other two axes.
    """
    n = volume.shape[axis]
    if n % 2 or n // 2 <= NEIGHBOURS:
        raise ValueError(f"axis {axis} of length {n} has no period-2 bin with neighbours")
    centred = volume - volume.mean(axis=axis, keepdims=True)
    power = np.abs(np.fft.rfft(centred, axis=axis)) ** 2
    others = tuple(a for a in range(volume.ndim) if a != axis)
    spectrum = power.mean(axis=others)
    return float(10 * np.log10(spectrum[n // 2] / spectrum[n // 2 - NEIGHBOURS : n // 2].mean()))


@dataclass
class Row:
    """One volume of the comparison and its measures."""

    label: str
    volume: np.ndarray
    psnr: float | None = None
    train_seconds: float | None = None

    def cells(self) -> list[object]:
        """Table cells: label, checkerboard along X and Z, PSNR, training time."""
        return [
            self.label,
            f"{checkerboard_db(self.volume, 2):+.1f}",
            f"{checkerboard_db(self.volume, 0):+.1f}",
            "" if self.psnr is None else f"{self.psnr:.2f}",
            "" if self.train_seconds is None else f"{self.train_seconds:.0f}",
        ]


def train_and_predict(work: Path, data: Path, test_id: str, mode: str, steps: int) -> Row:
    """Train the demo with ``upsample=mode`` and deconvolve the test volume."""
    run = work / "runs" / mode
    start = time.perf_counter()
    cli(
        "train",
        "--config",
        "configs/blind.yaml",
        "--set",
        f"data.path={data}",
        "--set",
        f"method.generator.upsample={mode}",
        "--set",
        f"train.steps={steps}",
        "--output",
        str(run),
        "--overwrite",
    )
    seconds = time.perf_counter() - start
    out = work / f"{mode}.tif"
    cli(
        "predict",
        "--checkpoint",
        str(run),
        f"{data}/{BLURRED}/{test_id}",
        "--output",
        str(out),
        "--overwrite",
    )
    label = "resize-convolution" if mode == "resize" else "transposed convolution"
    return Row(label, tifffile.imread(out).astype(np.float32), train_seconds=seconds)


def xz_figure(rows: list[Row], path: Path) -> None:
    """Central XZ slices side by side on one intensity range, and a zoomed crop below."""
    y = rows[0].volume.shape[1] // 2
    views = [r.volume[:, y, :] for r in rows]
    norm = Normalize(
        vmin=min(float(v.min()) for v in views), vmax=max(float(v.max()) for v in views)
    )
    fig = Figure(figsize=(3.2 * len(rows), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(rows), squeeze=False)
    nz, nx = views[0].shape
    z0, x0 = max(nz // 2 - ZOOM // 2, 0), max(nx // 2 - ZOOM // 2, 0)
    for col, (row, view) in enumerate(zip(rows, views, strict=True)):
        axes[0, col].imshow(view, cmap="gray", norm=norm)
        axes[0, col].set_title(f"{row.label} — XZ", fontsize=9)
        crop = view[z0 : z0 + ZOOM, x0 : x0 + ZOOM]
        axes[1, col].imshow(crop, cmap="gray", norm=norm, interpolation="nearest")
        axes[1, col].set_title(f"centre {crop.shape[0]}×{crop.shape[1]} voxels", fontsize=8)
        for ax in axes[:, col]:
            ax.set_xlabel("x (voxels)", fontsize=8)
            ax.set_ylabel("z (voxels)", fontsize=8)
            ax.tick_params(labelsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(rows: list[Row], steps: int) -> None:
    """Write the figure and the table section of ``docs/benchmarks.md``."""
    xz_figure(rows, FIGURE)
    table = markdown_table(
        ["Volume", "Checkerboard X (dB)", "Checkerboard Z (dB)", "PSNR (dB)", "Training (s)"],
        [r.cells() for r in rows],
    )
    body = (
        f"`make demo`'s blind cycleGAN (`configs/blind.yaml`, 32³ patches, {steps} steps, "
        "seed 0) trained twice through the CLI with `--set method.generator.upsample="
        "transpose|resize`, everything else equal; the first test volume of "
        "`configs/simulate_microtubules.yaml` predicted with each run (`hpcdeconv predict`, "
        "default tiles). Checkerboard: power at the period-2 frequency along X (Z) over the "
        f"mean power of the {NEIGHBOURS} frequencies below it; 0 dB or less is a smooth "
        "spectrum, a positive value a period-2 grid. PSNR against the truth (its "
        "peak-to-peak range as the reference).\n\n"
        f"{table}\n\n"
        f"![XZ slices](figures/{FIGURE.name})"
    )
    write_section("upsampling", "Up-sampling: transposed convolution vs resize-convolution", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument(
        "--no-report", action="store_true", help="print the table only; write nothing in docs/"
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hpcdeconv-upsampling-"))
    try:
        data = work / "data.zarr"
        cli("simulate", "--config", "configs/simulate_microtubules.yaml", str(data), "--overwrite")
        group = open_dataset(data)
        test_id = get_split(group)["test"][0]
        sharp = np.asarray(open_array(group, f"{SHARP}/{test_id}")[...], dtype=np.float32)
        blurred = np.asarray(open_array(group, f"{BLURRED}/{test_id}")[...], dtype=np.float32)
        data_range = float(sharp.max() - sharp.min()) or 1.0
        rows = [Row("blurred input", blurred, psnr(blurred, sharp, data_range))]
        for mode in MODES:
            row = train_and_predict(work, data, test_id, mode, args.steps)
            row.psnr = psnr(row.volume, sharp, data_range)
            rows.append(row)
        rows.append(Row("truth", sharp))
        print(
            markdown_table(["Volume", "X (dB)", "Z (dB)", "PSNR", "s"], [r.cells() for r in rows])
        )
        if not args.no_report:
            report(rows, args.steps)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
