"""PSF-parameter CNN and spatially-variant RL at CPU scale; write docs/benchmarks.md.

Analogues of Shajkofci & Liebling (IEEE TIP 29, 2020), run from the repository root:
``.venv/bin/python benchmarks/bench_psfnet.py [--only r2,table5,noise,speed]``.

Sections:

``r2`` (Table III)
    For each PSF model (``--models``, default G-1, G-2, Z-1): ``hpcdeconv psfnet
    make-dataset`` (``--samples``), ``hpcdeconv train`` (ResNet-34 of width ``--width``,
    ``--steps`` at batch ``--batch``, Adam ``--lr``), then ``hpcdeconv psfnet evaluate`` on
    the test split: R² per parameter (eq. 15).
``table5`` (Table V)
    ``--images`` 256×256 ``texture_2d`` phantoms; each quadrant is blurred by its own PSF
    (parameters drawn from the trained network's model; the quadrant is cut from the whole
    phantom blurred by that PSF, so the blur is piecewise constant), then noisy. SV-TV-RL
    (eq. 13, 20 iterations) with (a) the true 2×2 map (window 128, stride 128: one node
    per quadrant), (b) the CNN map (stride 128, and stride 64: 3×3 nodes), (c) one global
    PSF of the mean true parameters; ΔSNR and ΔSSIM against the sharp image, mean over
    the images, for each λ_TV of ``--tv``.
``noise`` (Fig. 7)
    R² of the G-1 network on test sets of growing Poisson noise (β = 1, fewer photons ψ)
    and growing Gaussian read noise σ (β = 0).
``speed``
    PSF map of a 1024×1024 image, 64 windows (window 128, stride 128), with the trained
    network and a width-64 ResNet-34 (paper: 5.9 ms on a GTX 1080); SV-RL (20 iterations)
    of a 2048×2048 image with a 16×16 map, whole image in this process and through
    ``hpcdeconv rl --psf-map`` with 2 dask workers.

Trained runs and samples live under ``--work`` (default: a temporary directory removed at
the end); with a kept ``--work`` a later call reuses the trained networks (``--only
table5``). ``--no-report`` writes nothing into ``docs/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import markdown_table, run_cli, sets, write_section

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "g1": "configs/psfnet_g1.yaml",
    "g2": "configs/psfnet_g2.yaml",
    "z1": "configs/psfnet_z1.yaml",
    "z3": "configs/psfnet_z3.yaml",
}
LABELS = {"g1": "G-1", "g2": "G-2", "z1": "Z-1", "z3": "Z-3"}
SECTIONS = ("r2", "table5", "noise", "speed")
ITERATIONS = 20
QUADRANT = 128
#: Noise of the Table V images: y = Poisson(ψ b)/ψ + N(0, σ²), b in [0, 1].
T5_PHOTONS = 300.0
T5_SIGMA = 0.01
POISSON_LEVELS = (3000.0, 300.0, 100.0, 30.0, 10.0)
GAUSS_LEVELS = (0.0, 0.02, 0.05, 0.1, 0.2)
NOISE_SAMPLES = 384


# ----------------------------------------------------------------------------- Table III


def recorded(path: Path, compute: Callable[[], float]) -> float:
    """Seconds of ``compute()``, kept in ``path`` so that a reused result reports them."""
    if path.exists():
        return float(path.read_text())
    seconds = compute()
    path.write_text(f"{seconds:.1f}\n")
    return seconds


def make_samples(name: str, out: Path, extra: list[str], workers: int = 2) -> float:
    """``psfnet make-dataset`` of model ``name`` into ``out`` (reused if done before)."""
    args = ["psfnet", "make-dataset", "--config", str(ROOT / CONFIGS[name]), str(out)]
    args += ["--workers", str(workers), "--overwrite", *sets(["device=cpu", *extra])]
    return recorded(out.with_suffix(".seconds"), lambda: run_cli(args))


def train(name: str, data: Path, run: Path, a: argparse.Namespace) -> float:
    """``hpcdeconv train`` of the regressor (reused if done before); seconds."""
    items = [
        f"data.path={data}",
        f"output={run}",
        f"data.batch_size={a.batch}",
        f"method.network.width={a.width}",
        f"optim.lr={a.lr}",
        f"optim.decay_start={a.steps // 2}",
        f"train.steps={a.steps}",
        f"train.val_every={max(1, a.steps // 6)}",
        f"train.ckpt_every={max(1, a.steps // 6)}",
        "train.device=cpu",
    ]
    config = str(ROOT / "configs/psfnet_train_g1.yaml")
    run.parent.mkdir(parents=True, exist_ok=True)
    return recorded(
        run.with_suffix(".seconds"), lambda: run_cli(["train", "--config", config, *sets(items)])
    )


def evaluate(run: Path, store: Path, split: str = "test") -> dict:
    from hpcdeconv.commands.psfnet_evaluate import evaluate as score

    return score(run, store, split, 64, "cpu")


def section_r2(work: Path, a: argparse.Namespace) -> str:
    rows = []
    for name in a.models:
        store, run = work / f"{name}.zarr", work / "runs" / name
        gen = make_samples(name, store, [f"samples={a.samples}"])
        seconds = train(name, store, run, a)
        report = evaluate(run, store)
        per = ", ".join(f"{k} {v:.3f}" for k, v in report["r2_per_parameter"].items())
        rows.append(
            [
                LABELS[name],
                per,
                f"{report['r2']:.3f}",
                f"{report['a0_accuracy']:.3f}",
                f"{a.samples} ({report['samples']} test)",
                f"{a.steps} × {a.batch}",
                f"ResNet-34, width {a.width}",
                f"{gen:.0f}",
                f"{seconds:.0f}",
            ]
        )
        print(f"r2 {name}: {per}", flush=True)
    header = [
        "Model",
        "R² per parameter (test)",
        "Mean R²",
        "a0 accuracy",
        "Samples",
        "Steps × batch",
        "Network",
        "Samples time (s)",
        "Training time (s)",
    ]
    return (
        "Table III analogue: R² (eq. 15) of the PSF-parameter CNN on the test split (10 %) "
        "of synthetic samples (`configs/psfnet_*.yaml`: 128×128 patches of cell, "
        "microtubule and point phantoms, 10 % texture-less, noise ψ 50–2000 photons, "
        f"β 0–1, σ 0–0.05). Adam, lr {a.lr} decaying linearly to 0 over the second half; the "
        "best checkpoint by validation R² (256 validation samples). "
        "Paper: 0.98–0.99 with ResNet-34 of width 64 on 10^5–10^6 samples; goal ≥ 0.95. "
        "Times on this machine, 2 dask workers for the samples.\n\n" + markdown_table(header, rows)
    )


# ------------------------------------------------------------------------------ Table V


def quadrant_image(
    model, rng: np.random.Generator, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sharp (256, 256), noisy blurred (256, 256), true parameters (P, 2, 2))."""
    from hpcdeconv.physics.phantoms import texture_2d
    from hpcdeconv.psfnet.dataset import blur_valid

    side = 2 * QUADRANT
    big = texture_2d((side + k - 1, side + k - 1), rng, "cells")
    sharp = big[k // 2 : k // 2 + side, k // 2 : k // 2 + side]
    params = model.sample(rng, 4)
    psfs = model.render(torch.from_numpy(params))
    blurred = blur_valid(torch.from_numpy(big)[None].expand(4, -1, -1), psfs).numpy()
    clean = np.empty((side, side), np.float32)
    for q in range(4):
        y, x = (q // 2) * QUADRANT, (q % 2) * QUADRANT
        clean[y : y + QUADRANT, x : x + QUADRANT] = blurred[q, y : y + QUADRANT, x : x + QUADRANT]
    noisy = rng.poisson(T5_PHOTONS * np.clip(clean, 0, None)) / T5_PHOTONS
    noisy = noisy + rng.normal(0.0, T5_SIGMA, clean.shape)
    true = params.T.reshape(-1, 2, 2)
    return sharp, np.clip(noisy, 0.0, None).astype(np.float32), true


def make_map(model, params: np.ndarray, stride: int, shape: tuple[int, int]):
    from hpcdeconv.psfnet.psf_map import PSFMap

    gy, gx = params.shape[1:]
    pixel = model.optics.pixel_size
    return PSFMap(
        model=model,
        params=params.astype(np.float32),
        invalid=np.zeros((gy, gx), np.float32),
        estimated=np.ones((gy, gx), bool),
        window=QUADRANT,
        stride=stride,
        image_shape=shape,
        voxel_size=(pixel, pixel),
    )


def sv_rl(image: np.ndarray, psf_map, tv: float) -> np.ndarray:
    from hpcdeconv.classical.sv_rl import crop_size, node_psfs, sv_richardson_lucy

    size = crop_size(psf_map.psfs(), 1e-4)
    psfs = node_psfs(psf_map, size)
    return sv_richardson_lucy(image, psfs, psf_map.centres, iterations=ITERATIONS, tv=tv)


def section_table5(work: Path, a: argparse.Namespace) -> str:
    from hpcdeconv.metrics import delta_snr, ssim
    from hpcdeconv.psfnet.estimate import estimate_psf_map
    from hpcdeconv.psfnet.regressor import load_regressor

    name = "g2" if (work / "runs" / "g2").is_dir() else "g1"
    loaded = load_regressor(work / "runs" / name, "cpu")
    model = loaded.model
    rng = np.random.default_rng(7)
    shape = (2 * QUADRANT, 2 * QUADRANT)
    k = model.optics.psf_size
    methods = ["true map (2×2)", "CNN map, stride 128 (2×2)", "CNN map, stride 64 (3×3)"]
    methods.append("global PSF (mean true parameters)")
    scores = {(m, tv): [] for m in methods for tv in a.tv}
    errors = []
    for _ in range(a.images):
        sharp, noisy, true = quadrant_image(model, rng, k)
        cnn128 = estimate_psf_map(noisy, loaded.predict, model, QUADRANT, 128)
        cnn64 = estimate_psf_map(noisy, loaded.predict, model, QUADRANT, 64)
        errors.append(np.abs(cnn128.params - true).mean(axis=(1, 2)))
        mean = np.broadcast_to(true.mean(axis=(1, 2))[:, None, None], true.shape)
        maps = [
            make_map(model, true, 128, shape),
            cnn128,
            cnn64,
            make_map(model, np.array(mean), 128, shape),
        ]
        for tv in a.tv:
            for method, psf_map in zip(methods, maps, strict=True):
                restored = sv_rl(noisy, psf_map, tv)
                d_ssim = ssim(restored, sharp, 1.0) - ssim(noisy, sharp, 1.0)
                scores[(method, tv)].append((delta_snr(sharp, noisy, restored), d_ssim))
    rows = []
    for tv in a.tv:
        for method in methods:
            values = np.array(scores[(method, tv)])
            rows.append(
                [
                    f"{tv:g}",
                    method,
                    f"{values[:, 0].mean():.2f} ± {values[:, 0].std():.2f}",
                    f"{values[:, 1].mean():.3f} ± {values[:, 1].std():.3f}",
                ]
            )
        print(f"table5 tv {tv}: done", flush=True)
    mae = np.mean(errors, axis=0)
    err = ", ".join(
        f"{n} {v:.3f} {u}" for n, v, u in zip(model.names, mae, model.units, strict=True)
    )
    header = ["λ_TV", "PSFs", "ΔSNR (dB)", "ΔSSIM"]
    return (
        f"Table V analogue: {a.images} images of 256×256 (`texture_2d` cells), each quadrant "
        f"blurred by its own random {LABELS[name]} PSF (drawn from the model's ranges; the "
        "quadrant is cut from the whole phantom blurred by its PSF), then "
        f"Poisson(ψ b)/ψ with ψ = {T5_PHOTONS:g} photons at intensity 1 plus "
        f"N(0, {T5_SIGMA:g}²). SV-TV-RL (eq. 13, overlap-add with bilinear masks, "
        f"{ITERATIONS} iterations, reflect border, PSFs cropped at 1e-4 energy loss) with "
        f"the maps shown; the CNN is the {LABELS[name]} network of the Table III run "
        "(window 128). ΔSNR and ΔSSIM against the sharp image, relative to the noisy "
        "blurred one; mean ± std over the images. Paper (λ_TV 0.1): true PSFs 2.14–2.24 dB, "
        "CNN 1.65–2.11 dB; goal: CNN within 0.5 dB of true. Mean absolute error of the "
        f"CNN's stride-128 parameters against the true ones: {err}.\n\n"
        + markdown_table(header, rows)
    )


# ------------------------------------------------------------------------------- Fig. 7


def section_noise(work: Path, a: argparse.Namespace) -> str:
    run = work / "runs" / "g1"
    rows = []
    levels = [("Poisson", f"ψ = {p:g}", [f"noise.photons=[{p}, {p}]",
               "noise.poisson_weight=[1.0, 1.0]", "noise.read_sigma=[0.0, 0.0]"])
              for p in POISSON_LEVELS]  # fmt: skip
    levels += [("Gaussian", f"σ = {s:g}", ["noise.photons=[1000.0, 1000.0]",
                "noise.poisson_weight=[0.0, 0.0]", f"noise.read_sigma=[{s}, {s}]"])
               for s in GAUSS_LEVELS]  # fmt: skip
    for i, (kind, level, items) in enumerate(levels):
        store = work / f"noise{i}.zarr"
        common = [f"samples={NOISE_SAMPLES}", "seed=101", "split={val: 0.0, test: 1.0}"]
        make_samples("g1", store, [*common, *items])
        report = evaluate(run, store)
        rows.append([kind, level, f"{report['r2']:.3f}", f"{report['a0_accuracy']:.3f}"])
        print(f"noise {kind} {level}: {report['r2']:.3f}", flush=True)
    header = ["Noise", "Level", "R² width", "a0 accuracy"]
    return (
        "Fig. 7 analogue: R² of the G-1 network of the Table III run on test sets of "
        f"{NOISE_SAMPLES} samples (seed 101, 10 % texture-less) made with one noise level "
        "each: pure shot noise (β = 1, ψ photons at the patch's peak, no read noise) and "
        "pure Gaussian read noise (β = 0, σ in units of the peak). Training covered "
        "ψ 50–2000 and σ 0–0.05.\n\n" + markdown_table(header, rows)
    )


# -------------------------------------------------------------------------------- speed


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def section_speed(work: Path, a: argparse.Namespace) -> str:
    from hpcdeconv.classical.sv_rl import crop_size, node_psfs, sv_richardson_lucy
    from hpcdeconv.config import RegressorConfig
    from hpcdeconv.models.regressor import Regressor
    from hpcdeconv.physics.phantoms import texture_2d
    from hpcdeconv.psfnet.estimate import estimate_psf_map
    from hpcdeconv.psfnet.psf_map import window_centres, write_psf_map
    from hpcdeconv.psfnet.regressor import load_regressor, regress

    rng = np.random.default_rng(11)
    loaded = load_regressor(work / "runs" / "g1", "cpu")
    model = loaded.model
    image = texture_2d((1024, 1024), rng, "cells")
    rows = []
    wide = Regressor(RegressorConfig(kind="resnet34", width=64), len(model.names) + 1).eval()
    for label, predict in (
        (f"trained, width {a.width}", loaded.predict),
        ("untrained, width 64 (paper's)", lambda p: regress(wide, model, p)),
    ):
        seconds = timed(lambda f=predict: estimate_psf_map(image, f, model, 128, 128), 3)
        rows.append([f"PSF map 1024², 64 windows, ResNet-34 {label}", f"{seconds * 1e3:.0f} ms"])
        print(rows[-1], flush=True)

    side = 2048
    big = texture_2d((side, side), rng, "cells")
    gy = len(window_centres(side, 128, 128))
    params = model.sample(rng, gy * gy).T.reshape(-1, gy, gy)
    psf_map = make_map(model, params, 128, (side, side))
    size = crop_size(psf_map.psfs(), 1e-4)
    psfs = node_psfs(psf_map, size)
    image_2k = sv_richardson_lucy(big, psfs, psf_map.centres, iterations=1)  # a blurred stand-in
    threads = torch.get_num_threads()
    began = time.perf_counter()
    whole = sv_richardson_lucy(image_2k, psfs, psf_map.centres, iterations=ITERATIONS)
    seconds = time.perf_counter() - began
    rows.append(
        [
            f"SV-RL 2048², {gy}×{gy} nodes, PSFs {size}×{size}, {ITERATIONS} it., "
            f"whole image, {threads} torch threads",
            f"{seconds:.1f} s",
        ]
    )
    print(rows[-1], flush=True)
    np.save(work / "img2k.npy", image_2k)
    write_psf_map(work / "map2k.zarr", psf_map, overwrite=True)
    out = work / "rl2k.zarr"
    for block in (256, None):
        extra = [] if block is None else ["--block", str(block)]
        cli_s = run_cli(
            ["rl", str(work / "img2k.npy"), "--psf-map", str(work / "map2k.zarr"),
             "--iterations", str(ITERATIONS), "--workers", "2", "--output", str(out),
             "--overwrite", *extra]
        )  # fmt: skip
        blocks = "default map_block 1024²" if block is None else f"--block {block}"
        rows.append(
            [
                f"SV-RL 2048², same map, `hpcdeconv rl --psf-map` with 2 dask workers, "
                f"{blocks} (wall, incl. start-up){compare(out, whole)}",
                f"{cli_s:.1f} s",
            ]
        )
        print(rows[-1], flush=True)
    return (
        "Speed on this CPU (no GPU in this session). PSF map: `estimate_psf_map` of a "
        "1024×1024 image, window 128, stride 128 (8×8 = 64 windows, one batch of 64), "
        "median of 3 after a warm-up; paper: 5.9 ms on a GTX 1080 (ResNet-34, width 64). "
        "SV-RL: a 2048×2048 image with a 16×16 G-1 map (window 128, stride 128, random "
        "widths 0.15–1.5 µm).\n\n" + markdown_table(["Task", "Time"], rows)
    )


def compare(out: Path, whole: np.ndarray) -> str:
    """`` (max |Δ| / max: …)`` between the driver's output and the whole-image result."""
    try:
        import zarr

        group = zarr.open_group(str(out), mode="r")
        result = np.squeeze(np.asarray(group["deconvolved"]["img2k"]["0"][...], np.float64))
        diff = np.abs(result - whole).max() / np.abs(whole).max()
        return f"; max |Δ| vs whole image {diff:.1e} of the max"
    except Exception as exc:
        return f"; output not compared ({type(exc).__name__})"


# --------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections, comma-separated")
    parser.add_argument("--models", default="g1,g2,z1", help="Table III models (g1,g2,z1,z3)")
    parser.add_argument("--samples", type=int, default=4096, help="samples per model")
    parser.add_argument("--steps", type=int, default=800, help="training steps per model")
    parser.add_argument("--batch", type=int, default=16, help="training batch size")
    parser.add_argument("--width", type=int, default=16, help="ResNet-34 width")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--images", type=int, default=6, help="Table V images")
    parser.add_argument("--tv", default="0,0.01,0.1", help="Table V λ_TV values")
    parser.add_argument("--work", type=Path, help="keep samples and runs here (reused)")
    parser.add_argument("--no-report", action="store_true", help="do not write docs/")
    a = parser.parse_args()
    only = [s for s in a.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    a.models = [m for m in a.models.split(",") if m]
    if set(a.models) - set(CONFIGS):
        parser.error(f"models must be among {sorted(CONFIGS)}")
    a.tv = [float(t) for t in a.tv.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench_psfnet_") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        funcs = {
            "r2": ("psfnet-r2", "PSF-parameter CNN: R² per parameter (Table III)", section_r2),
            "table5": (
                "psfnet-table5",
                "SV-TV-RL with true, CNN and global PSFs (Table V)",
                section_table5,
            ),
            "noise": (
                "psfnet-noise",
                "PSF-parameter CNN: R² against noise (Fig. 7)",
                section_noise,
            ),
            "speed": ("psfnet-speed", "PSF maps and SV-RL: speed", section_speed),
        }
        for name in SECTIONS:
            if name not in only:
                continue
            key, title, fn = funcs[name]
            began = time.perf_counter()
            body = fn(work, a)
            body += f"\n\nSection wall time: {time.perf_counter() - began:.0f} s."
            print(f"\n## {title}\n\n{body}\n", flush=True)
            if not a.no_report:
                write_section(key, title, body)


if __name__ == "__main__":
    main()
