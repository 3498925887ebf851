"""The CUDA image (Dockerfile, .dockerignore, image/) and the users' CI workflow (ci/github-actions.yml).

Building and running the image takes tens of minutes (`make image`, `make image-test`, docs/image.md), so
here the Dockerfile is linted with hadolint and reviewed with checkov, and what it must agree with (the
pins, the chart, the package, the local base image) is checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support.helmtool import CHART_DIR, NPM_HELM, REPO_ROOT, checkov_report, hadolint_binary

DOCKERFILE = REPO_ROOT / "Dockerfile"
WORKFLOW = REPO_ROOT / "ci" / "github-actions.yml"
OCI_LABELS = ("title", "description", "version", "revision", "created", "source", "licenses", "base.name")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def build_args() -> dict[str, str]:
    args = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)


def constraint(package: str) -> str:
    text = (REPO_ROOT / "requirements" / "constraints.txt").read_text()
    match = re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE | re.IGNORECASE)
    assert match, f"requirements/constraints.txt does not pin {package}"
    return match.group(1)


# ---- lint and security review -----------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    labels = [
        arg for label in OCI_LABELS for arg in ("--require-label", f"org.opencontainers.image.{label}:text")
    ]
    proc = subprocess.run(
        [
            str(hadolint_binary()),
            "--format",
            "json",
            "--failure-threshold",
            "style",
            *labels,
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and not findings, (
        "\n".join(f"Dockerfile:{f['line']} {f['code']} {f['message']}" for f in findings) or proc.stderr
    )
    # An ignore pragma must say why, on the comment line just above it.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            codes = line.split("=", 1)[1].split(",")
            reason = lines[number - 1]
            assert reason.startswith("# ") and all(code in reason for code in codes), f"line {number + 1}"


def test_hadolint_gate_is_real(tmp_path: Path) -> None:
    """Negative control: the lint run above does fail on a Dockerfile with the usual mistakes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:latest\nRUN pip install flash-attn\nUSER root\n")
    proc = subprocess.run(
        [str(hadolint_binary()), "--format", "json", str(bad)], capture_output=True, text=True
    )
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert proc.returncode != 0 and {"DL3007", "DL3013", "DL3042", "DL3002"} <= codes, codes


def test_checkov_finds_nothing_unjustified() -> None:
    report = checkov_report("--file", str(DOCKERFILE), "--framework", "dockerfile")
    failed = report["results"]["failed_checks"]
    assert not failed, "\n".join(
        f"{c['check_id']} {c['check_name']} (line {c['file_line_range']})" for c in failed
    )
    assert report["summary"]["passed"] > 50, report["summary"]
    skipped = {
        c["check_id"]: c["check_result"].get("suppress_comment", "")
        for c in report["results"]["skipped_checks"]
    }
    # Only the health check is waived, and with a reason: a batch job is judged by its exit status.
    assert set(skipped) <= {"CKV_DOCKER_2"}, skipped
    assert all(len(reason) > 20 for reason in skipped.values()), skipped


# ---- the image agrees with the pins, the package and the chart -----------------------------------------


def test_base_image_is_debian_slim_and_cuda_comes_from_the_pinned_wheels() -> None:
    froms = [rest for keyword, rest in dockerfile_instructions() if keyword == "FROM"]
    assert froms == ["debian:bookworm-slim"], froms
    # make image builds FROM the image/base.sh makes under the same name, never pulling it.
    base_sh = (REPO_ROOT / "image" / "base.sh").read_text()
    assert 'name="${1:-docker.io/library/debian:bookworm-slim}"' in base_sh
    assert "--variant=minbase" in base_sh and " bookworm " in base_sh
    build_sh = (REPO_ROOT / "image" / "build.sh").read_text()
    assert "--pull=never" in build_sh and "bash image/base.sh" in build_sh
    labels = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "LABEL")
    assert 'org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"' in labels
    # nvcc is the CUDA release of torch's runtime wheels (12.4.x), the interpreter Debian 12's CPython 3.11.
    runtime = constraint("nvidia-cuda-runtime-cu12")
    assert build_args()["CUDA_NVCC_VERSION"].split(".")[:2] == runtime.split(".")[:2]
    runs = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")
    assert "python3.11 -m venv /opt/venv" in runs
    assert f"torch.__version__.split('+')[0] == '{constraint('torch')}'" in runs
    assert f"torch.version.cuda == '{'.'.join(runtime.split('.')[:2])}'" in runs
    assert build_args()["FLASH_ATTN_INSTALL"] == "prebuilt"


