"""The installed package is one namespace: the built wheel holds nothing at its top level but earlyfusion*, an
install into a fresh environment adds nothing else to site-packages, and the `earlyfusion` command runs there.
(The layers are checked in test_layers.py.)"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("model", "tokenizer", "training", "sampling")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "No module named" in p.stderr and "setuptools" in p.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("earlyfusion-*.whl")
    return whl


def test_wheel_top_level_is_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert all(t.startswith("earlyfusion") for t in top), sorted(top)
    for stage in STAGES:
        assert f"earlyfusion/{stage}/__init__.py" in names
    assert "earlyfusion/training/data/__init__.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def test_install_into_fresh_env_adds_only_earlyfusion(wheel, tmp_path):
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    before = set(p.name for p in site.iterdir())
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    added = set(p.name for p in site.iterdir()) - before
    assert added and all(n.startswith("earlyfusion") for n in added), sorted(added)
    # the dependencies come from this test's own environment, after the fresh one's site-packages
    (site / "_deps_for_test.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(env / "bin" / "earlyfusion"), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0 and "tokenizer" in r.stdout and "sample" in r.stdout, r.stderr
    r = subprocess.run([str(py), "-c", "import earlyfusion.model.decoder as d; print(d.__file__)"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and str(site) in r.stdout, r.stderr
