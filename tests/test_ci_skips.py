"""Under CI=true a skip fails the run (tests/ci_skips.py): a test file whose only test
skips, or that skips at import, makes pytest fail there, and passes elsewhere."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SKIPPING = {
    "test_skips_inside.py": "import pytest\n\ndef test_needs_something():\n    pytest.skip('no such thing here')\n",
    "test_skips_at_import.py": "import pytest\npytest.importorskip('no_such_module_anywhere')\n\n"
                               "def test_never_runs():\n    pass\n",
}


@pytest.mark.parametrize("name", sorted(SKIPPING))
@pytest.mark.parametrize("ci", ["true", ""])
def test_a_skip_fails_only_in_ci(tmp_path, name, ci):
    (tmp_path / name).write_text(SKIPPING[name])
    env = dict(os.environ, CI=ci, PYTHONPATH=str(REPO_ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider",
                           str(tmp_path / name)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if ci:
        assert proc.returncode != 0, proc.stdout
        assert "skipped under CI=true" in proc.stdout
    else:  # pytest's 5: nothing ran (the module skipped at import)
        assert proc.returncode in (0, 5) and "1 skipped" in proc.stdout, proc.stdout
