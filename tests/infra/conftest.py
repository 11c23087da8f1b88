"""Pulumi mocks for the infra tests, and the runner that evaluates one stack under them.

`RecordingMocks` answers the engine for `pulumi.runtime.set_mocks`: every ``new_resource``
call is recorded (type, name, inputs, which inputs are secret) and answered with plausible
outputs (ids, ARNs, endpoints); invokes (``getCallerIdentity``, ``getVpc``, ``getCluster``,
...) and the ``pulumi:pulumi:StackReference`` to prod get canned answers. Resource options
are invisible to mocks, so a (client-side) stack transformation records ``protect``,
``parent``, ``provider`` and ``ignore_changes`` of each resource as the program declares
it. Resource transforms
that the program registers with the engine (``register_resource_transform``, as
``infra/tagging.py`` does) are run by `RecordingMocks` on every registration, as the engine
would run them.

The program module can be imported only once per process, so each stack runs in its own
subprocess: ``python tests/infra/conftest.py <stack> <summary.json>`` sets the stack's config
from ``environments/Pulumi.<stack>.yaml``, sets the mocks, runs ``infra/`` as Pulumi does
(``runpy.run_path``) and writes a JSON summary. ``stackkit.py`` starts those subprocesses;
the tests read the summaries. Nothing here depends on pytest loading this file as a
conftest, so the suite also runs with ``--noconftest``.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import MockCallArgs, MockResourceArgs, Mocks

ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "111122223333"
SECRET_SIG = "4dabf18193072939515e22adb298388d"
SECRET_MARK = "1b47061264138c4ac30d75fd1eb44270"
MOCK_SECRET_PREFIX = "MOCKSECRET-"
"""Every secret value the mocks make up starts with this, so tests can find leaks."""

# Outputs that the real providers mark secret (additionalSecretOutputs); mocks must do it.
SECRET_OUTPUTS: dict[str, tuple[str, ...]] = {
    "random:index/randomPassword:RandomPassword": ("result", "bcryptHash"),
    "aws:secretsmanager/secretVersion:SecretVersion": ("secretString",),
    "aws:elasticache/replicationGroup:ReplicationGroup": ("authToken",),
    "kubernetes:core/v1:Secret": ("data", "stringData"),
}

PRIMARY_REGION = "us-east-1"
TEST_CONFIG: dict[str, dict[str, str]] = {
    # Set by the operator with `pulumi config set --secret` (infra/dr.py); made up here.
    "dr": {"audit-kit:primaryWorkerPassword": f"{MOCK_SECRET_PREFIX}prod-worker"},
}
ARC_ENDPOINT_REGIONS: tuple[str, ...] = (
    "us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1", "ap-southeast-2")
"""An ARC cluster has five regional data-plane endpoints."""


def _arn(service: str, region: str, resource: str) -> str:
    return f"arn:aws:{service}:{region}:{ACCOUNT}:{resource}"


def _short(name: str, n: int = 8) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:n]


def prod_stack_outputs() -> dict[str, Any]:
    """What the prod stack exports that DR reads (checked against prod's real exports)."""
    keys = {p: _arn("kms", PRIMARY_REGION, f"key/mrk-{_short('prod-' + p, 32)}")
            for p in ("database", "cache", "secrets", "data", "archive", "signing")}
    return {
        "dbInstanceArn": _arn("rds", PRIMARY_REGION, "db:audit-kit-prod-db"),
        "dbAddress": "audit-kit-prod-db.c0ffee.us-east-1.rds.amazonaws.com",
        "dbWorkerSecretArn": _arn("secretsmanager", PRIMARY_REGION,
                                  "secret:audit-kit-prod-worker-AbCdEf"),
        "redisPrimaryEndpoint": "master.audit-kit-prod.abcdef.use1.cache.amazonaws.com",
        "keyArns": keys,
        "archiveReplicaBucketName": "audit-kit-prod-archive-replica-0001",
        "archiveReplicaBucketArn": "arn:aws:s3:::audit-kit-prod-archive-replica-0001",
        "archiveReplicaKeyArn": _arn("kms", "us-west-2",
                                     f"key/mrk-{_short('prod-archive', 32)}"),
        "workerReplicas": 3,
        "region": PRIMARY_REGION,
    }


class RecordingMocks(Mocks):
    """Records every resource and invoke; answers with plausible AWS-shaped outputs."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.resources: list[dict[str, Any]] = []
        self.calls: list[dict[str, Any]] = []
        self.transforms: list[Any] = []

    # -- transforms ------------------------------------------------------------------------

    def register_transform(self, transform: Any) -> None:
        """The engine runs resource transforms on every registration; the mock monitor does
        not, so the mocks do it (in `new_resource`), in the order they were registered."""
        self.transforms.append(transform)

    def _transformed(self, args: MockResourceArgs) -> dict[str, Any]:
        props = dict(args.inputs)
        for transform in self.transforms:
            result = transform(pulumi.ResourceTransformArgs(
                bool(args.custom), args.typ, args.name, props, pulumi.ResourceOptions()))
            if result is not None:
                props = dict(result.props)
        return props

    # -- resources -------------------------------------------------------------------------

    def new_resource(self, args: MockResourceArgs) -> tuple[str | None, dict[str, Any]]:
        secret_paths: list[str] = []
        transformed = self._transformed(args)
        inputs = _plain(transformed, "", secret_paths)
        resource_id, outputs = self._outputs(args.typ, args.name, inputs)
        self.resources.append({
            "type": args.typ,
            "name": args.name,
            "custom": bool(args.custom),
            "inputs": inputs,
            "secret_inputs": secret_paths,
            "id": resource_id,
            "outputs": {k: v for k, v in outputs.items() if k not in inputs},
        })
        # A remote component's outputs are not its inputs (awsx's Vpc takes natGateways as a
        # strategy and returns NatGateway resources): answer with the outputs alone.
        state = {} if args.typ.startswith("awsx:") else dict(transformed)
        state.update(outputs)
        for key in SECRET_OUTPUTS.get(args.typ, ()):
            if key in state and not _is_secret(state[key]):
                state[key] = {SECRET_SIG: SECRET_MARK, "value": state[key]}
        return resource_id, state

    def _outputs(self, typ: str, name: str, inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        region = str(inputs.get("region") or self.region)
        h = _short(f"{typ}/{name}")
        out: dict[str, Any] = {}
        rid = f"{name}-{h}"
        if typ == "pulumi:pulumi:StackReference":
            return str(inputs.get("name", name)), {
                "name": inputs.get("name", name),
                "outputs": prod_stack_outputs(),
                "secretOutputNames": [],
            }
        if typ == "awsx:ec2:Vpc":
            n = int(inputs.get("numberOfAvailabilityZones", 2))
            return rid, {
                "vpcId": f"vpc-{h}",
                "privateSubnetIds": [f"subnet-{_short(f'{name}-private-{i}')}" for i in range(n)],
                "publicSubnetIds": [f"subnet-{_short(f'{name}-public-{i}')}" for i in range(n)],
                "isolatedSubnetIds": [],
            }
        if typ == "aws:kms/key:Key":
            prefix = "mrk-" if inputs.get("multiRegion") else ""
            rid = f"{prefix}{_short(name, 32)}"
            out = {"keyId": rid, "arn": _arn("kms", region, f"key/{rid}")}
        elif typ == "aws:kms/replicaKey:ReplicaKey":
            primary = str(inputs.get("primaryKeyArn", ""))
            rid = primary.rsplit("/", 1)[-1] or f"mrk-{_short(name, 32)}"
            out = {"keyId": rid, "arn": _arn("kms", region, f"key/{rid}")}
        elif typ == "aws:kms/alias:Alias":
            out = {"arn": _arn("kms", region, str(inputs.get("name", name)))}
        elif typ == "aws:ec2/securityGroup:SecurityGroup":
            rid = f"sg-{h}"
            out = {"arn": _arn("ec2", region, f"security-group/{rid}")}
        elif typ == "aws:rds/instance:Instance":
            rid = str(inputs.get("identifier") or f"{name}-{h}")  # AWS keeps an explicit one
            address = f"{rid}.c0ffee.{region}.rds.amazonaws.com"
            out = {
                "identifier": rid,
                "arn": _arn("rds", region, f"db:{rid}"),
                "address": address,
                "endpoint": f"{address}:5432",
                "port": 5432,
                "resourceId": f"db-{h.upper()}",
            }
            if inputs.get("manageMasterUserPassword"):
                out["masterUserSecrets"] = [{
                    "secretArn": _arn("secretsmanager", region, f"secret:rds!{rid}-AbCdEf"),
                    "kmsKeyId": inputs.get("masterUserSecretKmsKeyId", ""),
                    "secretStatus": "active",
                }]
        elif typ in ("aws:rds/subnetGroup:SubnetGroup", "aws:rds/parameterGroup:ParameterGroup",
                     "aws:elasticache/subnetGroup:SubnetGroup"):
            out = {"name": f"{name}-{h}"}
            rid = out["name"]
        elif typ == "aws:elasticache/replicationGroup:ReplicationGroup":
            out = {
                "primaryEndpointAddress": f"master.{name}-{h}.{region}.cache.amazonaws.com",
                "readerEndpointAddress": f"replica.{name}-{h}.{region}.cache.amazonaws.com",
                "arn": _arn("elasticache", region, f"replicationgroup:{name}-{h}"),
            }
        elif typ == "aws:secretsmanager/secret:Secret":
            rid = _arn("secretsmanager", region, f"secret:{name}-{h[:6]}")
            out = {"arn": rid}
        elif typ == "aws:secretsmanager/secretVersion:SecretVersion":
            out = {"versionId": f"v-{h}", "arn": inputs.get("secretId", "")}
        elif typ == "random:index/randomPassword:RandomPassword":
            out = {"result": f"{MOCK_SECRET_PREFIX}{name}-{h}", "bcryptHash": f"$2a$10${h}"}
        elif typ == "aws:s3/bucket:Bucket":
            rid = f"{inputs.get('bucketPrefix', name + '-')}{h}"
            out = {"bucket": rid, "arn": f"arn:aws:s3:::{rid}"}
        elif typ == "aws:iam/role:Role":
            out = {"name": f"{name}-{h}", "arn": f"arn:aws:iam::{ACCOUNT}:role/{name}-{h}"}
            rid = out["name"]
        elif typ == "aws:iam/openIdConnectProvider:OpenIdConnectProvider":
            issuer = str(inputs.get("url", "")).removeprefix("https://")
            out = {"arn": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{issuer}"}
        elif typ == "aws:eks/cluster:Cluster":
            cluster_name = str(inputs.get("name") or f"{name}-{h}")  # an explicit name is kept
            out = {
                "name": cluster_name,
                "arn": _arn("eks", region, f"cluster/{cluster_name}"),
                "endpoint": f"https://{h.upper()}.gr7.{region}.eks.amazonaws.com",
                "certificateAuthority": {"data": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t"},
                "identities": [{"oidcs": [{
                    "issuer": f"https://oidc.eks.{region}.amazonaws.com/id/{h.upper()}"}]}],
                "vpcConfig": {**dict(inputs.get("vpcConfig") or {}),
                              "clusterSecurityGroupId": f"sg-eks{h}"},
            }
            rid = out["name"]
        elif typ == "aws:ec2/launchTemplate:LaunchTemplate":
            rid = f"lt-{h}"
            out = {"latestVersion": 1, "arn": _arn("ec2", region, f"launch-template/{rid}")}
        elif typ == "aws:route53recoverycontrol/cluster:Cluster":
            rid = f"arn:aws:route53-recovery-control::{ACCOUNT}:cluster/{h}"
            out = {"arn": rid, "status": "DEPLOYED", "clusterEndpoints": [
                {"region": r, "endpoint": f"https://{h}.route53-recovery-cluster.{r}.amazonaws.com/v1"}
                for r in ARC_ENDPOINT_REGIONS]}
        elif typ == "aws:route53recoverycontrol/controlPanel:ControlPanel":
            rid = f"arn:aws:route53-recovery-control::{ACCOUNT}:controlpanel/{h}"
            out = {"arn": rid, "status": "DEPLOYED"}
        elif typ == "aws:route53recoverycontrol/routingControl:RoutingControl":
            panel = str(inputs.get("controlPanelArn", ""))
            rid = f"{panel}/routingcontrol/{h}"
            out = {"arn": rid, "status": "DEPLOYED"}
        elif typ == "aws:route53/healthCheck:HealthCheck":
            rid = f"{h}-0000-4000-8000-health"
        elif typ == "kubernetes:helm.sh/v3:Release":
            out = {"status": {"status": "deployed", "namespace": inputs.get("namespace")}}
        elif typ.startswith("aws:"):
            out = {"arn": _arn(typ.split(":")[1].split("/")[0], region, f"{name}/{h}")}
        return rid, out

    # -- invokes ---------------------------------------------------------------------------

    def call(self, args: MockCallArgs) -> dict[str, Any]:  # type: ignore[override]
        plain_args = _plain(args.args, "", [])
        self.calls.append({"token": args.token, "args": plain_args})
        token, a = args.token, plain_args
        region = str(a.get("region") or self.region)
        if token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"accountId": ACCOUNT, "arn": f"arn:aws:iam::{ACCOUNT}:user/ci",
                    "userId": "AIDAEXAMPLE", "id": ACCOUNT}
        if token == "aws:index/getRegion:getRegion":
            return {"region": region, "name": region, "id": region}
        if token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"names": [f"{region}a", f"{region}b", f"{region}c"],
                    "zoneIds": ["use1-az1", "use1-az2", "use1-az4"], "id": region}
        if token == "aws:ec2/getVpc:getVpc":
            return {"id": a.get("id", "vpc-0"), "cidrBlock": "10.20.0.0/16", "arn":
                    _arn("ec2", region, f"vpc/{a.get('id')}")}
        if token == "aws:eks/getCluster:getCluster":
            name = str(a.get("name"))
            return {
                "id": name, "name": name, "arn": _arn("eks", region, f"cluster/{name}"),
                "endpoint": f"https://{_short(name).upper()}.gr7.{region}.eks.amazonaws.com",
                "identities": [{"oidcs": [{
                    "issuer": f"https://oidc.eks.{region}.amazonaws.com/id/{_short(name)}"}]}],
                "vpcConfig": {"clusterSecurityGroupId": f"sg-{_short(name + '-cluster')}",
                              "subnetIds": [], "securityGroupIds": [], "vpcId": "vpc-0",
                              "endpointPrivateAccess": True, "endpointPublicAccess": False,
                              "publicAccessCidrs": []},
            }
        if token == "aws:iam/getOpenIdConnectProvider:getOpenIdConnectProvider":
            issuer = str(a.get("url", "")).removeprefix("https://")
            return {"arn": f"arn:aws:iam::{ACCOUNT}:oidc-provider/{issuer}", "url": issuer,
                    "clientIdLists": ["sts.amazonaws.com"], "thumbprintLists": []}
        if token == "aws:secretsmanager/getSecretVersion:getSecretVersion":
            secret_id = str(a.get("secretId"))
            if secret_id.startswith("arn:"):  # prod's worker credentials, read by DR
                value = json.dumps({"username": "audit_worker",
                                    "password": f"{MOCK_SECRET_PREFIX}prod-worker"})
            else:  # an existing cluster's kubeconfig
                value = json.dumps({"apiVersion": "v1", "kind": "Config",
                                    "users": [{"name": "ci", "user": {
                                        "token": f"{MOCK_SECRET_PREFIX}kubeconfig-token"}}]})
            return {"id": secret_id, "arn": secret_id, "secretId": secret_id,
                    "secretString": value, "versionId": "v1", "versionStages": ["AWSCURRENT"],
                    "createdDate": "2024-01-01T00:00:00Z"}
        return {}


def _is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(SECRET_SIG) == SECRET_MARK


def _plain(value: Any, path: str, secret_paths: list[str]) -> Any:
    """Unwrap secrets (noting where they were) and make the value JSON-friendly."""
    if _is_secret(value):
        secret_paths.append(path or "$")
        return _plain(value.get("value"), path, [])
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{path}.{k}" if path else str(k), secret_paths)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}[{i}]", secret_paths) for i, v in enumerate(value)]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


def stack_config(stack: str) -> dict[str, str]:
    """The stack's config from ``environments/Pulumi.<stack>.yaml``, as strings."""
    doc = yaml.safe_load((ROOT / "environments" / f"Pulumi.{stack}.yaml").read_text())
    return {str(k): str(v) for k, v in (doc.get("config") or {}).items()}


def evaluate(stack: str, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the program for one stack under mocks and return the summary (call once a process)."""
    from pulumi.runtime.settings import get_root_resource
    from pulumi.runtime.stack import wait_for_rpcs
    from pulumi.runtime.sync_await import _sync_await

    started = time.perf_counter()
    config = {**stack_config(stack), **TEST_CONFIG.get(stack, {}), **(overrides or {})}
    pulumi.runtime.set_all_config(config)
    mocks = RecordingMocks(region=config["aws:region"])
    pulumi.runtime.set_mocks(mocks, project="audit-kit", stack=stack, preview=False)

    options: dict[tuple[str, str], dict[str, Any]] = {}

    def record_options(
        args: pulumi.ResourceTransformationArgs,
    ) -> pulumi.ResourceTransformationResult | None:
        parent = args.opts.parent if args.opts else None
        options[(args.type_, args.name)] = {
            "protect": bool(args.opts.protect) if args.opts else False,
            "parent": (f"{parent._type}::{parent._name}"
                       if isinstance(parent, pulumi.Resource) and hasattr(parent, "_type")
                       else None),
            "provider": bool(args.opts and args.opts.provider),
            # Which explicit provider (its logical name): the region checks look it up.
            "provider_name": (getattr(args.opts.provider, "_name", None)
                              if args.opts and args.opts.provider else None),
            "ignore_changes": list(args.opts.ignore_changes or []) if args.opts else [],
        }
        return None

    # Client-side on purpose: it needs the parent Resource object, which an engine transform
    # only sees as a URN (and the mock monitor passes it no options at all).
    pulumi.runtime.register_stack_transformation(record_options)
    error: str | None = None
    outputs: dict[str, Any] = {}
    try:
        # Inside the event loop, as Pulumi's Python entry point runs a program: resource
        # transforms (register_resource_transform) need a running loop to register.
        async def program() -> None:
            runpy.run_path(str(ROOT / "infra"), run_name="__main__")

        _sync_await(program())
        _sync_await(wait_for_rpcs())
    except Exception as exc:  # the summary reports it; the tests assert on it
        error = f"{type(exc).__name__}: {exc}"
    else:
        root = get_root_resource()
        for key, output in sorted(getattr(root, "outputs", {}).items()):
            out = pulumi.Output.from_input(output)
            outputs[key] = {"value": _plain(_sync_await(out.future()), key, []),
                            "secret": bool(_sync_await(out.is_secret()))}

    for resource in mocks.resources:
        resource.update(options.get((resource["type"], resource["name"]),
                                    {"protect": False, "parent": None, "provider": False,
                                     "provider_name": None, "ignore_changes": []}))
    return {
        "stack": stack,
        "error": error,
        "config": config,
        "seconds": round(time.perf_counter() - started, 3),
        "resources": mocks.resources,
        "calls": mocks.calls,
        "outputs": outputs,
    }


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: conftest.py <stack> <summary.json> [key=value ...]", file=sys.stderr)
        return 2
    overrides = dict(arg.split("=", 1) for arg in argv[3:])
    summary = evaluate(argv[1], overrides)
    Path(argv[2]).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
