"""Offline, strict validation of the Kubernetes manifests in deploy/kubernetes.

Run through validate.sh, which sets up the pinned packages. For every YAML file under the
directory:
  - Kubernetes kinds: kubernetes-validate's bundled schemas in strict mode (an unknown or
    misspelt field fails), for the newest Kubernetes version it bundles;
  - CRD kinds (InferencePool): the CRD's openAPIV3Schema vendored in schemas/, with
    unknown fields refused (as the API server's strict field validation does) and
    metadata checked as ObjectMeta;
  - Kustomizations: only known fields, no remote resources, every resource and patch
    file exists, and every manifest file is listed by some kustomization (except
    *.example.yaml). Each kustomization is then rendered (resources, JSON patches and
    images; other fields are refused until this renders them) and its
    output validated as above, so a patch that does not apply fails too.
Then cross-checks over all the manifests: resource quantities parse; Service, PodDisruptionBudget, InferencePool
selectors and ports match a Deployment's pods; an HPA's target exists; every pod runs
non-root with a read-only root filesystem, no privilege escalation, all capabilities
dropped and the RuntimeDefault seccomp profile; a container that sets
MOESERVE_SHUTDOWN_TIMEOUT_SECS gets a longer terminationGracePeriodSeconds (covering its
preStop sleep and the 2 s exit); an endpoint picker config names moeserve's metrics and
the picker gets none of the metric flags it refuses.

    python3 validate.py [DIR]              validate DIR (default: this directory)
    python3 validate.py --self-test [DIR]  break copies of DIR in known ways; each must fail

Exit status: 0 valid, 1 invalid (or a self-test breakage that was not caught).
To refresh the vendored CRD schema, see schemas/README.md.
"""

import argparse
import copy
import glob
import json
import os
import re
import shutil
import sys
import tempfile

import jsonschema
import kubernetes_validate
import referencing
import yaml
from kubernetes_validate import utils as kv_utils

HERE = os.path.dirname(os.path.abspath(__file__))
# The newest Kubernetes version the pinned kubernetes-validate bundles schemas for.
K8S_VERSION = kv_utils.major_minor(kv_utils.latest_version())
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

# The metrics moeserve exposes for a gateway's endpoint picker.
MOESERVE_METRICS = {
    "moeserve_num_requests_waiting",
    "moeserve_num_requests_running",
    "moeserve_kv_cache_usage_perc",
    "moeserve_cache_config_info",
}
# EPP flags that the endpoint picker refuses since gateway-api-inference-extension v1.4.0
# (metric names go into the config file's engineConfigs instead).
REFUSED_EPP_FLAGS = {
    "--total-queued-requests-metric",
    "--total-running-requests-metric",
    "--kv-cache-usage-percentage-metric",
    "--lora-info-metric",
    "--cache-info-metric",
}
# Top-level fields of a kustomize.config.k8s.io/v1beta1 Kustomization (kustomize v5).
KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "metadata", "resources", "components", "crds", "bases",
    "namespace", "namePrefix", "nameSuffix", "commonLabels", "labels", "commonAnnotations",
    "patches", "patchesStrategicMerge", "patchesJson6902", "images", "replicas",
    "replacements", "vars", "configMapGenerator", "secretGenerator", "generatorOptions",
    "helmCharts", "helmGlobals", "helmChartInflationGenerator", "configurations",
    "generators", "transformers", "validators", "openapi", "buildMetadata", "sortOptions",
}
# The fields this script renders; a kustomization with others is refused (render it with
# `kubectl kustomize` and extend render() instead of letting it pass unchecked).
RENDERED_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
PATCH_FIELDS = {"path", "patch", "target", "options"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace", "labelSelector", "annotationSelector"}
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def rel(path, root):
    return os.path.relpath(path, root)


def load_yaml_docs(path):
    """The non-empty documents of a YAML file; each must be a mapping."""
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict):
            raise ValueError("a document is not a mapping")
    return docs