def test_flash_attn_wheel_matches_torch_cuda_and_python() -> None:
    """Run the Dockerfile's own wheel-name snippet against this torch (the same pip wheel as the base's)."""
    args = build_args()
    flash = next(r for k, r in dockerfile_instructions() if k == "RUN" and "FLASH_ATTN_INSTALL" in r)
    code = re.search(r"python -c '([^']*GLIBCXX_USE_CXX11_ABI[^']*)'", flash).group(1)
    env = {
        "FLASH_ATTN_VERSION": args["FLASH_ATTN_VERSION"],
        "FLASH_ATTN_RELEASES": args["FLASH_ATTN_RELEASES"],
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=300,
    )
    cuda_major = constraint("nvidia-cuda-runtime-cu12").split(".")[0]
    torch_minor = ".".join(constraint("torch").split(".")[:2])
    version = args["FLASH_ATTN_VERSION"]
    # torch 2.5's pip wheels use the pre-C++11 ABI; flash-attn publishes a wheel per ABI.
    assert out.stdout.strip() == (
        f"{args['FLASH_ATTN_RELEASES']}/v{version}/flash_attn-{version}"
        f"+cu{cuda_major}torch{torch_minor}cxx11abiFALSE-cp311-cp311-linux_x86_64.whl"
    )
    # cp311: the image's CPython (Debian 12's) is the only one the project supports.
    assert (
        tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
        == ">=3.11,<3.12"
    )
    assert "FLASH_ATTN_WHEEL:-" in flash  # a build arg can still name another wheel
    assert "import flash_attn" in flash  # an ABI mismatch fails the build, not the first training step


def test_installs_with_the_shared_constraints_and_the_package() -> None:
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    pip_runs = [r for r in runs if re.search(r"\bpip install\b", r)]
    dependency_installs = [
        r for r in pip_runs if "-r /tmp/requirements.txt" in r or re.search(r"\s\.(\s|$)", r)
    ]
    assert len(dependency_installs) == 2, pip_runs
    for run in dependency_installs:
        assert "-c requirements/constraints.txt" in run, run
    assert any(re.search(r"pip install [^&]*\s\.(\s|$)", r) for r in pip_runs), (
        "the trainer package is not installed"
    )
    # No installer cache in a layer: uv's is a build cache mount, the rest download uncached.
    for run in pip_runs:
        assert "--no-cache" in run or "--mount=type=cache,id=r1-grpo-uv,target=/root/.cache/uv" in run, run
    # The flash-attn source build happens only when a build arg asks for it.
    flash = next(r for r in runs if "FLASH_ATTN_INSTALL" in r)
    assert "prebuilt)" in flash and "source)" in flash and "FLASH_ATTENTION_FORCE_BUILD=TRUE" in flash
    assert "exit 1" in flash  # an unknown mode fails the build


def test_dependency_list_matches_pyproject() -> None:
    """The deps layer installs pyproject's dependencies: run the Dockerfile's own extraction here."""
    run = next(r for k, r in dockerfile_instructions() if k == "RUN" and "tomllib" in r)
    code = re.search(r"python -c '(.+?)'", run).group(1)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert out.stdout.split() == pyproject["project"]["dependencies"]


