"""One ``Registry`` type for methods, datasets and backbones (issue 25, item 4): one duplicate
policy, one error wording; the built-in datasets are named without importing their readers, so
``import ucdseg.data`` loads neither torchvision nor ``ucdseg.embedded``."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ucdseg
from ucdseg import cli, plugins
from ucdseg.data import DatasetMeta, PairedFolders, SegmentationDataset, dataset_class, register_dataset
from ucdseg.methods import get_method, register, unregister
from ucdseg.models import build_backbone, register_backbone
from ucdseg.registry import BACKBONES, DATASETS, METHODS, Registry, UnknownName

SRC = str(Path(ucdseg.__file__).resolve().parents[1])


class Tiles(SegmentationDataset):
    meta = DatasetMeta("tiles", ("background", "tile"), ((0, 0, 0), (255, 0, 0)))
    layout = PairedFolders(images="{split}/images", masks="{split}/masks", image_suffix=".jpg", mask_suffix=".png")


class OtherTiles(Tiles):
    pass


@pytest.fixture
def restore():
    """Forget what a test registers."""
    before = {registry: set(registry) for registry in (METHODS, DATASETS, BACKBONES)}
    yield
    for registry, names in before.items():
        for name in set(registry) - names:
            registry.unregister(name)


# ------------------------------------------------------------------------------ the one type
def test_a_registry_holds_one_object_per_name_and_names_the_holder():
    things = Registry("thing")
    first, second = object(), object()
    assert things.register("a", first, by="pkg.first") is first
    assert things.register("a", first, by="pkg.elsewhere") is first  # the same object again: nothing happens
    with pytest.raises(ValueError) as info:
        things.register("a", second, by="pkg.second")
    assert str(info.value) == "thing 'a' is already registered by module pkg.first"
    assert things.get("a") is first  # nothing replaced
    things.register("c", second, by="pkg.second")
    with pytest.raises(UnknownName) as info:
        things.get("b")
    assert str(info.value) == "unknown thing 'b': expected one of a, c"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert things.names() == ("a", "c") and "a" in things and "b" not in things
    things.unregister("a")
    assert things.names() == ("c",)
    with pytest.raises(ValueError, match="needs a non-empty name"):
        things.register(" ", first)


def test_a_builtin_entry_is_named_before_it_is_imported_and_taken_only_by_its_object():
    things = Registry("thing", {"path": "pathlib:PurePosixPath"})
    assert things.names() == ("path",) and "path" in things
    with pytest.raises(ValueError, match="^thing 'path' is already registered by module pathlib$"):
        things.register("path", dict)
    from pathlib import PurePosixPath

    assert things.register("path", PurePosixPath) is PurePosixPath  # the object the entry names: accepted
    assert things.get("path") is PurePosixPath


# ------------------------------------------------------------------------- the three kinds
def test_methods_datasets_and_backbones_share_the_policy_and_the_wording(restore):
    mib = get_method("mib")
    assert register(mib) is mib  # registering a registered method again is nothing
    with pytest.raises(ValueError, match=r"^method 'mib' is already registered by module ucdseg\.methods\.builtin$"):
        register(dataclasses.replace(mib, description="another mib"))
    with pytest.raises(ValueError, match=r"^dataset 'voc' is already registered by module ucdseg\.data\.voc$"):
        register_dataset("voc")(Tiles)
    with pytest.raises(ValueError, match=r"^backbone 'resnet18' is already registered by module "
                                         r"ucdseg\.models\.backbones$"):
        register_backbone("resnet18", (8, 16))(lambda output_stride: None)

    assert register_dataset("tiles")(Tiles) is Tiles and register_dataset("tiles")(Tiles) is Tiles
    with pytest.raises(ValueError, match=rf"^dataset 'tiles' is already registered by module {__name__}$"):
        register_dataset("tiles")(OtherTiles)
    mine = register(dataclasses.replace(mib, name="mib-again", base="mib"))
    with pytest.raises(ValueError, match=rf"^method 'mib-again' is already registered by module {__name__}$"):
        register(dataclasses.replace(mine, description="changed"))
    unregister("mib-again")
    assert "mib-again" not in METHODS

    for lookup, kind, name in ((get_method, "method", "mib-ucd"), (dataset_class, "dataset", "coco"),
                               (build_backbone, "backbone", "resnet7")):
        with pytest.raises(UnknownName) as info:
            lookup(name)
        registry = {"method": METHODS, "dataset": DATASETS, "backbone": BACKBONES}[kind]
        assert str(info.value) == f"unknown {kind} {name!r}: expected one of {', '.join(sorted(registry.names()))}"


def test_a_registry_refuses_what_is_not_of_its_kind(restore):
    with pytest.raises(ValueError, match=r"^method 'x': expected a Method, got"):
        METHODS.register("x", object())
    with pytest.raises(ValueError, match=r"^dataset 'x': expected a subclass of SegmentationDataset, got"):
        register_dataset("x")(dict)
    with pytest.raises(ValueError, match=r"^backbone 'x': expected a BackboneBuilder, got"):
        BACKBONES.register("x", lambda output_stride: None)


def test_entry_points_follow_the_registry_policy(restore):
    plugins._register("ucdseg.datasets", "tiles", Tiles, "my_tiles")
    plugins._register("ucdseg.datasets", "tiles", Tiles, "my_tiles")  # an entry point naming it again
    with pytest.raises(plugins.PluginError) as info:
        plugins._register("ucdseg.datasets", "tiles", OtherTiles, "other_tiles")
    assert str(info.value) == ("entry point 'tiles' (ucdseg.datasets): dataset 'tiles' is already registered by "
                               "module my_tiles")
    with pytest.raises(plugins.PluginError, match=r"^entry point 'mib' \(ucdseg.methods\): method 'mib' is already "
                                                  r"registered by module ucdseg\.methods\.builtin$"):
        plugins._register("ucdseg.methods", "mib", dataclasses.replace(get_method("mib"), description="x"), "mine")
    with pytest.raises(plugins.PluginError, match=r"expected a Method, got <function"):
        plugins._register("ucdseg.methods", "fn", lambda: None, "mine")


def test_the_builtin_datasets_are_named_by_their_classes():
    for name in ("voc", "ade", "cityscapes", "embedded"):
        assert dataset_class(name).meta.name == name
    assert DATASETS.names()[:5] == ("voc", "ade", "cityscapes", "embedded", "folder")


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_the_command_line_names_the_registered_datasets(restore, capsys):
    for argv in (("tasks",), ("index",), ("data", "check")):
        assert "a registered dataset: voc, ade, cityscapes, embedded, folder or your own" in help_of(capsys, *argv)
    register_dataset("tiles")(Tiles)
    assert "voc, ade, cityscapes, embedded, folder, tiles or your own" in help_of(capsys, "tasks")
    from ucdseg.data.prepare import ARCHIVES

    assert "{" + ",".join(ARCHIVES) + "}" in help_of(capsys, "data", "prepare")  # what data prepare can build


# --------------------------------------------------------------------------- what imports what
def loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_import_ucdseg_data_loads_neither_torchvision_nor_the_embedded_package():
    modules = loaded_by("import ucdseg.data")
    assert "ucdseg.data" in modules
    assert not {m for m in modules if m == "torchvision" or m.startswith(("torchvision.", "ucdseg.embedded"))}
    # the embedded reader is a dataset all the same: its name is known, its module imported on first use
    modules = loaded_by("from ucdseg.data import dataset_names, dataset_class\n"
                        "assert 'embedded' in dataset_names()\n"
                        "assert 'ucdseg.embedded.reader' not in sys.modules\n"
                        "assert dataset_class('embedded').__module__ == 'ucdseg.embedded.reader'")
    assert "ucdseg.embedded.reader" in modules


def test_the_registry_and_the_command_line_parser_import_nothing_heavy():
    modules = loaded_by("from ucdseg.cli import build_parser\nbuild_parser()")
    assert "torch" not in modules and "numpy" not in modules and "ucdseg.data" not in modules


def test_listing_the_methods_imports_no_torch():
    """``ucdseg methods`` reads the method declarations only: their losses and models (torch) are
    imported when a term or hook first runs (issue 25, item 6)."""
    modules = loaded_by("import contextlib, io\nfrom ucdseg.cli import main\n"
                        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['methods']) == 0")
    assert "ucdseg.methods.builtin" in modules and "ucdseg.methods.frozen" in modules
    assert not {m for m in modules if m.split(".")[0] in ("torch", "torchvision", "numpy")}
    assert not {m for m in modules if m.startswith(("ucdseg.losses.", "ucdseg.models.")) and
                m not in ("ucdseg.losses.defaults", "ucdseg.models.spec")}