def strict_crd_schema(schema):
    """The CRD schema with unknown fields refused wherever fields are declared, and
    metadata checked as ObjectMeta."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    return schema


class Validator:
    def __init__(self, root):
        self.root = root
        self.crds = {}
        for path in sorted(glob.glob(os.path.join(HERE, "schemas", "*.json"))):
            with open(path) as f:
                vendored = json.load(f)
            self.crds[(vendored["apiVersion"], vendored["kind"])] = strict_crd_schema(vendored["openAPIV3Schema"])
        version = [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= K8S_VERSION][-1]
        definitions = kv_utils.schema_contents(
            "kubernetes-json-schema/v%s-local-strict/_definitions.json" % version, version)
        self.registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()

    def check_object(self, doc, where):
        """Schema errors of one Kubernetes object."""
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return ["%s: no apiVersion or kind" % where]
        name = "%s %s" % (kind, (doc.get("metadata") or {}).get("name", "?"))
        if (api_version, kind) in self.crds:
            v = jsonschema.Draft202012Validator(self.crds[(api_version, kind)], registry=self.registry)
            return ["%s: %s: %s: %s (CRD schema)" % (where, name, "/".join(map(str, e.absolute_path)) or "(top)", e.message)
                    for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return ["%s: %s: %s: %s (Kubernetes %s, strict)" % (where, name, "/".join(map(str, e.path)) or "(top)", e.message, e.version)]
        except kubernetes_validate.SchemaNotFoundError:
            return ["%s: %s: no schema for %s %s (a CRD kind needs its schema in schemas/)" % (where, name, api_version, kind)]
        return []


def find_kustomization(directory):
    for n in KUSTOMIZATION_NAMES:
        if os.path.isfile(os.path.join(directory, n)):
            return os.path.join(directory, n)
    return None


def check_kustomization(path, doc, root):
    """Errors in a Kustomization's own fields, and the files it lists."""
    where = rel(path, root)
    errors, listed = [], set()
    d = os.path.dirname(path)
    if doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
        errors.append("%s: apiVersion must be kustomize.config.k8s.io/v1beta1" % where)
    for key in sorted(set(doc) - KUSTOMIZATION_FIELDS):
        errors.append("%s: unknown field %r" % (where, key))
    for key in sorted((set(doc) & KUSTOMIZATION_FIELDS) - RENDERED_FIELDS):
        errors.append("%s: field %r is not rendered by validate.py; extend its render()" % (where, key))
    for entry in doc.get("resources") or []:
        if not isinstance(entry, str):
            errors.append("%s: resource %r is not a path" % (where, entry))
            continue
        if "://" in entry or entry.startswith(("github.com/", "git@")):
            errors.append("%s: remote resource %r (keep everything in the repository)" % (where, entry))
            continue
        target = os.path.normpath(os.path.join(d, entry))
        if os.path.isdir(target):
            if not find_kustomization(target):
                errors.append("%s: resource %r is a directory without a kustomization" % (where, entry))
        elif os.path.isfile(target):
            listed.add(target)
        else:
            errors.append("%s: resource %r does not exist" % (where, entry))
    for i, p in enumerate(doc.get("patches") or []):
        if not isinstance(p, dict):
            errors.append("%s: patches[%d] is not a mapping" % (where, i))
            continue
        for key in sorted(set(p) - PATCH_FIELDS):
            errors.append("%s: patches[%d]: unknown field %r" % (where, i, key))
        for key in sorted(set(p.get("target") or {}) - TARGET_FIELDS):
            errors.append("%s: patches[%d].target: unknown field %r" % (where, i, key))
        if ("path" in p) == ("patch" in p):
            errors.append("%s: patches[%d]: exactly one of path and patch" % (where, i))
        elif "path" in p:
            target = os.path.normpath(os.path.join(d, p["path"]))
            if not os.path.isfile(target):
                errors.append("%s: patches[%d]: %r does not exist" % (where, i, p["path"]))
            else:
                listed.add(target)
    return errors, listed


