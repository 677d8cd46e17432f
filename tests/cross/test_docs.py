"""The README and docs/ as a new user meets them: install order, links, keys that exist, an ignore list that ignores."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.fixtures.hydra import compose_config
from tests.fixtures.readme import README, REPO, anchors, documented_defaults, first_column_names, links, section

DOCS = sorted((REPO / "docs").glob("*.md"))


def test_the_cpu_build_comes_before_the_first_install() -> None:
    text = README.read_text(encoding="utf-8")
    cpu = text.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < text.index("pip install -e"), "a CPU user reads the CPU install only after downloading CUDA"
    assert "unreachable" in text[: text.index("pip install -e")]


def test_the_test_command_installs_what_the_megadetector_tests_import() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    pinned = re.search(r"--no-deps (\"megadetector[^\n]*)", ci)
    assert pinned is not None
    packages = re.findall(r"[\w-]+==[\d.]+", pinned.group(1))
    command = next(line for line in README.read_text(encoding="utf-8").splitlines() if "pytest" in line)
    assert all(package in command for package in packages), (packages, command)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_links_stay_in_the_repository_and_resolve(path: Path) -> None:
    for target in links(path):
        if target.startswith(("http://", "https://")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.is_relative_to(REPO), f"{path.name} links outside the repository: {target}"
        assert linked.exists(), f"{path.name} links to a missing file: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{path.name}: no heading for #{anchor} in {linked.name}"


def test_every_documented_prepare_key_exists() -> None:
    import prepare  # noqa: F401  (registers the settings schema the config extends)

    config = compose_config("prepare", set_hydra=False)
    documented = first_column_names(section("prepare.py"))
    assert len(documented) > 30
    for key in documented:
        if "*" in key or "<" in key:
            continue
        assert OmegaConf.select(config, key, default="MISSING") != "MISSING", f"README documents unknown key {key}"


@pytest.mark.parametrize(
    ("heading", "config_name", "prefix", "described"),
    [
        # Described in words, not as a value: each one's actual default is null.
        ("prepare.py", "prepare", "", {"dataset": "CCT file stem", "crops.workers": "all cores"}),
        (
            "train.py",
            "train",
            "",
            # debug is a config group (no debug config by default), not a key.
            {
                "model.pretrained": "true (tiny: false)",
                "eval.tta": "set by the recipe",
                "callbacks.<name>": None,
                "debug": None,
            },
        ),
        ("Label review", "review", "review.", {}),
    ],
)
def test_the_readme_gives_the_defaults_the_settings_define(
    heading: str, config_name: str, prefix: str, described: dict[str, str | None]
) -> None:
    """Each default is defined once (a settings class, or the YAML file for what has none); the README's tables must
    say the same value."""
    import yaml

    import prepare  # noqa: F401  (registers the settings schema the config extends)

    config = compose_config(config_name, set_hydra=False)
    documented = documented_defaults(section(heading))
    assert len(documented) > 8
    for key, written in documented.items():
        if key in described:
            continue
        actual = OmegaConf.select(config, prefix + key, default="MISSING")
        value = yaml.safe_load(written.strip("`"))
        assert actual == value, f"README says {prefix}{key} defaults to {written}, the settings say {actual!r}"


def test_the_readme_is_for_starting_and_looking_up() -> None:
    text = README.read_text(encoding="utf-8")
    # The score formula, the test-by-test reliability list and the old bugs live in docs/.
    assert "score = sum over splits" not in text and "Old bugs fixed" not in text and "*Tests:*" not in text
    assert len(text.splitlines()) < 500


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_gitignore_ignores_no_tracked_file() -> None:
    tracked_but_ignored = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked_but_ignored == []


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_every_repository_path_named_in_code_configs_and_docs_exists() -> None:
    """No stale references: a file or folder of this repository named anywhere in its text exists."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    named = re.compile(r"(?<![\w/.-])((?:animl_lightning|configs|tests|benchmarks|docs|\.ci)/[\w./-]*\w)(?![\w<*])")
    # Not of this checkout: files a user creates (configs/local/), the installed wheel's layout (the package's own
    # configs/), and result stems written as NAME.* in the benchmark page.
    elsewhere = ("configs/local/", "animl_lightning/configs")
    stale = []
    for name in tracked:
        path = REPO / name
        if (path.suffix not in {".py", ".yaml", ".md", ".toml"} and name != ".ci/run") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in named.finditer(text):
            ref = match.group(1)
            if ref.startswith(elsewhere) or text[match.end() : match.end() + 2] == ".*":
                continue
            # NAME.{json,md}: each of the files
            suffixes = re.match(r"\.\{([\w,]+)\}", text[match.end() :])
            refs = [f"{ref}.{suffix}" for suffix in suffixes.group(1).split(",")] if suffixes else [ref, f"{ref}.py"]
            if not any((REPO / one).exists() for one in refs) or (
                suffixes and not all((REPO / one).exists() for one in refs)
            ):
                stale.append(f"{name}: {ref}")
    assert stale == []