def test_runs_as_the_charts_non_root_user_with_the_cli_entrypoint() -> None:
    instructions = dockerfile_instructions()
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] == "10001:10001"
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert (
        values["podSecurityContext"]["runAsUser"] == 10001 == values["containerSecurityContext"]["runAsUser"]
    )
    assert values["podSecurityContext"]["fsGroup"] == 10001
    entrypoint = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["r1-grpo"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "r1-grpo" in scripts
    labels = " ".join(rest for keyword, rest in instructions if keyword == "LABEL")
    for label in OCI_LABELS:
        assert f"org.opencontainers.image.{label}=" in labels, label


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """Docker's .dockerignore rules as (negated, regex): `*` within a path part, `**` across parts."""
    patterns = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((negated, re.compile(regex + "$")))
    return patterns


def in_build_context(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not negated
    return not excluded


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    patterns = _dockerignore_patterns()
    needed = [
        "pyproject.toml",
        "README.md",
        "requirements/constraints.txt",
        "trainer/__init__.py",
        "trainer/cli.py",
    ]
    needed += [p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "trainer").glob("*.yaml")]
    for path in needed:
        assert in_build_context(path, patterns), path
    kept_out = [
        ".git/config",
        ".venv/bin/python",
        ".cache/tools/helm-4.1.4/helm",
        "tests/test_chart.py",
        "charts/r1-grpo/values.yaml",
        "runs/local/sft/model.safetensors",
        "wandb/run-1/files/config.yaml",
        "trainer/__pycache__/cli.cpython-311.pyc",
        ".env",
    ]
    for path in kept_out:
        assert not in_build_context(path, patterns), path
    # Every file the Dockerfile copies must be in the context.
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY":
            for source in rest.split()[:-1]:
                assert in_build_context(source.rstrip("/"), patterns), source
                assert (REPO_ROOT / source).exists(), source


# ---- the users' CI workflow -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def test_workflow_is_a_valid_github_actions_workflow() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(WORKFLOW),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_lines(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_workflow_tests_lints_packages_checks_and_pushes(workflow: dict) -> None:
    jobs = workflow["jobs"]
    assert re.search(r"^make test$", _run_lines(jobs["test"]), re.MULTILINE)
    chart = _run_lines(jobs["chart"])
    assert "helm lint --strict charts/r1-grpo" in chart
    assert "helm package charts/r1-grpo" in chart
    assert "python tests/support/helmtool.py manifests --check" in chart
    # The helm the workflow installs is the helm 3 the tests run.
    assert workflow["env"]["HELM_VERSION"] == f"v{NPM_HELM[3].helm_version}"
    image = jobs["image"]
    assert set(image["needs"]) == {"test", "chart"}
    build = next(s for s in image["steps"] if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["push"] is True and build["with"]["context"] == "."
    assert build["with"]["tags"] == "${{ steps.meta.outputs.tags }}"
    meta = next(s for s in image["steps"] if s.get("id") == "meta")
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"]
    for arg in ("VERSION", "VCS_REF", "BUILD_DATE", "SOURCE_URL"):
        assert f"{arg}=" in build["with"]["build-args"] and arg in build_args(), arg
    assert image["permissions"] == {"contents": "read", "packages": "write"}
    assert workflow["permissions"] == {"contents": "read"}


def test_workflow_builds_and_caches_the_test_control_plane(workflow: dict) -> None:
    steps = workflow["jobs"]["test"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    go = steps[next(i for i, u in enumerate(uses) if u.startswith("actions/setup-go@"))]
    # the Go the control plane's modules ask for, from their own go.mod
    go_mod = REPO_ROOT / go["with"]["go-version-file"]
    assert go_mod.is_relative_to(REPO_ROOT / "tests" / "controlplane") and go_mod.name == "go.mod"
    assert re.search(r"^go 1\.26", go_mod.read_text(), re.MULTILINE)
    cache = next(
        s
        for s in steps
        if s.get("uses", "").startswith("actions/cache@") and "controlplane" in s["with"]["path"]
    )
    # build.sh's default cache root, keyed by everything build.sh's own key is made of
    assert cache["with"]["path"] == "~/.cache/r1-grpo/controlplane"
    build_sh = (REPO_ROOT / "tests" / "controlplane" / "build.sh").read_text()
    assert "${R1_GRPO_CONTROLPLANE_CACHE:-$HOME/.cache/r1-grpo/controlplane}" in build_sh
    assert "hashFiles('tests/controlplane/**/go.sum', 'tests/controlplane/build.sh')" in cache["with"]["key"]
    # both come before the test command, which builds the control plane when the cache had none
    make_test = next(i for i, s in enumerate(steps) if s.get("run") == "make test")
    assert steps.index(go) < make_test and steps.index(cache) < make_test


# ---- make image-test's pieces (tests/support/image.py); the runs themselves are `make image-test` -------


def test_kubernetes_variable_expansion_of_command_and_args() -> None:
    from tests.support.image import expand_k8s

    env = {"PET_NNODES": "2", "MASTER_PORT": "23456"}
    assert expand_k8s("--nnodes=$(PET_NNODES)", env) == "--nnodes=2"
    assert expand_k8s("$(MASTER_PORT)$(PET_NNODES)", env) == "234562"
    # undefined variables stay as written, $$ escapes
    assert expand_k8s("--x=$(UNSET)", env) == "--x=$(UNSET)"
    assert expand_k8s("$$(PET_NNODES)", env) == "$(PET_NNODES)"


def test_mount_targets_resolve_symlinks_inside_the_container_root(tmp_path: Path) -> None:
    """A pod mounts its hub token at /var/run/secrets/huggingface, and Debian's /var/run is a link to /run:
    the mount target must be the container's /run/..., never the host's (which an absolute link reaches
    when followed from outside the root)."""
    from tests.support.image import in_root

    root = tmp_path / "root"
    (root / "var").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "var" / "run").symlink_to("/run")  # absolute, as in the image
    (root / "opt" / "venv").mkdir(parents=True)
    (root / "opt" / "current").symlink_to("venv")  # relative
    (root / "etc").mkdir()
    (root / "etc" / "loop").symlink_to("/etc/loop")
    assert in_root(root, "/var/run/secrets/huggingface") == root / "run" / "secrets" / "huggingface"
    assert in_root(root, "/opt/current/bin") == root / "opt" / "venv" / "bin"
    assert in_root(root, "/checkpoints") == root / "checkpoints"
    assert in_root(root, "/../../etc/../tmp") == root / "tmp"  # .. stops at the root
    with pytest.raises(ValueError, match="too many symlinks"):
        in_root(root, "/etc/loop/x")


def test_image_test_pods_run_the_main_jobs_stages() -> None:
    """The chart values make image-test renders give each stage pod the main job's flags (same model, data,
    arguments, lineage on the volume), torchrun under `r1-grpo launch`, and the pod's mounts and user."""
    from tests.support.helmtool import launches_torchrun, render_chart, stage_jobs
    from tests.support.image import RELEASE, operator_env, pod_of, tiny_chart_values
    from trainer.contract.stages import load_config, plan

    values = tiny_chart_values()
    mount = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["storage"]["mountPath"]
    expected = {p.name: p for p in plan(load_config(overrides={"root": mount, "release": RELEASE}))}
    jobs = stage_jobs(render_chart(values, release=RELEASE), release=RELEASE)
    assert list(jobs) == list(expected) == ["sft", "grpo", "eval"]
    for name, job in jobs.items():
        spec, container = pod_of(job)
        assert launches_torchrun(container)
        args = container["args"]
        module = args[args.index("--module") + 1]
        flags = args[args.index("--module") + 2 :]
        rendered = dict(zip(flags[::2], flags[1::2], strict=True))
        wanted = dict(zip(expected[name].cli_args()[::2], expected[name].cli_args()[1::2], strict=True))
        assert rendered.pop("--report_to") == wanted.pop("--report_to", "jsonl")
        assert (module, rendered) == (f"trainer.{'evaluate' if name == 'eval' else name}", wanted)
        assert job["spec"]["nprocPerNode"] == str(expected[name].nproc_per_node)
        assert operator_env(job)["PET_NPROC_PER_NODE"] == job["spec"]["nprocPerNode"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {m["mountPath"] for m in container["volumeMounts"]} == {mount, "/tmp", "/dev/shm"}
        assert spec["securityContext"]["runAsUser"] == 10001