def json_pointer(path):
    if not path.startswith("/"):
        raise ValueError("JSON pointer %r does not start with /" % path)
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def apply_json_patch(doc, ops):
    """RFC 6902 add, remove and replace (what kustomize's patches here use)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, tokens = op.get("op"), json_pointer(op.get("path", ""))
        if kind not in ("add", "remove", "replace"):
            raise ValueError("op %r is not rendered by validate.py" % kind)
        parent = doc
        for t in tokens[:-1]:
            parent = parent[int(t)] if isinstance(parent, list) else parent[t]
        last = tokens[-1]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, op["value"])
            elif kind == "remove":
                del parent[index]
            else:
                parent[index] = op["value"]
        else:
            if kind in ("remove", "replace") and last not in parent:
                raise KeyError("%s: no %s" % (op["path"], last))
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = op["value"]
    return doc


def matches_target(doc, target):
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    meta = doc.get("metadata") or {}
    return all([
        "group" not in target or target["group"] == group,
        "version" not in target or target["version"] == version,
        "kind" not in target or target["kind"] == doc.get("kind"),
        "name" not in target or re.fullmatch(target["name"], meta.get("name", "")),
        "namespace" not in target or target["namespace"] == meta.get("namespace"),
    ])


def render(kpath, root, seen=()):
    """The objects a kustomization yields: its resources (recursively), patched."""
    if kpath in seen:
        raise ValueError("kustomization cycle through %s" % rel(kpath, root))
    doc = load_yaml_docs(kpath)[0]
    d = os.path.dirname(kpath)
    out = []
    for entry in doc.get("resources") or []:
        target = os.path.normpath(os.path.join(d, entry))
        if os.path.isdir(target):
            out.extend(render(find_kustomization(target), root, seen + (kpath,)))
        else:
            out.extend(load_yaml_docs(target))
    for i, p in enumerate(doc.get("patches") or []):
        text = p["patch"] if "patch" in p else open(os.path.join(d, p["path"])).read()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise ValueError("patches[%d]: only JSON patches (a list of operations) are rendered" % i)
        hits = [j for j, o in enumerate(out) if matches_target(o, p.get("target") or {})]
        if not hits:
            raise ValueError("patches[%d]: its target matches no object" % i)
        for j in hits:
            try:
                out[j] = apply_json_patch(out[j], ops)
            except (KeyError, IndexError, ValueError, TypeError) as e:
                raise ValueError("patches[%d] does not apply to %s %s: %s"
                                 % (i, out[j].get("kind"), out[j]["metadata"].get("name"), e))
    for i, img in enumerate(doc.get("images") or []):
        if not isinstance(img, dict) or set(img) - {"name", "newName", "newTag", "digest"} or "name" not in img:
            raise ValueError("images[%d]: needs name, and only newName, newTag, digest" % i)
        for o in out:
            for c in containers_of(o):
                image = c.get("image", "")
                base = image.split("@")[0]  # the image without its digest and tag
                base = base[:base.rfind(":")] if ":" in base.rsplit("/", 1)[-1] else base
                if base != img["name"]:
                    continue
                new = img.get("newName", base)
                if "digest" in img:
                    new += "@" + img["digest"]
                elif "newTag" in img:
                    new += ":" + str(img["newTag"])
                else:
                    new = image.replace(base, new, 1)
                c["image"] = new
    return out


def containers_of(obj):
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def pod_labels(deployments):
    return [((dep["spec"]["template"].get("metadata") or {}).get("labels") or {}, dep) for dep in deployments]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(dep):
    ports = set()
    for c in dep["spec"]["template"]["spec"].get("containers", []):
        for p in c.get("ports") or []:
            ports.add(p.get("containerPort"))
            if p.get("name"):
                ports.add(p["name"])
    return ports


# resource.Quantity's syntax (k8s.io/apimachinery); the bundled schemas take any string.
QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")


def quantities(node, where, path=()):
    """Errors for resource quantities (requests, limits, sizeLimit) that do not parse."""
    errors = []
    if isinstance(node, dict):
        for k, v in node.items():
            here = path + (k,)
            if (k in ("requests", "limits") and path and path[-1] == "resources") or k == "sizeLimit":
                for name, q in (v.items() if isinstance(v, dict) else [(k, v)]):
                    if not QUANTITY.match(str(q)):
                        errors.append("%s: %s: %r is not a quantity" % (where, "/".join(map(str, here + ((name,) if isinstance(v, dict) else ()))), q))
            else:
                errors.extend(quantities(v, where, here))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            errors.extend(quantities(v, where, path + (i,)))
    return errors


def cross_checks(objects):
    """Errors that no schema sees: references between objects, quantities, and the pod
    policy."""
    errors = []
    for where, o in objects:
        errors.extend(quantities(o, "%s: %s %s" % (where, o["kind"], o["metadata"]["name"])))
    by_kind = {}
    for where, o in objects:
        by_kind.setdefault(o.get("kind"), []).append((where, o))
    deployments = [o for _, o in by_kind.get("Deployment", [])]
    pods = pod_labels(deployments)

    def pods_selected(selector):
        return [dep for labels, dep in pods if selects(selector, labels)]

    for where, svc in by_kind.get("Service", []):
        selected = pods_selected(svc["spec"].get("selector") or {})
        if not selected:
            errors.append("%s: Service %s selects no Deployment's pods" % (where, svc["metadata"]["name"]))
        for p in svc["spec"].get("ports", []):
            tp = p.get("targetPort", p.get("port"))
            if selected and not all(tp in container_ports(dep) for dep in selected):
                errors.append("%s: Service %s: targetPort %r is not a port of the pods it selects"
                              % (where, svc["metadata"]["name"], tp))
    for where, pdb in by_kind.get("PodDisruptionBudget", []):
        if not pods_selected((pdb["spec"].get("selector") or {}).get("matchLabels") or {}):
            errors.append("%s: PodDisruptionBudget %s selects no Deployment's pods" % (where, pdb["metadata"]["name"]))
    names = {(o["kind"], o["metadata"]["name"]) for _, o in objects}
    for where, hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in names:
            errors.append("%s: HorizontalPodAutoscaler %s scales %s %s, which is not here"
                          % (where, hpa["metadata"]["name"], ref["kind"], ref["name"]))
    for where, pool in by_kind.get("InferencePool", []):
        name = pool["metadata"]["name"]
        selected = pods_selected(pool["spec"]["selector"]["matchLabels"])
        if not selected:
            errors.append("%s: InferencePool %s selects no Deployment's pods" % (where, name))
        for p in pool["spec"].get("targetPorts", []):
            if selected and not all(p["number"] in container_ports(dep) for dep in selected):
                errors.append("%s: InferencePool %s: target port %s is not a container port" % (where, name, p["number"]))
        ref = pool["spec"].get("endpointPickerRef") or {}
        if ref.get("kind", "Service") == "Service":
            svcs = [s for _, s in by_kind.get("Service", []) if s["metadata"]["name"] == ref.get("name")]
            want = (ref.get("port") or {}).get("number")
            if not any(want in [p.get("port") for p in s["spec"].get("ports", [])] for s in svcs):
                errors.append("%s: InferencePool %s: endpoint picker Service %s port %s is not here"
                              % (where, name, ref.get("name"), want))
    for where, dep in by_kind.get("Deployment", []):
        errors.extend(pod_policy(where, dep))
    for where, cm in by_kind.get("ConfigMap", []):
        for key, text in (cm.get("data") or {}).items():
            errors.extend(epp_config(where, cm["metadata"]["name"], key, text))
    return errors


def pod_policy(where, dep):
    errors = []
    name = "Deployment %s" % dep["metadata"]["name"]
    spec = dep["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext") or {}
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        sc = c.get("securityContext") or {}
        cname = "%s: %s container %s" % (where, name, c["name"])
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
            errors.append("%s: runAsNonRoot is not true" % cname)
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append("%s: allowPrivilegeEscalation is not false" % cname)
        if sc.get("readOnlyRootFilesystem") is not True:
            errors.append("%s: readOnlyRootFilesystem is not true" % cname)
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            errors.append("%s: capabilities do not drop ALL" % cname)
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp != "RuntimeDefault":
            errors.append("%s: seccompProfile is not RuntimeDefault" % cname)
    for c in spec.get("containers", []):
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        # The endpoint picker (and Prometheus in the HPA example) scrape /metrics without
        # credentials: with an API key set, /metrics must be public or the scrapes get 401.
        if "MOESERVE_API_KEY" in env and str(env.get("MOESERVE_PUBLIC_METRICS")).lower() != "true":
            errors.append("%s: %s container %s: MOESERVE_API_KEY is set but MOESERVE_PUBLIC_METRICS is not "
                          "\"true\": the endpoint picker's scrapes of /metrics would get 401" % (where, name, c["name"]))
        if "MOESERVE_SHUTDOWN_TIMEOUT_SECS" not in env:
            if str(c.get("image", "")).startswith("moeserve"):
                errors.append("%s: %s container %s: MOESERVE_SHUTDOWN_TIMEOUT_SECS is not set" % (where, name, c["name"]))
            continue
        drain = int(env["MOESERVE_SHUTDOWN_TIMEOUT_SECS"])
        pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {})
        command = (pre_stop.get("exec") or {}).get("command") or []
        sleep = int(command[1]) if len(command) == 2 and command[0] == "sleep" else 0
        sleep += int((pre_stop.get("sleep") or {}).get("seconds", 0))
        grace = spec.get("terminationGracePeriodSeconds")
        need = sleep + drain + 2
        if grace is None or grace <= need:
            errors.append("%s: %s: terminationGracePeriodSeconds (%s) must exceed preStop (%d s) + "
                          "MOESERVE_SHUTDOWN_TIMEOUT_SECS (%d s) + 2 s = %d s"
                          % (where, name, grace, sleep, drain, need))
    for c in spec.get("containers", []):
        for arg in (c.get("args") or []) + (c.get("command") or []):
            flag = str(arg).split("=", 1)[0]
            if flag in REFUSED_EPP_FLAGS:
                errors.append("%s: %s container %s: the endpoint picker refuses %s; name the metric in "
                              "the config's engineConfigs" % (where, name, c["name"], flag))
    return errors


def epp_config(where, cm_name, key, text):
    """An EndpointPickerConfig in a ConfigMap: parses, and its moeserve engine config
    names moeserve's metrics (and only those)."""
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return ["%s: ConfigMap %s %s: %s" % (where, cm_name, key, e)]
    if not isinstance(cfg, dict) or cfg.get("kind") != "EndpointPickerConfig":
        return []
    at = "%s: ConfigMap %s %s" % (where, cm_name, key)
    errors = []
    engines = [e for p in cfg.get("plugins") or [] if p.get("type") == "core-metrics-extractor"
               for e in (p.get("parameters") or {}).get("engineConfigs") or []]
    moeserve = [e for e in engines if e.get("name") == "moeserve"]
    if not moeserve:
        return ["%s: no core-metrics-extractor engineConfigs entry named moeserve" % at]
    specs = {"queuedRequestsSpec": "moeserve_num_requests_waiting",
             "runningRequestsSpec": "moeserve_num_requests_running",
             "kvUsageSpec": "moeserve_kv_cache_usage_perc",
             "cacheInfoSpec": "moeserve_cache_config_info"}
    for field, metric in specs.items():
        value = moeserve[0].get(field)
        if value != metric:
            errors.append("%s: engineConfigs moeserve %s is %r, not %r" % (at, field, value, metric))
    known = set(specs) | {"name", "loraSpec", "cacheBlockSizeLabelName", "cacheNumBlocksLabelName",
                          "cacheBlockSizeSpec", "cacheNumBlocksSpec", "customMetrics"}
    for field in sorted(set(moeserve[0]) - known):
        errors.append("%s: engineConfigs moeserve: unknown field %r" % (at, field))
    refs = {p.get("pluginRef") for prof in cfg.get("schedulingProfiles") or [] for p in prof.get("plugins") or []}
    declared = {p.get("name") or p.get("type") for p in cfg.get("plugins") or []}
    for ref in sorted(refs - declared):
        errors.append("%s: scheduling profile refers to undeclared plugin %r" % (at, ref))
    return errors


