"""Checks the Kubernetes manifests in deploy/kubernetes, as tests/run.sh runs it:

    python tests/deploy/check.py IOMT_BINARY

For every overlay (each directory directly under deploy/kubernetes/overlays):
  1. it renders with `kubectl kustomize`;
  2. every object validates, offline: built-in kinds against the Kubernetes schemas of
     kubernetes-validate (strict: unknown fields are errors), KEDA's and the Prometheus
     Operator's kinds against their CRDs' schemas, vendored in tests/deploy/crds;
  3. Checkov finds nothing outside the justified skips of tests/deploy/checkov.yaml;
  4. `iomt config check` accepts each Deployment's configuration as the pod would see it: the
     rendered iomt.toml, templates and environment (envFrom and env, `$(VAR)` expanded).

And the Grafana dashboard (deploy/grafana) queries only metrics iomt registers (or KEDA's).

Exits non-zero with every problem listed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "deploy" / "kubernetes" / "overlays"
CRDS = Path(__file__).resolve().parent / "crds"
CHECKOV_CONFIG = Path(__file__).resolve().parent / "checkov.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "iomt-dashboard.json"
KUBERNETES_VERSION = "1.32.0"


def crd_schemas():
    """(apiVersion, kind) -> the openAPIV3Schema of each vendored CRD version."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def render(overlay):
    result = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return None, result.stderr.strip()
    return result.stdout, None


def validate(objects, schemas):
    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in schemas:
            validator = jsonschema.Draft7Validator(schemas[key])
            for error in validator.iter_errors(obj):
                path = ".".join(str(p) for p in error.absolute_path)
                problems.append(f"{name}: {path}: {error.message}")
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{name}: no schema for {key[0]} {key[1]} (vendor its CRD in {CRDS})")
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{name}: {path}: {e.message}")
    return problems


def checkov(rendered_file):
    result = subprocess.run(
        [
            sys.executable, "-m", "checkov.main",
            "--config-file", str(CHECKOV_CONFIG),
            "--file", str(rendered_file),
        ],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        return [f"checkov:\n{result.stdout}{result.stderr}"]
    return []


def expand(value, env):
    """Kubernetes' `$(VAR)` expansion of an env value."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def config_check(iomt, objects, workdir):
    """`iomt config check` on each Deployment's configuration, as its pod sees it."""
    problems = []
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        root = Path(workdir) / name
        mounts = {}
        for mount in container.get("volumeMounts", []):
            source = volumes[mount["name"]]
            if "configMap" not in source:
                continue
            data = config_maps[source["configMap"]["name"]]
            target = root / mount["mountPath"].lstrip("/")
            if "subPath" in mount:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[mount["subPath"]])
            else:
                target.mkdir(parents=True, exist_ok=True)
                for file, text in data.items():
                    (target / file).write_text(text)
            mounts[mount["mountPath"]] = str(target)
        env = {}
        for source in container.get("envFrom", []):
            env.update(config_maps[source["configMapRef"]["name"]])
        for var in container.get("env", []):
            env[var["name"]] = expand(var.get("value", ""), env)
        args = container["args"]
        config = args[args.index("--config") + 1]
        config_file = Path(mounts.get(config, config))
        # Paths inside the pod, rewritten to where the mounts were written here.
        text = config_file.read_text()
        for inside, here in sorted(mounts.items(), key=lambda m: -len(m[0])):
            text = text.replace(inside, here)
        config_file.write_text(text)
        process_env = {k: v for k, v in os.environ.items() if not k.startswith(("IOMT", "AZURE_"))}
        process_env.update({k: v for k, v in env.items() if k.startswith("IOMT")})
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        if labels.get("azure.workload.identity/use") == "true":
            # What the workload identity webhook injects into such a pod.
            token = Path(workdir) / "azure-identity-token"
            token.write_text("token")
            process_env.update({
                "AZURE_CLIENT_ID": env.get("IDENTITY_CLIENT_ID", ""),
                "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000000",
                "AZURE_FEDERATED_TOKEN_FILE": str(token),
                "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
            })
        # `iomt run` runs pipeline.role: from the environment, else the file, else all.
        role = env.get("IOMT__PIPELINE__ROLE") or tomllib.loads(text).get("pipeline", {}).get("role", "all")
        result = subprocess.run(
            [iomt, "config", "check", "--config", str(config_file), "--role", role],
            capture_output=True, text=True, env=process_env, check=False,
        )
        if result.returncode != 0:
            problems.append(f"Deployment/{name}: iomt config check:\n{result.stdout}{result.stderr}")
    return problems


def exported_metrics():
    """The metric families iomt registers: the names given to the registry in
    crates/iomt-runtime/src/metrics.rs and those its collectors describe (metrics/*.rs,
    process.rs). A family without samples is not in /metrics, so the source is the complete
    list."""
    runtime = REPO / "crates" / "iomt-runtime" / "src"
    files = [runtime / "metrics.rs", runtime / "process.rs", *sorted((runtime / "metrics").glob("*.rs"))]
    names = set()
    for file in files:
        text = file.read_text()
        names |= set(re.findall(
            r'(?:register|encode_descriptor|per_partition)\(\s*(?:&mut \w+,\s*)?"([A-Za-z_][A-Za-z0-9_]*)"', text))
        # The process collector lists its gauges in a table before describing them.
        names |= set(re.findall(r'"(process_[a-z_]+)"', text))
    return names


def dashboard_check():
    problems = []
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except ValueError as e:
        return [f"{DASHBOARD.name}: not JSON: {e}"]
    families = exported_metrics()
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            for name in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\{", target["expr"]):
                if name.startswith("keda_"):
                    continue
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                if name not in families and base not in families:
                    problems.append(f"{DASHBOARD.name}: panel {panel['title']!r} queries {name}, which iomt does not export")
    return problems


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    iomt = sys.argv[1]
    schemas = crd_schemas()
    overlays = sorted(p for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        for overlay in overlays:
            rendered, error = render(overlay)
            if error:
                problems = [f"kubectl kustomize: {error}"]
            else:
                objects = [o for o in yaml.safe_load_all(rendered) if o]
                rendered_file = Path(workdir) / f"{overlay.name}.yaml"
                rendered_file.write_text(rendered)
                problems = validate(objects, schemas)
                problems += checkov(rendered_file)
                problems += config_check(iomt, objects, Path(workdir) / overlay.name)
            kinds = "" if error else f" ({len(objects)} objects)"
            print(f"{overlay.relative_to(REPO)}: {'ok' if not problems else 'FAILED'}{kinds}")
            for problem in problems:
                print(f"  {problem}")
            failed |= bool(problems)
        problems = dashboard_check()
        print(f"{DASHBOARD.relative_to(REPO)}: {'ok' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  {problem}")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
