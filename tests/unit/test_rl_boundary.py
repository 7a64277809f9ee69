"""Richardson-Lucy at the borders and on small volumes (issue 11, section 5).

The boundary choice (``reflect`` keeps a uniform field uniform, ``truncated`` leaves the
documented rim), the mirrored operator against an independent numpy construction, the
block geometry of ``hpcdeconv rl`` for a PSF as large as the volume (no refusal, halo
clipped, the block-vs-halo rule only where the volume is split), block-wise == whole-volume
RL in both modes, read-only arrays without torch's warning, and the non-finite advice that
names only settings the verb has.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
import zarr
from distributed import Client

from hpcdeconv.classical.rl import richardson_lucy
from hpcdeconv.classical.rl_operator import build_operator
from hpcdeconv.cli import main
from hpcdeconv.config import DeconvolveConfig, RLConfig, load_config
from hpcdeconv.data.zarr_io import create_dataset, write_volume
from hpcdeconv.errors import ConfigError, InputError
from hpcdeconv.inference.driver import NonFiniteOutputError, deconvolve_volumes
from hpcdeconv.inference.plan import BlockPlan
from hpcdeconv.inference.predict import PredictSettings
from hpcdeconv.inference.processors import NetworkProcessor, RLProcessor
from hpcdeconv.inference.sources import open_sources
from hpcdeconv.inference.tiling import Block
from hpcdeconv.physics.forward import FFTConvolver, convolve
from hpcdeconv.physics.phantoms import microtubules
from hpcdeconv.physics.psf import gaussian

# The case: a uniform field of 100, 32 x 48 x 48, 15^3 Gaussian PSF, 20 iterations.
UNIFORM_SHAPE = (32, 48, 48)
UNIFORM_PSF = gaussian((15, 15, 15), (3.0, 2.0, 2.0))
REPO = Path(__file__).resolve().parents[2]


def asymmetric_psf(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Off-centre, lumpy unit-sum PSF: a mirrored or flipped operator shows as an error."""
    psf = np.roll(gaussian(shape, tuple(max(n / 5, 0.8) for n in shape)), 1, axis=0)
    psf = psf * (0.5 + rng.random(shape))
    return (psf / psf.sum()).astype(np.float64)


