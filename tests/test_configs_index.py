"""Packaged configs by name (issue 24, item 1): ``ucdseg run voc/15-1-overlapped/mib_ucd`` from any
folder, a path that exists wins, ``ucdseg configs [PATTERN]`` lists them, ``_base_`` by name.

The expected names are derived here from the files in the package's ``configs/`` folder (walked
with ``os.walk``, not with the code under test)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ucdseg
from ucdseg import cli
from ucdseg.config import ConfigError, load_config, resolve_config
from ucdseg.configs_index import config_root, describe, list_configs

PACKAGE_CONFIGS = Path(ucdseg.__file__).parent / "configs"


def walked_names() -> list[str]:
    names = []
    for folder, _, files in os.walk(PACKAGE_CONFIGS):
        for f in files:
            if f.endswith(".yaml") and not f.startswith("_"):
                names.append((Path(folder) / f).relative_to(PACKAGE_CONFIGS).as_posix()[: -len(".yaml")])
    return sorted(names)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_every_packaged_config_is_listed_by_name_without_the_base_layers():
    assert config_root() == PACKAGE_CONFIGS
    names = list_configs()
    assert names == walked_names()
    assert {"embedded/mib", "voc/15-1-overlapped/mib_ucd", "ade/100-10/plop", "demo"} <= set(names)
    assert not any(Path(n).name.startswith("_") for n in names)


def test_a_pattern_keeps_the_names_holding_it_or_matching_its_glob():
    assert list_configs("voc") == [n for n in walked_names() if "voc" in n]
    assert list_configs("voc/*/plop*") == [n for n in walked_names() if n.startswith("voc/")
                                           and Path(n).name.startswith("plop")]
    assert list_configs("15-1-overlapped/mib.yaml") == ["voc/15-1-overlapped/mib"]
    assert list_configs("nothing-like-this") == []


@pytest.mark.parametrize("name", ["embedded/mib", "embedded/mib.yaml", "configs/embedded/mib.yaml"])
def test_a_name_resolves_to_the_packaged_file_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: no configs/ here
    assert resolve_config(name) == PACKAGE_CONFIGS / "embedded" / "mib.yaml"
    cfg = load_config(resolve_config(name))
    assert cfg.method.name == "mib" and cfg.task.name == "6-1"  # 6-1 comes from its _base_


def test_a_path_that_exists_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "embedded").mkdir()
    mine = tmp_path / "embedded" / "mib.yaml"
    mine.write_text("method: {name: ft}\n")
    assert resolve_config("embedded/mib.yaml") == Path("embedded/mib.yaml")
    assert load_config(resolve_config("embedded/mib.yaml")).method.name == "ft"
    assert resolve_config("embedded/mib") == PACKAGE_CONFIGS / "embedded" / "mib.yaml"  # no such path here


def test_an_unknown_name_is_one_line_naming_the_closest_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_config("voc/15-1-overlaped/mib_ucd")
    message = str(info.value)
    assert "\n" not in message and "config file voc/15-1-overlaped/mib_ucd does not exist" in message
    assert "did you mean voc/15-1-overlapped/mib_ucd" in message and "`ucdseg configs`" in message


def test_base_may_name_a_packaged_config(tmp_path):
    own = tmp_path / "run.yaml"
    own.write_text("_base_: voc/15-1-overlapped/mib\nname: mine\ntrain: {batch_size: 8}\n")
    cfg = load_config(own)
    assert (cfg.name, cfg.method.name, cfg.task.name, cfg.data.dataset, cfg.train.batch_size) == \
        ("mine", "mib", "15-1", "voc", 8)
    assert cfg.method.weights == {"unkd": 100.0}  # from the packaged voc/15-1-overlapped/mib.yaml
    sibling = tmp_path / "b.yaml"  # a file beside it still wins
    sibling.write_text("name: beside\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    assert load_config(tmp_path / "c.yaml").name == "beside"


def test_describe_reads_the_layers_as_the_loader_merges_them():
    for name in ("embedded/mib", "voc/15-1-overlapped/mib_ucd", "ade/100-10/plop_ucd", "demo"):
        cfg = load_config(PACKAGE_CONFIGS / f"{name}.yaml")
        assert describe(name) == {"name": name, "dataset": cfg.data.dataset, "task": cfg.task.name,
                                  "setting": cfg.data.setting, "method": cfg.method.name}


def test_configs_command_lists_the_voc_configs():
    code, out, err = run_cli("configs", "voc")
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    voc = [n for n in walked_names() if "voc" in n]
    assert [line.split()[0] for line in lines[:-1]] == voc
    assert lines[lines.index(next(l for l in lines if l.startswith("voc/15-1-overlapped/mib_ucd ")))].split()[1:] == \
        ["voc", "15-1", "overlapped,", "mib+ucd"]
    assert lines[-1].startswith(f"({len(voc)} config(s) in {PACKAGE_CONFIGS}")
    code, out, err = run_cli("configs", "coco")
    assert code == 2 and out == "" and err.startswith("ucdseg: error: no packaged config matches 'coco'")


def test_run_takes_a_name_and_a_bad_name_fails_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("--quiet", "run", "embedded/mbi", f"output_dir={tmp_path / 'runs'}")
    assert code == 2 and out == "" and err.count("\n") == 1 and "did you mean embedded/mib" in err
    assert list(tmp_path.iterdir()) == []


def test_listing_commands_import_no_torch():
    """``configs``, ``runs``, ``tasks`` and ``--help`` answer without importing torch (issue 24,
    item 9: they must answer in under 2 s on a busy machine; importing torch alone takes seconds)."""
    src = str(Path(cli.__file__).resolve().parents[1])
    code = ("import sys, contextlib, io\nfrom ucdseg import cli\n"
            "for argv in (['configs'], ['configs', 'voc'], ['runs', sys.argv[1]], ['tasks', 'voc'], ['--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            cli.main(argv)\n        except SystemExit:\n            pass\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(PACKAGE_CONFIGS)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": src}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
