"""Reproduction of the seed paper's Tables I/III at CPU scale: four methods, one budget.

Lim et al., "CycleGAN with a blur kernel for deconvolution microscopy: optimal transport
geometry", IEEE TCI 2020, compare on simulated microtubules (Born & Wolf PSF, 20 dB SNR)
the supervised U-Net, the non-blind and blind cycleGANs with a linear blur path, and the
conventional cycleGAN with two deep generators, reporting PSNR/SSIM against the truth
(expected ordering: supervised > non-blind > blind > conventional > input) and the
agreement of the blind method's learned kernel with the true PSF.

This script simulates one dataset (``configs/simulate_microtubules.yaml`` by default),
trains every method from its demo configuration (``configs/<method>.yaml``) for the same
number of steps, deconvolves the whole test volume (tiles 64³, overlap 16, linear blend)
and writes the table to ``docs/benchmarks.md``. Besides the paper's four methods it trains
the blind method with the simplex kernel constraint (``h ≥ 0``, ``Σh = 1``).

The demo configurations use linear U-Net heads (``final_activation: none``); the tables
below were measured with them. ``--sigmoid`` trains with the paper's sigmoid heads instead.
Both heads start at the training data's mean (``generator.head_init: data``); before that,
a sigmoid head started at 0.5 on data whose background is 0 and stayed below the input's
PSNR for hundreds of steps (supervised, 200 steps: 8.6 dB against 20.0 dB for the input).

Run from the repository root: ``.venv/bin/python benchmarks/bench_cyclegan.py`` (200
steps per method, about 30 min on 2 otherwise idle cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, write_section
from hpcdeconv.config import ExperimentConfig, SimulateConfig, load_config
from hpcdeconv.data.simulate import simulate
from hpcdeconv.data.zarr_io import BLURRED, PSF_KEY, SHARP, get_split, open_array, open_dataset
from hpcdeconv.inference.model import load_model
from hpcdeconv.inference.predict import predict_volume
from hpcdeconv.metrics import pcc, psnr, ssim
from hpcdeconv.models.psf_layer import build_psf_layer
from hpcdeconv.physics.psf_io import centre_crop
from hpcdeconv.training.checkpoint import load_checkpoint, resolve_checkpoint
from hpcdeconv.training.engine import train

ROOT = Path(__file__).resolve().parent.parent
SIGMOID_HEAD = "method.generator.final_activation=sigmoid"


@dataclass(frozen=True)
class Variant:
    """One trained method: its demo configuration and what this benchmark changes."""

    config: str
    label: str
    overrides: tuple[str, ...] = ()
    sigmoid_heads: tuple[str, ...] = (SIGMOID_HEAD,)


# Best to worst as in the paper's tables, then the extra blind variant.
VARIANTS = {
    "supervised": Variant("supervised", "Supervised U-Net (MSE)"),
    "nonblind": Variant("nonblind", "Non-blind cycleGAN"),
    "blind": Variant("blind", "Blind cycleGAN"),
    "cyclegan": Variant(
        "cyclegan",
        "Conventional cycleGAN",
        sigmoid_heads=(SIGMOID_HEAD, "method.blur_generator.final_activation=sigmoid"),
    ),
    "blind_simplex": Variant(
        "blind", "Blind cycleGAN, simplex kernel", ("method.kernel.constraint=simplex",)
    ),
}
EXPECTED = ["supervised", "nonblind", "blind", "cyclegan", "input"]


@dataclass
class Scores:
    """Test-volume quality of one method (or of the input)."""

    psnr: float
    ssim: float
    val_psnr: float | None = None
    train_seconds: float | None = None


@dataclass(frozen=True)
class TestVolume:
    """The first test volume of a dataset and its truth, each (Z, Y, X) float32."""

    blurred: np.ndarray
    sharp: np.ndarray
    psf: np.ndarray

    @property
    def data_range(self) -> float:
        """Peak-to-peak range of the truth, the PSNR/SSIM reference (as in validation)."""
        return float(self.sharp.max() - self.sharp.min()) or 1.0

    def score(self, volume: np.ndarray) -> Scores:
        """PSNR and SSIM of ``volume`` against the truth."""
        rng = self.data_range
        return Scores(psnr(volume, self.sharp, rng), ssim(volume, self.sharp, rng))


def read_test_volume(data: Path) -> TestVolume:
    """Read the first volume of the ``test`` split and the dataset's PSF."""
    group = open_dataset(data)
    vid = get_split(group)["test"][0]
    arrays = [open_array(group, name)[...] for name in (f"{BLURRED}/{vid}", f"{SHARP}/{vid}")]
    psf = open_array(group, PSF_KEY)[...]
    return TestVolume(*(np.asarray(a, dtype=np.float32) for a in (*arrays, psf)))