def validate_tree(root):
    """(errors, number of objects checked) for every manifest under root."""
    validator = Validator(root)
    errors, objects, listed, kustomizations, manifests = [], [], set(), [], []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.y*ml"), recursive=True)):
        if not path.endswith((".yaml", ".yml")):
            continue
        where = rel(path, root)
        try:
            docs = load_yaml_docs(path)
        except (yaml.YAMLError, ValueError) as e:
            errors.append("%s: %s" % (where, e))
            continue
        if not docs:
            errors.append("%s: no YAML documents" % where)
            continue
        if os.path.basename(path) in KUSTOMIZATION_NAMES or docs[0].get("kind") == "Kustomization":
            errs, files = check_kustomization(path, docs[0], root)
            errors.extend(errs)
            listed |= files
            kustomizations.append(path)
            continue
        manifests.append(path)
        for i, doc in enumerate(docs):
            loc = where if len(docs) == 1 else "%s[%d]" % (where, i)
            errs = validator.check_object(doc, loc)
            errors.extend(errs)
            if not errs:
                objects.append((loc, doc))
    for path in manifests:
        if path not in listed and not path.endswith((".example.yaml", ".example.yml")):
            errors.append("%s: listed by no kustomization (name it *.example.yaml if it stands alone)" % rel(path, root))
    rendered = 0
    if not errors:
        for kpath in kustomizations:
            where = rel(kpath, root)
            try:
                out = render(kpath, root)
            except (ValueError, KeyError, OSError, yaml.YAMLError) as e:
                errors.append("%s: cannot render: %s" % (where, e))
                continue
            for doc in out:
                errors.extend(validator.check_object(doc, "%s (rendered)" % where))
            rendered += len(out)
        errors.extend(cross_checks(objects))
    return errors, len(objects), len(kustomizations), rendered


