"""``hpcdeconv comi make-dataset`` from the CLI: the repository's synthetic configuration, a
store ``hpcdeconv info`` describes, and every bad input refused in one line with the inputs
byte-identical and no output written (nor an existing one touched)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from tests.conftest import assert_one_line_error, run_cli
from tests.unit.test_comi_data import write_bbbc006

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SMALL = ["source.phantoms.count=8", "source.phantoms.shape=[48, 64]", "source.draws=2"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def digest(root: Path) -> dict[str, str]:
    """Path → SHA-256 of every file below ``root`` (or of ``root`` itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_synthetic_config_writes_a_store_that_info_describes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "comi.zarr"
    argv = ["comi", "make-dataset", "--config", str(CONFIGS / "comi_data_synthetic.yaml")]
    code, stdout, err = run_cli([*argv, *_sets(SMALL), str(out)], capsys)
    assert code == 0, err
    assert "16 pairs (train 10, val 2, test 4) from 8 series of 8 fields" in stdout
    code, stdout, _ = run_cli(["info", str(out)], capsys)
    assert code == 0
    assert "blurred/phantom007_d1: shape=(48, 64) float32" in stdout
    assert "voxel=0.325x0.325 um" in stdout
    assert "split: train=10, val=2, test=4" in stdout
    assert '"comi_dataset":' in stdout and '"intensity":{"high":' in stdout
    code, _, err = run_cli([*argv, *_sets(SMALL), str(out)], capsys)
    assert_one_line_error(code, err, "comi.zarr exists; pass --overwrite to replace it")
    code, _, err = run_cli([*argv, *_sets(SMALL), "--overwrite", str(out)], capsys)
    assert code == 0, err


def _stack(path: Path, planes: int = 7, shape: tuple[int, int] = (16, 20)) -> Path:
    rng = np.random.default_rng(0)
    data = rng.integers(100, 4000, (planes, *shape)).astype(np.uint16)
    tifffile.imwrite(
        path, data, imagej=True, resolution=(2.0, 2.0), metadata={"axes": "ZYX", "unit": "um"}
    )
    return path


def _config(folder: Path, source: dict[str, object]) -> Path:
    path = folder / "comi_data.yaml"
    path.write_text(yaml.safe_dump({"source": source, "split": {"test": 0.25, "val": 0.0}}))
    return path


def _bbbc(inputs: Path, case: str) -> dict[str, object]:
    root = write_bbbc006(inputs / "BBBC006", planes=range(13, 20))
    if case == "missing":
        next((root / "BBBC006_v1_images_z_19").glob("*_h12_s1_w1*.tif")).unlink()
    elif case == "sizes":
        odd = next((root / "BBBC006_v1_images_z_17").glob("*_b07_s2_w2*.tif"))
        tifffile.imwrite(odd, np.zeros((24, 30), np.uint16))
    elif case == "pattern":
        return {"kind": "bbbc006", "root": str(root), "pattern": r"(?P<field>x)(?P<plane>\d)"}
    return {"kind": "bbbc006", "root": str(root), "voxel_size": [0.65, 0.65]}


def _source(case: str, inputs: Path) -> dict[str, object]:
    if case in ("focus", "offsets"):
        stack = str(_stack(inputs / "field.tif"))
        if case == "focus":
            return {"kind": "stacks", "stacks": [{"path": stack, "focus": 9}]}
        return {"kind": "stacks", "stacks": [{"path": stack}], "focus": 3, "offsets": [-3, 4]}
    if case == "empty":
        (inputs / "empty").mkdir()
        return {"kind": "bbbc006", "root": str(inputs / "empty")}
    return _bbbc(inputs, case)


BAD = {
    "focus": "field.tif (7 planes): no in-focus plane 9 among the planes present (0-6)",
    "offsets": "offset 4 from the in-focus plane 3 is plane 7, not among the planes present",
    "sizes": "plane 17 is (24, 30) but the in-focus plane 16 is (24, 32); the planes of one",
    "empty": "empty: no file below it matches source.pattern",
    "pattern": "BBBC006: no file below it matches source.pattern '(?P<field>x)(?P<plane>\\d)'",
    "missing": "field h12_s1 stain w1 below",
    "inside": "lies inside the source.root input",
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_touches_nothing(
    case: str, existing: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = _source(case, inputs)
    config = _config(inputs, source)
    out = inputs / "BBBC006" / "out.zarr" if case == "inside" else tmp_path / "out.zarr"
    argv = ["comi", "make-dataset", "--config", str(config), str(out)]
    if existing:
        # An earlier, good store at the output: a refused --overwrite must keep it.
        good = ["--config", str(CONFIGS / "comi_data_synthetic.yaml"), *_sets(SMALL)]
        assert run_cli(["comi", "make-dataset", *good, str(out)], capsys)[0] == 0
        argv.append("--overwrite")
    before = digest(tmp_path)
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, BAD[case])
    assert digest(tmp_path) == before
    assert out.exists() == existing
    if case == "missing":
        assert "no plane 19" in err and "planes present: 13-18" in err