def variant_config(
    variant: Variant, data: Path, run_dir: Path, args: argparse.Namespace
) -> ExperimentConfig:
    """``configs/<method>.yaml`` with this benchmark's data, output, budget and seed.

    Validation and checkpointing happen once, at the end; losses are logged ten times.
    """
    steps = args.steps
    overrides = [
        f"data.path={data}",
        f"output={run_dir}",
        f"train.steps={steps}",
        f"train.seed={args.seed}",
        f"train.val_every={steps}",
        f"train.ckpt_every={steps}",
        f"train.image_every={steps}",
        f"train.log_every={max(1, steps // 10)}",
        *variant.overrides,
        *(variant.sigmoid_heads if args.sigmoid else ()),
    ]
    return load_config(ExperimentConfig, ROOT / "configs" / f"{variant.config}.yaml", overrides)


def deconvolve(run_dir: Path, blurred: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """G_Θ of the run's final checkpoint applied to the whole volume, tile by tile."""
    model = load_model(run_dir)
    return predict_volume(
        model.net,
        blurred,
        tile=(tile, tile, tile),
        overlap=overlap,
        blend="linear",
        size_multiple=model.size_multiple,
    )


def initial_kernel_ncc(cfg: ExperimentConfig, truth: np.ndarray) -> float:
    """NCC to the true PSF of the blind method's *initial* kernel, σ=1 smoothed.

    The reference the learned kernel has to beat: a kernel that did not move from its
    Gaussian start scores this.
    """
    layer = build_psf_layer(cfg.method.kernel, None, learnable=True)
    _, smoothed = layer.export(smooth_sigma=1.0)
    reference = centre_crop(truth, smoothed.shape)
    return pcc(smoothed, reference / reference.sum())


def learned_kernel_sum(cfg: ExperimentConfig, run_dir: Path) -> float:
    """Σ h of the blind method's final kernel before any normalisation (1 at the start)."""
    state = load_checkpoint(resolve_checkpoint(run_dir))
    blur = {
        key.removeprefix("blur."): value
        for key, value in state["groups"]["G"]["module"].items()
        if key.startswith("blur.")
    }
    layer = build_psf_layer(cfg.method.kernel, None, learnable=True)
    layer.load_state_dict(blur)
    return float(layer.kernel().detach().sum())


def kernel_scores(cfg: ExperimentConfig, run_dir: Path, truth: np.ndarray) -> dict[str, float]:
    """NCCs (learned raw/smoothed, initial) and Σh of a blind run; empty for other methods."""
    info = run_dir / "psf" / "psf_learned.json"
    if not info.is_file():
        return {}
    found = json.loads(info.read_text())
    scores = {k: float(found[k]) for k in ("ncc_raw", "ncc_smoothed") if k in found}
    scores["ncc_initial"] = initial_kernel_ncc(cfg, truth)
    scores["sum"] = learned_kernel_sum(cfg, run_dir)
    return scores


def run_variant(
    key: str, args: argparse.Namespace, data: Path, test: TestVolume
) -> tuple[Scores, dict[str, float]]:
    """Train one variant, deconvolve the test volume, return its scores and kernel scores."""
    run_dir = args.workdir / "runs" / key
    cfg = variant_config(VARIANTS[key], data, run_dir, args)
    start = time.perf_counter()
    summary = train(cfg, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    scores = test.score(deconvolve(run_dir, test.blurred, args.tile, args.overlap))
    scores.val_psnr = summary.validation.get("psnr")
    scores.train_seconds = seconds
    return scores, kernel_scores(cfg, run_dir, test.psf)


def ordering(scores: dict[str, Scores], keys: list[str]) -> list[str]:
    """``keys`` from best to worst test PSNR."""
    return sorted(keys, key=lambda k: scores[k].psnr, reverse=True)


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _results_table(scores: dict[str, Scores]) -> str:
    labels = {key: v.label for key, v in VARIANTS.items()} | {"input": "Input (blurred, noisy)"}
    rows = [
        [
            labels[key],
            f"{s.psnr:.2f}",
            f"{s.ssim:.4f}",
            _fmt(s.val_psnr, 2),
            _fmt(s.train_seconds, 0),
        ]
        for key, s in scores.items()
    ]
    header = ["Method", "Test PSNR (dB)", "Test SSIM", "Val PSNR (dB)", "Train wall (s)"]
    return markdown_table(header, rows)


def _kernel_table(kernels: dict[str, dict[str, float]]) -> str:
    rows = [
        [
            VARIANTS[key].label,
            _fmt(k.get("ncc_smoothed"), 3),
            _fmt(k.get("ncc_raw"), 3),
            _fmt(k.get("ncc_initial"), 3),
            _fmt(k.get("sum"), 3),
        ]
        for key, k in kernels.items()
        if k
    ]
    header = ["Method", "NCC learned (σ=1)", "NCC learned (raw)", "NCC initial (σ=1)", "Σh"]
    return markdown_table(header, rows)


def report(
    args: argparse.Namespace,
    scores: dict[str, Scores],
    kernels: dict[str, dict[str, float]],
    sim: SimulateConfig,
    test: TestVolume,
) -> str:
    """Markdown: the results table, the kernel agreement and the ordering verdict."""
    got = ordering(scores, EXPECTED)
    verdict = "matches" if got == EXPECTED else "does not match"
    heads = "the paper's sigmoid U-Net heads" if args.sigmoid else "linear U-Net heads"
    shape = "×".join(map(str, test.sharp.shape))
    return (
        f"Dataset: `{args.sim_config}` ({sim.split.train} training volumes of "
        f"{'×'.join(map(str, sim.shape))}, paraxial Born & Wolf PSF {sim.psf.shape[0]}³, "
        f"NA {sim.psf.na}, {sim.noise.snr_db} dB SNR, seed {sim.seed}). Every method trains "
        f"from `configs/<method>.yaml` (patch 32³, U-Net channels 16 depth 3, fp32, Adam "
        f"1e-4, {heads}) for the same **{args.steps} steps**, seed {args.seed}; the whole "
        f"test volume ({shape}) is then deconvolved with tiles {args.tile}³, overlap "
        f"{args.overlap}, linear blending. PSNR/SSIM use the truth's peak-to-peak range; "
        "*val PSNR* is the engine's validation on the validation volume at the end of "
        "training; *train wall* includes set-up, the final validation and the checkpoint "
        "on a machine shared with other jobs.\n\n"
        + _results_table(scores)
        + "\n\nBlind kernels against the true PSF (zero-mean NCC, kernels normalised to sum "
        "1, the truth cropped to the kernel size); *NCC initial* is the Gaussian start "
        "(σ = 2 voxels), the score of a kernel that never moved; Σh is the learned kernel's "
        "sum before normalisation (1 at the start).\n\n" + _kernel_table(kernels) + "\n\n"
        f"Paper's ordering by PSNR: {' > '.join(EXPECTED)}. Ours: {' > '.join(got)} — "
        f"{verdict}. With {args.steps} CPU steps on 32³ patches and a 1.4 M-parameter U-Net "
        "(the paper trains far longer, on a GPU, at 64³ with a ~7 M-parameter U-Net) the "
        "adversarial methods are far from converged: this table shows where each method "
        "stands after an equal small budget, not the paper's absolute numbers."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps per method")
    parser.add_argument(
        "--sim-config", type=Path, default=Path("configs/simulate_microtubules.yaml")
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed of every method")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument(
        "--sigmoid", action="store_true", help="train with the paper's sigmoid U-Net heads"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep data and runs here (default: a temporary directory)"
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not update the doc")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keep = args.workdir is not None
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cyclegan_"))
    torch.manual_seed(args.seed)
    try:
        sim = load_config(SimulateConfig, args.sim_config)
        data = args.workdir / "data.zarr"
        start = time.perf_counter()
        simulate(sim, data, overwrite=True)
        print(f"simulated {data} in {time.perf_counter() - start:.0f} s", flush=True)
        test = read_test_volume(data)
        scores: dict[str, Scores] = {}
        kernels: dict[str, dict[str, float]] = {}
        for key in VARIANTS:
            scores[key], kernels[key] = run_variant(key, args, data, test)
            s = scores[key]
            print(
                f"{key:14s} PSNR {s.psnr:.2f} SSIM {s.ssim:.4f} "
                f"(trained in {s.train_seconds:.0f} s) {kernels[key] or ''}",
                flush=True,
            )
        scores["input"] = test.score(test.blurred)
        body = report(args, scores, kernels, sim, test)
        if keep:
            results = {k: vars(v) for k, v in scores.items()} | {"kernels": kernels}
            (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(body)
    if not args.no_write:
        write_section(
            "cyclegan", "cycleGAN reproduction (seed paper Tables I/III, CPU scale)", body
        )


if __name__ == "__main__":
    main()