# Each breaks one thing in a copy of the tree: (file, text, replacement, what it breaks).
BREAKAGES = [
    ("base/deployment.yaml", "            failureThreshold: 60\n", "            failureTreshold: 60\n",
     "a misspelt field in the server container's startup probe"),
    ("base/deployment.yaml", "      maxSurge: 1\n", "      maxSurge: 1\n      maxUnavailabl: 0\n",
     "an unknown field in the rolling update"),
    ("base/deployment.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 30",
     "a grace period shorter than preStop + drain"),
    ("base/deployment.yaml", "              cpu: \"2\"\n              memory: 1Gi\n          # /health",
     "              cpu: 2 cores\n              memory: 1Gi\n          # /health",
     "a CPU limit that is not a quantity"),
    ("base/service.yaml", "targetPort: http", "targetPort: htp", "a Service targetPort that no container has"),
    ("base/deployment.yaml", "            - name: MOESERVE_PUBLIC_METRICS\n              value: \"true\"\n", "",
     "an API key without public metrics (the picker's scrapes would get 401)"),
    ("base/pdb.yaml", "maxUnavailable: 1", "maxUnavailabe: 1", "a misspelt PodDisruptionBudget field"),
    ("base/kustomization.yaml", "  - pdb.yaml", "  - pdbs.yaml", "a kustomization resource that does not exist"),
    ("examples/autoscaling/kustomization.yaml", "path: /spec/replicas", "path: /spec/replica",
     "a kustomize patch that does not apply"),
    ("examples/autoscaling/hpa.yaml", "averageValue: \"2\"", "averageValu: \"2\"", "a misspelt HPA field"),
    ("examples/inference-gateway/inferencepool.yaml", "  targetPorts:", "  targetPort:",
     "a misspelt InferencePool field (CRD schema)"),
    ("examples/inference-gateway/inferencepool.yaml", "failureMode: FailClose", "failureMode: FailSoft",
     "an InferencePool enum value the CRD does not allow"),
    ("examples/inference-gateway/epp.yaml", "            - --tracing=false\n",
     "            - --tracing=false\n            - --total-queued-requests-metric=moeserve_num_requests_waiting\n",
     "a metric flag the endpoint picker refuses"),
    ("examples/inference-gateway/epp.yaml", "kvUsageSpec: moeserve_kv_cache_usage_perc",
     "kvUsageSpec: moeserve_kv_cache_usage", "a wrong metric name in the picker's config"),
    ("examples/inference-gateway/epp.yaml", "            readOnlyRootFilesystem: true\n", "",
     "a container without a read-only root filesystem"),
]