def mirrored_forward(x: np.ndarray, psf: np.ndarray, sides: list[tuple[str, str]]) -> np.ndarray:
    """Independent ``H x``: numpy's symmetric padding, then the numpy forward model."""
    widths = [
        (k // 2 if a == "reflect" else 0, k // 2 if b == "reflect" else 0)
        for k, (a, b) in zip(psf.shape, sides, strict=True)
    ]
    padded = np.pad(x, widths, mode="symmetric")
    blurred = convolve(padded, psf)  # zero-padded, centre k // 2 also for even k
    return blurred[tuple(slice(a, a + n) for (a, _), n in zip(widths, x.shape, strict=True))]


# ---------------------------------------------------------------------------------------
# The two boundaries on the uniform field
# ---------------------------------------------------------------------------------------


def test_reflect_keeps_a_uniform_field_uniform() -> None:
    field = np.full(UNIFORM_SHAPE, 100.0, np.float32)
    out = richardson_lucy(field, UNIFORM_PSF, iterations=20, boundary="reflect")
    # The issue asks for a few per cent; a constant is a fixed point, so round-off remains.
    assert np.abs(out / 100.0 - 1.0).max() < 1e-3
    # reflect is the default of the function and of rl.boundary.
    np.testing.assert_array_equal(richardson_lucy(field, UNIFORM_PSF, iterations=20), out)
    assert load_config(RLConfig, None, []).boundary == "reflect"


def test_truncated_leaves_the_documented_rim() -> None:
    field = np.full(UNIFORM_SHAPE, 100.0, np.float32)
    out = richardson_lucy(field, UNIFORM_PSF, iterations=20, boundary="truncated")
    # The values the issue measured and the module docstring / README document.
    assert out[0, 0, 0] == pytest.approx(1196.0, rel=2e-3)  # corners
    assert out[-1, -1, -1] == pytest.approx(1196.0, rel=2e-3)
    assert out[0, 24, 24] == pytest.approx(243.0, rel=2e-3)  # centre of a z face
    assert out.min() == pytest.approx(57.7, rel=5e-3)  # undershoot a few voxels in
    assert out[16, 24, 24] == pytest.approx(96.2, rel=5e-3)  # the centre, still off
    # Flux is conserved: the rim's excess balances the undershoot inside it.
    assert convolve(out.astype(np.float64), UNIFORM_PSF).sum() == pytest.approx(
        field.sum(), rel=1e-4
    )


# ---------------------------------------------------------------------------------------
# The mirrored operator
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "psf_shape", "sides"),
    [
        ((12, 14, 10), (5, 7, 3), [("reflect", "reflect")] * 3),
        (
            (12, 14, 10),
            (6, 4, 5),
            [("reflect", "truncated"), ("truncated", "reflect"), ("reflect", "reflect")],
        ),
        ((5, 6, 7), (11, 13, 15), [("reflect", "reflect")] * 3),  # PSF wider than the image
        ((20, 24), (9, 7), [("truncated", "truncated"), ("reflect", "reflect")]),
    ],
    ids=["odd", "even-mixed", "psf-larger", "2d"],
)
def test_mirrored_operator_matches_numpy_and_its_adjoint(shape, psf_shape, sides, rng) -> None:
    psf = asymmetric_psf(psf_shape, rng)
    operator = build_operator(torch.from_numpy(psf), shape, sides)
    x = rng.random(shape)
    y = rng.random(shape)
    forward = operator.forward(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(forward, mirrored_forward(x, psf, sides), rtol=1e-10, atol=1e-12)
    # <H x, y> == <x, H^T y>: the update uses the true adjoint.
    adjoint = operator.adjoint(torch.from_numpy(y)).numpy()
    assert float(np.vdot(forward, y)) == pytest.approx(float(np.vdot(x, adjoint)), rel=1e-10)


def test_reflect_rl_decreases_the_poisson_nll_of_its_model(rng) -> None:
    psf = asymmetric_psf((7, 7, 7), rng)
    truth = microtubules((20, 24, 24), rng)
    sides = [("reflect", "reflect")] * 3
    image = np.clip(mirrored_forward(truth, psf, sides), 0.0, None)
    nll = []
    for iterations in range(6):
        estimate = richardson_lucy(image, psf, iterations, eps=1e-12, boundary="reflect")
        blurred = mirrored_forward(estimate, psf, sides)
        nll.append(float(np.sum(blurred - image * np.log(np.maximum(blurred, 1e-300)))))
    assert all(b < a for a, b in itertools.pairwise(nll))


def test_per_side_boundaries_equal_the_single_names(rng) -> None:
    image = rng.random((10, 12, 14)).astype(np.float32)
    psf = gaussian((5, 5, 5), (1.0, 1.5, 1.5))
    for name in ("reflect", "truncated"):
        np.testing.assert_array_equal(
            richardson_lucy(image, psf, 4, boundary=[(name, name)] * 3),
            richardson_lucy(image, psf, 4, boundary=name),
        )


@pytest.mark.parametrize(
    "boundary", ["periodic", [("reflect", "reflect")] * 2, [("reflect", "mirror")] * 3], ids=str
)
def test_unknown_boundary_is_a_config_error(boundary) -> None:
    with pytest.raises(ConfigError, match="boundary"):
        richardson_lucy(np.ones((6, 6, 6), np.float32), np.ones((3, 3, 3)), 1, boundary=boundary)
    if isinstance(boundary, str):
        with pytest.raises(ConfigError, match="boundary"):
            load_config(RLConfig, None, [f"boundary={boundary}"])


# ---------------------------------------------------------------------------------------
# Read-only arrays (memory-mapped TIFFs, arrays deserialised on a dask worker)
# ---------------------------------------------------------------------------------------


READ_ONLY_SCRIPT = """
import sys
import numpy as np
from hpcdeconv.classical.rl import richardson_lucy
from hpcdeconv.inference.plan import BlockPlan
from hpcdeconv.inference.processors import RLProcessor
from hpcdeconv.inference.sources import open_sources
from hpcdeconv.physics.psf import gaussian

source = open_sources([sys.argv[1]])[0]
data = source.read((slice(None),) * 3)  # today a view of the memory-mapped TIFF
data.flags.writeable = False  # read-only whichever way the reader gets it
psf = gaussian((5, 5, 5), (1.0, 1.0, 1.0))
psf.flags.writeable = False  # as dask deserialises it on a worker
block = BlockPlan((64, 64, 64), (2, 2, 2), (64, 64, 64)).grid(data.shape)[0]
np.save(sys.argv[2], richardson_lucy(data, psf, 3))
np.save(sys.argv[3], RLProcessor(psf, 3)(data, block))
richardson_lucy(np.ascontiguousarray(data)[::-1], psf, 1)  # reversed views are copied
"""


def test_read_only_arrays_run_without_torch_warning(tmp_path: Path, rng) -> None:
    # torch warns about a non-writable array once per process, so a fresh process is the
    # only place where its absence can be observed; -W error turns it into a failure.
    image = rng.random((12, 16, 16)).astype(np.float32)
    tifffile.imwrite(tmp_path / "v.tif", image)
    outputs = [tmp_path / "direct.npy", tmp_path / "block.npy"]
    command = [sys.executable, "-W", "error::UserWarning", "-c", READ_ONLY_SCRIPT]
    done = subprocess.run(
        [*command, str(tmp_path / "v.tif"), *map(str, outputs)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "not writable" not in done.stderr
    expected = richardson_lucy(image, gaussian((5, 5, 5), (1.0, 1.0, 1.0)), 3)
    for output in outputs:
        np.testing.assert_array_equal(np.load(output), expected)


# ---------------------------------------------------------------------------------------
# Block geometry for small volumes and large PSFs
# ---------------------------------------------------------------------------------------


def test_a_volume_that_fits_in_the_block_is_not_refused() -> None:
    # The bead case: 64^3 volume, 64^3 PSF -> rl_halo 192, default block 256.
    plan = BlockPlan((256, 256, 256), (192, 192, 192), (64, 64, 64))
    plan.check((64, 64, 64))
    assert plan.halo_for((64, 64, 64)) == (64, 64, 64)
    (block,) = plan.grid((64, 64, 64))
    assert block.read == block.write == (slice(0, 64),) * 3
    assert block.pad == ((64, 64),) * 3 and block.border == ((True, True),) * 3
    # Split along x only: the rule applies there alone, other axes keep their halo.
    mixed = BlockPlan((256, 256, 64), (192, 192, 32), (64, 64, 64))
    mixed.check((64, 64, 200))
    blocks = mixed.grid((64, 64, 200))
    assert len(blocks) == 4 and blocks[1].read[2] == slice(32, 160)
    assert blocks[1].border == ((True, True), (True, True), (False, False))


def test_the_block_halo_rule_names_the_flag_that_fixes_it() -> None:
    plan = BlockPlan((256, 256, 256), (192, 192, 192), (64, 64, 64))
    with pytest.raises(ConfigError) as error:
        plan.check((64, 64, 300), "beads.tif")
    message = str(error.value)
    assert message == (
        "beads.tif (64, 64, 300): block (256, 256, 256) is smaller than 2 x halo "
        "(192, 192, 192) along x, where the volume needs several blocks; "
        "use --block 320 or more, or --halo 128 or less"
    )
    # Both suggestions are accepted.
    BlockPlan((320,) * 3, (192,) * 3, (64,) * 3).check((64, 64, 300))
    BlockPlan((256,) * 3, (128,) * 3, (64,) * 3).check((64, 64, 300))
    # Chunks that differ per axis: the suggested block is a multiple of all of them.
    odd = BlockPlan((48, 48, 48), (30, 30, 30), (16, 16, 24))
    with pytest.raises(ConfigError, match=r"along z, y, x.*use --block 96 or more"):
        odd.check((100, 100, 100))


@pytest.fixture(scope="module")
def beads(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """(beads.tif, bead_psf.tif, volume, PSF): 64^3 beads and a measured-size 64^3 PSF."""
    folder = tmp_path_factory.mktemp("beads")
    rng = np.random.default_rng(11)
    psf = gaussian((64, 64, 64), (4.0, 2.0, 2.0))
    beads = np.zeros((64, 64, 64), np.float32)
    beads[tuple(rng.integers(8, 56, size=(12, 3)).T)] = 1000.0
    volume = (np.clip(convolve(beads, psf), 0.0, None) + 10.0).astype(np.float32)
    tifffile.imwrite(folder / "beads.tif", volume)
    tifffile.imwrite(folder / "bead_psf.tif", psf)
    return folder / "beads.tif", folder / "bead_psf.tif", volume, psf


def test_rl_cli_runs_a_psf_as_large_as_the_volume(
    beads: tuple[Path, Path, np.ndarray, np.ndarray],
    client: Client,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image, psf_path, volume, psf = beads
    common = ["rl", "--psf", str(psf_path), str(image), "--iterations", "3"]
    common += ["--scheduler", client.scheduler.address]
    assert main([*common, "--output", str(tmp_path / "default.zarr")]) == 0
    assert "1 block(s) computed" in capsys.readouterr().out  # the whole volume, one block
    assert main([*common, "--block", "384", "--output", str(tmp_path / "one.zarr")]) == 0
    default = zarr.open_array(tmp_path / "default.zarr" / "deconvolved" / "beads" / "0", mode="r")
    one = zarr.open_array(tmp_path / "one.zarr" / "deconvolved" / "beads" / "0", mode="r")
    np.testing.assert_array_equal(default[...], one[...])
    whole = richardson_lucy(volume, psf, 3)
    np.testing.assert_allclose(default[...], whole, rtol=0, atol=1e-6 * whole.max())
    image = zarr.open_group(tmp_path / "default.zarr" / "deconvolved" / "beads", mode="r")
    assert image.attrs["provenance"]["config"]["boundary"] == "reflect"
    assert image.attrs["provenance"]["processor"]["boundary"] == "reflect"


# ---------------------------------------------------------------------------------------
# Block-wise == whole volume, in both modes
# ---------------------------------------------------------------------------------------


def _write_zarr(store: Path, volume: np.ndarray) -> Path:
    write_volume(create_dataset(store), "blurred/v0", volume, (0.2, 0.1, 0.1), chunks=(8, 8, 8))
    return store / "blurred" / "v0"


@pytest.mark.parametrize("boundary", ["reflect", "truncated"])
def test_blockwise_rl_equals_whole_volume_in_both_modes(
    boundary: str, client: Client, tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    psf = gaussian((5, 5, 5), (1.5, 1.0, 1.0))
    volume = (np.clip(convolve(microtubules((16, 48, 40), rng), psf), 0, None) + 0.01).astype(
        np.float32
    )
    sources = open_sources([_write_zarr(tmp_path / "in.zarr", volume)])
    # 3 iterations of a radius-2 PSF couple voxels 12 apart: a halo of 12 makes block cores
    # exact. z fits in one block, so its halo of 30 (over half the block) is allowed and
    # clipped to the volume; y and x are split into 2 blocks each.
    plan = BlockPlan((24, 24, 24), (30, 12, 12), (8, 8, 8))
    assert len(plan.grid(volume.shape)) == 4
    processor = RLProcessor(psf, 3, boundary=boundary)
    out = tmp_path / "out.zarr"
    deconvolve_volumes(client, sources, out, processor, plan, progress=False)
    whole = richardson_lucy(volume, psf, 3, boundary=boundary)
    result = zarr.open_array(out / "deconvolved" / "v0" / "0", mode="r")[...]
    assert np.abs(result - whole).max() <= 1e-5 * whole.max()
    # The modes differ at the volume's border, so each was really applied there.
    other = richardson_lucy(
        volume, psf, 3, boundary="truncated" if boundary == "reflect" else "reflect"
    )
    assert np.abs(result - other).max() > 1e-3 * whole.max()


# ---------------------------------------------------------------------------------------
# Advice on non-finite output names only the verb's own settings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_network_advice_names_deconvolves_precision_setting(precision: str) -> None:
    settings = PredictSettings(tile=(16, 16, 16), overlap=0, blend="constant", batch_size=1)
    processor = NetworkProcessor(Path("x.pt"), "0" * 64, settings, precision)
    if precision == "fp32":
        assert processor.nonfinite_advice == ""  # fp32 has nothing to fall back to
    else:
        assert (
            processor.nonfinite_advice == "fp16 may have overflowed; run with --set precision=fp32"
        )
    assert "precision" in DeconvolveConfig.model_fields


class _InfRL(RLProcessor):
    """RL whose result overflows on every block, as float32 RL does on huge intensities."""

    def __call__(self, data: np.ndarray, block: Block) -> np.ndarray:
        out = super().__call__(data, block)
        return out * np.float32(np.inf)


def test_rl_overflow_message_names_no_setting_rl_lacks(client: Client, tmp_path: Path) -> None:
    volume = np.ones((8, 8, 8), np.float32)
    sources = open_sources([_write_zarr(tmp_path / "in.zarr", volume)])
    processor: Any = _InfRL(gaussian((3, 3, 3), (1.0, 1.0, 1.0)), 1)
    with pytest.raises(NonFiniteOutputError) as error:
        deconvolve_volumes(
            client,
            sources,
            tmp_path / "o.zarr",
            processor,
            BlockPlan((8, 8, 8), (0, 0, 0), (8, 8, 8)),
            progress=False,
        )
    message = str(error.value)
    assert "precision" not in message and "fp32" not in message
    assert message.endswith("RL computes in float32; scale the input's intensities down")
    assert not set(RLConfig.model_fields) & {"precision"}


def test_fft_shape_shorter_than_the_volume_is_refused() -> None:
    psf = torch.ones(3, 3)
    with pytest.raises(InputError, match="fft_shape"):
        FFTConvolver(psf, (8, 8), fft_shape=(6, 8))
