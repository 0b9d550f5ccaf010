"""The ``.pth`` autoload hook, checked in fresh interpreters of this environment.

``mergekit_lore_autoload.pth`` runs ``_mergekit_lore_autoload.install()`` at start-up;
it must stay cheap (no torch / mergekit import), register ``lore`` when
``mergekit.merge_methods`` is imported, obey ``MERGEKIT_LORE_DISABLE_AUTOLOAD``,
and never break mergekit when something inside it fails.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, lore_config, subprocess_env, venv_executable

PTH_NAME = "mergekit_lore_autoload.pth"
HOOK_MODULE = "_mergekit_lore_autoload.py"


def run_python(code: str, *, env_overrides=None, cwd="/", timeout=300):
    """Run ``code`` in a fresh interpreter of the venv (site-packages and .pth active).

    Runs outside the repository (``cwd``) so that imports resolve as for a user,
    with ``MERGEKIT_LORE_DISABLE_AUTOLOAD`` and ``PYTHONPATH`` unset unless given.
    """
    env = subprocess_env()
    env.pop("MERGEKIT_LORE_DISABLE_AUTOLOAD", None)
    env.pop("PYTHONPATH", None)
    env.update(env_overrides or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd),
        timeout=timeout,
    )


def last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


# --------------------------------------------------------------------------- start-up


def test_pth_file_is_installed_in_site_packages():
    pth = site_packages() / PTH_NAME
    assert pth.is_file(), f"{pth} missing; reinstall with `pip install -e .`"
    assert pth.read_text() == (REPO_ROOT / PTH_NAME).read_text()
    assert pth.read_text().startswith("import _mergekit_lore_autoload;")
    # owned by the installed distribution, so `pip uninstall` removes it
    files = {str(f) for f in importlib.metadata.distribution("mergekit-lore").files or ()}
    assert PTH_NAME in files


def test_startup_is_cheap_and_installs_the_finder():
    out = last_json(
        run_python(
            """
            import json, sys
            heavy = sorted(m for m in ("torch", "mergekit", "mergekit_lore", "transformers")
                           if m in sys.modules)
            hooked = [type(f).__name__ for f in sys.meta_path
                      if getattr(f, "mergekit_lore_autoload", False)]
            print(json.dumps({"heavy": heavy, "hooked": hooked,
                              "hook": "_mergekit_lore_autoload" in sys.modules}))
            """
        )
    )
    assert out["heavy"] == [], f"interpreter start-up imported {out['heavy']}"
    assert out["hook"] is True
    assert out["hooked"] == ["LoreAutoloadFinder"]


def test_importing_mergekit_merge_methods_registers_lore():
    out = last_json(
        run_python(
            """
            import json, sys
            import mergekit.merge_methods as mm
            method = mm.get("lore")
            print(json.dumps({
                "name": method.spec.name,
                "pretty": method.spec.pretty_name,
                "url": method.spec.reference_url,
                "cls": type(method).__module__ + "." + type(method).__name__,
                "linear": mm.get("linear").spec.name,
                "lore_imported": "mergekit_lore" in sys.modules,
            }))
            """
        )
    )
    assert out["name"] == "lore"
    assert out["pretty"] == "LoRE-Merging"
    assert out["url"] == "https://arxiv.org/abs/2502.10749"
    assert out["cls"] == "mergekit_lore.method.LoreMerge"
    assert out["linear"] == "linear"
    assert out["lore_imported"] is True


def test_disable_variable_turns_autoload_off_and_explicit_import_still_registers():
    out = last_json(
        run_python(
            """
            import json, sys
            hooked = any(getattr(f, "mergekit_lore_autoload", False) for f in sys.meta_path)
            import mergekit.merge_methods as mm
            try:
                mm.get("lore")
                before = True
            except RuntimeError:
                before = False
            lore_imported = "mergekit_lore" in sys.modules
            import mergekit_lore
            after = mm.get("lore").spec.name
            print(json.dumps({"hooked": hooked, "before": before,
                              "lore_imported": lore_imported, "after": after}))
            """,
            env_overrides={"MERGEKIT_LORE_DISABLE_AUTOLOAD": "1"},
        )
    )
    assert out == {"hooked": False, "before": False, "lore_imported": False, "after": "lore"}


def test_registration_is_idempotent():
    out = last_json(
        run_python(
            """
            import importlib, json
            import mergekit_lore
            import mergekit_lore as again
            importlib.reload(mergekit_lore)  # runs register_lore() once more
            from mergekit_lore import register_lore
            results = [register_lore() for _ in range(3)]
            import _mergekit_lore_autoload
            _mergekit_lore_autoload.install()  # mergekit already imported: registers again
            from mergekit.merge_methods import registry
            names = [m.spec.name for m in registry.registered_methods()]
            print(json.dumps({"results": results, "count": names.count("lore"),
                              "same": again is mergekit_lore}))
            """
        )
    )
    assert out == {"results": [True, True, True], "count": 1, "same": True}


@pytest.mark.slow
def test_run_merge_from_python_uses_lore(family, tmp_path):
    config = lore_config(family.models, parameters={"max_iter": 20})
    (tmp_path / "config.json").write_text(json.dumps(config))
    out_dir = tmp_path / "merged"
    out = last_json(
        run_python(
            f"""
            import json, sys
            from mergekit.config import MergeConfiguration
            from mergekit.merge import run_merge
            from mergekit.options import MergeOptions
            config = MergeConfiguration.model_validate(json.load(open({str(tmp_path / "config.json")!r})))
            run_merge(config, {str(out_dir)!r}, options=MergeOptions(quiet=True))
            print(json.dumps({{"ok": True}}))
            """
        )
    )
    assert out == {"ok": True}
    assert (out_dir / "config.json").is_file()
    assert list(out_dir.glob("model*.safetensors"))
    assert "LoRE-Merging" in (out_dir / "README.md").read_text()


@pytest.fixture
def broken_shadow(tmp_path):
    """A ``mergekit_lore`` package that raises on import, for PYTHONPATH."""
    package = tmp_path / "shadow" / "mergekit_lore"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('simulated breakage in mergekit_lore')\n")
    return package.parent


def test_failure_inside_hook_warns_and_mergekit_still_works(broken_shadow):
    result = run_python(
        """
        import json, sys
        import mergekit.merge_methods as mm
        from mergekit.merge_methods import registry
        names = sorted(m.spec.name for m in registry.registered_methods())
        try:
            mm.get("lore")
            lore = True
        except RuntimeError:
            lore = False
        from mergekit.config import MergeConfiguration
        MergeConfiguration.model_validate(
            {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]})
        print(json.dumps({"linear": mm.get("linear").spec.name, "ties": "ties" in names, "lore": lore}))
        """,
        env_overrides={"PYTHONPATH": str(broken_shadow)},
    )
    out = last_json(result)
    assert out == {"linear": "linear", "ties": True, "lore": False}
    assert "could not register the 'lore' merge method" in result.stderr
    assert "simulated breakage" in result.stderr
    assert "Traceback" not in result.stderr


def test_failure_inside_register_function_warns():
    """register_lore itself raising (monkeypatched in the subprocess before mergekit loads)."""
    result = run_python(
        """
        import json, sys, types
        package = types.ModuleType("mergekit_lore")
        package.__path__ = []
        registration = types.ModuleType("mergekit_lore.registration")
        def register_lore():
            raise ValueError("registry exploded")
        registration.register_lore = register_lore
        package.registration = registration
        sys.modules["mergekit_lore"] = package
        sys.modules["mergekit_lore.registration"] = registration
        import mergekit.merge_methods as mm
        print(json.dumps({"linear": mm.get("linear").spec.name}))
        """
    )
    assert last_json(result) == {"linear": "linear"}
    assert "registry exploded" in result.stderr
    assert "could not register the 'lore' merge method" in result.stderr


@pytest.mark.slow
def test_mergekit_yaml_needs_the_hook(family, tmp_path):
    """Negative control for the e2e tests: with the hook off, stock mergekit-yaml
    does not know `lore` (so the e2e merges really go through the hook)."""
    config = tmp_path / "lore.yml"
    config.write_text(json.dumps(lore_config(family.models)))
    result = subprocess.run(
        [venv_executable("mergekit-yaml"), str(config), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=subprocess_env(MERGEKIT_LORE_DISABLE_AUTOLOAD="1"),
        timeout=300,
    )
    assert result.returncode != 0
    assert "Unimplemented merge method lore" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "config.json").exists()


# --------------------------------------------------------------------------- wheel


def _record_rows(wheel: zipfile.ZipFile):
    record_name = next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))
    rows = list(csv.reader(io.StringIO(wheel.read(record_name).decode())))
    return {row[0]: row for row in rows if row}


@pytest.mark.slow
def test_wheel_ships_pth_and_hook_at_root(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        capture_output=True,
        text=True,
        cwd=str(REPO_ROOT),
        env=subprocess_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheels = list(tmp_path.glob("mergekit_lore-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        assert PTH_NAME in names
        assert HOOK_MODULE in names
        assert "mergekit_lore/__init__.py" in names
        assert "mergekit_lore/registration.py" in names
        record = _record_rows(wheel)
        for name in (PTH_NAME, HOOK_MODULE):
            assert name in record, f"{name} not in RECORD: uninstall would leave it behind"
            algorithm, _, digest = record[name][1].partition("=")
            assert algorithm == "sha256"
            data = wheel.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == expected
            assert int(record[name][2]) == len(data)
        assert wheel.read(PTH_NAME) == (REPO_ROOT / PTH_NAME).read_bytes()
        assert wheel.read(HOOK_MODULE) == (REPO_ROOT / HOOK_MODULE).read_bytes()