def self_test(root):
    errors, _, _, _ = validate_tree(root)
    if errors:
        print("self-test: the manifests themselves do not validate:")
        for e in errors:
            print("  " + e)
        return 1
    missed = 0
    for path, old, new, what in BREAKAGES:
        with tempfile.TemporaryDirectory() as tmp:
            copy_root = os.path.join(tmp, "kubernetes")
            shutil.copytree(root, copy_root, ignore=shutil.ignore_patterns("__pycache__"))
            target = os.path.join(copy_root, path)
            with open(target) as f:
                text = f.read()
            if text.count(old) != 1:
                print("self-test: %s: the text to break (%s) is not there exactly once; update BREAKAGES"
                      % (path, what))
                missed += 1
                continue
            with open(target, "w") as f:
                f.write(text.replace(old, new))
            errs, _, _, _ = validate_tree(copy_root)
            if errs:
                print("self-test: caught %s: %s" % (what, errs[0]))
            else:
                print("self-test: NOT caught: %s (%s)" % (what, path))
                missed += 1
    print("self-test: %d of %d broken copies rejected" % (len(BREAKAGES) - missed, len(BREAKAGES)))
    return 1 if missed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--self-test", action="store_true", help="check that broken copies fail")
    parser.add_argument("dir", nargs="?", default=HERE)
    args = parser.parse_args()
    root = os.path.abspath(args.dir)
    if args.self_test:
        return self_test(root)
    errors, n, k, rendered = validate_tree(root)
    for e in errors:
        print("ERROR " + e)
    if errors:
        print("kubernetes manifests: %d errors" % len(errors))
        return 1
    print("kubernetes manifests: %d objects valid against Kubernetes %s schemas (strict) and the vendored CRD "
          "schema; %d kustomizations render (%d objects)" % (n, K8S_VERSION, k, rendered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
