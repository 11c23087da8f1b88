"""What AWS refuses, as data: the AWS constraints of the kit, checked over the mocks' records.

Pulumi mocks accept any combination of arguments; AWS does not. `CONSTRAINTS` is a table of
the rules that the kit's resources must satisfy for ``pulumi up`` (and a later ``destroy``,
failover or failback) to work on real AWS. Each entry names the AWS documentation page it comes
from and says the rule in our words; its check is a pure function over the resources that the
mocks record (``tests/infra/stackkit.py``: type, name, inputs, outputs), across every stack,
because some rules span stacks (the DR replica's source is prod's instance, reached through the
``StackReference``). Each entry carries a failing example (a hand-written resource set AWS
refuses) and a fixed one; ``tests/infra/test_infra_aws_constraints.py`` proves each check
rejects the first and accepts the second, then runs every check against the four stacks.
``docs/guides/_generate.py`` renders the table into the deployment guide.

Why here and not in ``infra/``: the rules need resolved values and relations between resources
(which bucket a replication rule writes to, which key a replica uses, which stack owns the
source database). While the program declares resources those are still `pulumi.Output`s, so the
program cannot refuse them before declaring; settings-level rules are already refused by
``infra/settings.py``. What this cannot prove: that AWS has not changed a rule since the page was
read, and anything the mocks do not record (resource options, provider defaults AWS fills in).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Resource = Mapping[str, Any]

DB = "aws:rds/instance:Instance"
PARAMETER_GROUP = "aws:rds/parameterGroup:ParameterGroup"
CACHE = "aws:elasticache/replicationGroup:ReplicationGroup"
PASSWORD = "random:index/randomPassword:RandomPassword"
BUCKET = "aws:s3/bucket:Bucket"
VERSIONING = "aws:s3/bucketVersioning:BucketVersioning"
OBJECT_LOCK = "aws:s3/bucketObjectLockConfiguration:BucketObjectLockConfiguration"
SSE = ("aws:s3/bucketServerSideEncryptionConfiguration:"
       "BucketServerSideEncryptionConfiguration")
REPLICATION = "aws:s3/bucketReplicationConfig:BucketReplicationConfig"
ROLE = "aws:iam/role:Role"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
KEY = "aws:kms/key:Key"
REPLICA_KEY = "aws:kms/replicaKey:ReplicaKey"
SECRET = "aws:secretsmanager/secret:Secret"
RECORD = "aws:route53/record:Record"
HEALTH_CHECK = "aws:route53/healthCheck:HealthCheck"
PROVIDER = "pulumi:providers:aws"
ARC_TYPES = tuple(f"aws:route53recoverycontrol/{t}" for t in (
    "cluster:Cluster", "controlPanel:ControlPanel", "routingControl:RoutingControl",
    "safetyRule:SafetyRule"))
ARC_CONFIG_REGION = "us-west-2"
EKS = "aws:eks/cluster:Cluster"
ACCESS_ENTRY = "aws:eks/accessEntry:AccessEntry"
LOG_GROUP = "aws:cloudwatch/logGroup:LogGroup"
STACK_REFERENCE = "pulumi:pulumi:StackReference"

_IDENTITY = ("arn", "id", "name", "bucket", "identifier", "keyId", "result")
"""State keys by which one resource's input can name another resource."""


@dataclass(frozen=True)
class Finding:
    constraint: str
    stack: str
    resource: str
    message: str

    def __str__(self) -> str:
        return f"{self.stack}: {self.resource}: {self.message} [{self.constraint}]"


class Account:
    """Every stack's recorded resources, with the lookups the checks need.

    ``summaries`` maps a stack name to what ``tests/infra/conftest.py`` writes for it: the
    stack's ``config`` (for ``aws:region``), ``resources`` and ``outputs``.
    """

    def __init__(self, summaries: Mapping[str, Mapping[str, Any]]) -> None:
        self.summaries = summaries

    def stack_region(self, stack: str) -> str:
        return str(self.summaries[stack]["config"]["aws:region"])

    def resources(self, *types: str) -> Iterator[tuple[str, Resource]]:
        for stack, found in self.summaries.items():
            for resource in found["resources"]:
                if not types or resource["type"] in types:
                    yield stack, resource

    def in_stack(self, stack: str, *types: str) -> list[Resource]:
        return [r for r in self.summaries[stack]["resources"] if not types or r["type"] in types]

    def region(self, stack: str, resource: Resource) -> str:
        """Where AWS creates it: the resource's own ``region`` argument, else the stack's."""
        return str(resource["inputs"].get("region") or self.stack_region(stack))

    def follow(self, stack: str, value: Any) -> tuple[str, Any]:
        """Where a value really comes from: through a StackReference, the referenced stack's
        actual export (the mocks answer references with canned outputs)."""
        for reference in self.in_stack(stack, STACK_REFERENCE):
            target = str(reference["inputs"].get("name", "")).rsplit("/", 1)[-1]
            exported = reference.get("outputs", {}).get("outputs", {})
            for path in _paths_to(exported, value):
                if target in self.summaries:
                    outputs = {k: v["value"] for k, v in
                               self.summaries[target].get("outputs", {}).items()}
                    actual = _at(outputs, path)
                    if actual is not None:
                        return target, actual
        return stack, value

    def find(self, stack: str, value: Any, *types: str) -> tuple[str, Resource] | None:
        """The declared resource a value names (an ARN, id, name), in this or a referenced stack."""
        if value in (None, ""):
            return None
        owner, actual = self.follow(stack, value)
        for resource in self.in_stack(owner, *types):
            current = state(resource)
            if any(current.get(k) == actual for k in _IDENTITY):
                return owner, resource
        return None


def state(resource: Resource) -> dict[str, Any]:
    return {**resource["inputs"], **resource.get("outputs", {}), "id": resource.get("id")}


def _paths_to(tree: Any, value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(tree, Mapping):
        for key, child in tree.items():
            yield from _paths_to(child, value, (*path, key))
    elif isinstance(tree, list):
        for i, child in enumerate(tree):
            yield from _paths_to(child, value, (*path, i))
    elif tree == value:
        yield path


def _at(tree: Any, path: Sequence[Any]) -> Any:
    for key in path:
        try:
            tree = tree[key]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def _values(tree: Any, path: str) -> Iterator[Any]:
    """Values at a dotted path; ``[]`` after a key walks every element of a list."""
    head, _, rest = path.partition(".")
    many = head.endswith("[]")
    key = head.removesuffix("[]")
    child = tree.get(key) if isinstance(tree, Mapping) else None
    children = (child or []) if many else [child]
    for item in children:
        if item is None:
            continue
        if rest:
            yield from _values(item, rest)
        else:
            yield item


def arn_region(arn: Any) -> str | None:
    parts = str(arn).split(":")
    return (parts[3] or None) if len(parts) > 5 and parts[0] == "arn" else None


def _bucket_name(value: Any) -> str:
    return str(value).removeprefix("arn:aws:s3:::")


def _policy_actions(document: Any) -> set[str]:
    try:
        parsed = json.loads(document) if isinstance(document, str) else document
    except json.JSONDecodeError:
        return set()
    statements = parsed.get("Statement", []) if isinstance(parsed, Mapping) else []
    if isinstance(statements, Mapping):
        statements = [statements]
    actions: set[str] = set()
    for statement in statements:
        if statement.get("Effect") == "Allow":
            found = statement.get("Action", [])
            actions |= {found} if isinstance(found, str) else set(found)
    return actions


def _allows(actions: set[str], action: str) -> bool:
    return any(re.fullmatch(re.escape(a).replace(r"\*", ".*"), action) for a in actions)


# --------------------------------------------------------------------------- the table


Check = Callable[[str, Account], Iterator[Finding]]


@dataclass(frozen=True)
class Constraint:
    id: str
    service: str
    rule: str
    """The rule in our words: what AWS refuses, and why the kit cares."""
    url: str
    """The AWS documentation page the rule comes from."""
    types: tuple[str, ...]
    """Resource types the check examines."""
    check: Check
    failing: Callable[[], Account]
    """A resource set that AWS refuses: the check must find it."""
    passing: Callable[[], Account]
    """The same set with the rule kept: the check must accept it."""
    tags: tuple[str, ...] = field(default=())

    def findings(self, account: Account) -> list[Finding]:
        return list(self.check(self.id, account))


# --------------------------------------------------------------------------- RDS

_RDS_ID = re.compile(r"[A-Za-z][A-Za-z0-9-]*")


def _rds_name_problem(value: str, longest: int) -> str | None:
    if not 1 <= len(value) <= longest or not _RDS_ID.fullmatch(value):
        return f"must be 1 to {longest} letters, digits or hyphens, starting with a letter"
    if "--" in value or value.endswith("-"):
        return "must not contain two consecutive hyphens or end with a hyphen"
    return None


def _source(account: Account, stack: str, instance: Resource) -> tuple[str, Resource] | None:
    return account.find(stack, instance["inputs"].get("replicateSourceDb"), DB)


def check_cross_region_replica_key(cid: str, account: Account) -> Iterator[Finding]:
    for stack, db in account.resources(DB):
        inputs = db["inputs"]
        source_arn = inputs.get("replicateSourceDb")
        if not source_arn:
            continue
        region = account.region(stack, db)
        source_region = arn_region(account.follow(stack, source_arn)[1]) or region
        if source_region == region:
            continue
        source = _source(account, stack, db)
        encrypted = bool(inputs.get("storageEncrypted")) or bool(
            source and source[1]["inputs"].get("storageEncrypted"))
        key = inputs.get("kmsKeyId")
        if encrypted and not key:
            yield Finding(cid, stack, db["name"],
                          f"encrypted replica of a source in {source_region} has no kmsKeyId "
                          f"for {region}")
        elif key and arn_region(key) not in (None, region):
            yield Finding(cid, stack, db["name"],
                          f"kmsKeyId {key} is in {arn_region(key)}, the replica in {region}")


def check_replica_final_snapshot(cid: str, account: Account) -> Iterator[Finding]:
    for stack, db in account.resources(DB):
        inputs = db["inputs"]
        if not inputs.get("replicateSourceDb"):
            continue
        if inputs.get("finalSnapshotIdentifier"):
            yield Finding(cid, stack, db["name"],
                          "a read replica cannot take a final snapshot: drop "
                          "finalSnapshotIdentifier")
        if inputs.get("skipFinalSnapshot") is not True:
            yield Finding(cid, stack, db["name"],
                          "a read replica is deleted only with skipFinalSnapshot=true")


def check_replica_source_backups(cid: str, account: Account) -> Iterator[Finding]:
    for stack, db in account.resources(DB):
        if not db["inputs"].get("replicateSourceDb"):
            continue
        source = _source(account, stack, db)
        if source is None:
            yield Finding(cid, stack, db["name"],
                          "the replica's source is not a declared instance of any stack, so its "
                          "backups cannot be checked")
            continue
        retention = source[1]["inputs"].get("backupRetentionPeriod")
        if retention is not None and int(retention) < 1:
            yield Finding(cid, source[0], source[1]["name"],
                          f"source of the read replica {stack}/{db['name']} has "
                          f"backupRetentionPeriod {retention}; it must be at least 1")


def _engine(account: Account, stack: str, db: Resource) -> tuple[str | None, str | None]:
    inputs = db["inputs"]
    if inputs.get("replicateSourceDb"):  # a replica runs its source's engine and version
        source = _source(account, stack, db)
        inputs = source[1]["inputs"] if source else {}
    engine, version = inputs.get("engine"), inputs.get("engineVersion")
    return (str(engine) if engine else None, str(version) if version else None)


def check_parameter_group_family(cid: str, account: Account) -> Iterator[Finding]:
    for stack, db in account.resources(DB):
        name = db["inputs"].get("parameterGroupName")
        if not name:
            continue
        engine, version = _engine(account, stack, db)
        group = next((g for g in account.in_stack(stack, PARAMETER_GROUP)
                      if name in (state(g).get("name"), g.get("id"))), None)
        if group is None:
            if not str(name).startswith("default."):
                yield Finding(cid, stack, db["name"],
                              f"parameter group {name} is not declared in the instance's stack "
                              f"({account.region(stack, db)})")
            continue
        if account.region(stack, group) != account.region(stack, db):
            yield Finding(cid, stack, db["name"],
                          f"parameter group {group['name']} is in another region")
        if engine == "postgres" and version:
            expected = f"postgres{version.split('.')[0]}"
            if group["inputs"].get("family") != expected:
                yield Finding(cid, stack, db["name"],
                              f"engine {engine} {version} needs family {expected}, parameter "
                              f"group {group['name']} has {group['inputs'].get('family')}")


def check_max_allocated_storage(cid: str, account: Account) -> Iterator[Finding]:
    for stack, db in account.resources(DB):
        ceiling = db["inputs"].get("maxAllocatedStorage")
        if not ceiling:  # unset or 0: storage autoscaling off
            continue
        allocated = db["inputs"].get("allocatedStorage")
        if allocated is None and db["inputs"].get("replicateSourceDb"):
            source = _source(account, stack, db)
            allocated = source[1]["inputs"].get("allocatedStorage") if source else None
        if allocated is not None and int(ceiling) * 10 < int(allocated) * 11:  # >= +10%
            yield Finding(cid, stack, db["name"],
                          f"maxAllocatedStorage {ceiling} must be at least 10% above "
                          f"allocatedStorage {allocated}")


def check_rds_identifiers(cid: str, account: Account) -> Iterator[Finding]:
    for stack, db in account.resources(DB):
        current = state(db)
        for key, longest in (("identifier", 63), ("finalSnapshotIdentifier", 255)):
            value = current.get(key)
            problem = _rds_name_problem(str(value), longest) if value else None
            if problem:
                yield Finding(cid, stack, db["name"], f"{key} {value!r} {problem}")


# --------------------------------------------------------------------------- ElastiCache

_TOKEN_SPECIALS = frozenset("!&#$^<>-")
_RANDOM_DEFAULT_SPECIALS = "!@#$%&*()-_=+[]{}<>:?"  # pulumi_random's default ``special`` set


def check_auth_needs_transit_encryption(cid: str, account: Account) -> Iterator[Finding]:
    for stack, group in account.resources(CACHE):
        inputs = group["inputs"]
        if inputs.get("authToken") and inputs.get("transitEncryptionEnabled") is not True:
            yield Finding(cid, stack, group["name"],
                          "an AUTH token needs transitEncryptionEnabled=true")


def check_auth_token_format(cid: str, account: Account) -> Iterator[Finding]:
    for stack, group in account.resources(CACHE):
        token = group["inputs"].get("authToken")
        if not token:
            continue
        source = account.find(stack, token, PASSWORD)
        if source is not None:  # the real value is generated at `up`: check the generator
            spec = source[1]["inputs"]
            length = int(spec.get("length", 0))
            if not 16 <= length <= 128:
                yield Finding(cid, stack, group["name"],
                              f"the token's RandomPassword has length {length}, not 16 to 128")
            if spec.get("special", True):
                specials = spec.get("overrideSpecial") or _RANDOM_DEFAULT_SPECIALS
                refused = sorted(set(specials) - _TOKEN_SPECIALS)
                if refused:
                    yield Finding(cid, stack, group["name"],
                                  f"the token's RandomPassword may use {''.join(refused)}; "
                                  "AUTH tokens allow only !&#$^<>- besides letters and digits")
            continue
        value = str(token)
        bad = sorted({c for c in value if not (c.isascii() and c.isalnum())} - _TOKEN_SPECIALS)
        if not 16 <= len(value) <= 128 or bad:
            yield Finding(cid, stack, group["name"],
                          "the AUTH token must be 16 to 128 letters, digits or !&#$^<>-")


def check_multi_az_failover(cid: str, account: Account) -> Iterator[Finding]:
    for stack, group in account.resources(CACHE):
        inputs = group["inputs"]
        failover = inputs.get("automaticFailoverEnabled") is True
        if inputs.get("multiAzEnabled") is True and not failover:
            yield Finding(cid, stack, group["name"],
                          "multiAzEnabled needs automaticFailoverEnabled")
        clusters = inputs.get("numCacheClusters")
        if failover and clusters is not None and int(clusters) < 2:
            yield Finding(cid, stack, group["name"],
                          f"automatic failover needs numCacheClusters >= 2, got {clusters}")


# --------------------------------------------------------------------------- S3

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")


def _bucket_name_problem(name: str) -> str | None:
    if not _BUCKET_NAME.fullmatch(name):
        return ("must be 3 to 63 lowercase letters, digits, dots or hyphens, beginning and "
                "ending with a letter or digit")
    if ".." in name or _IP.fullmatch(name) or name.startswith(("xn--", "sthree-")) \
            or name.endswith(("-s3alias", "--ol-s3")):
        return "uses a form S3 reserves (adjacent dots, an IP address, a reserved affix)"
    return None


def check_bucket_names(cid: str, account: Account) -> Iterator[Finding]:
    for stack, bucket in account.resources(BUCKET):
        prefix = bucket["inputs"].get("bucketPrefix")
        if prefix is not None and (len(prefix) > 37 or not re.fullmatch(r"[a-z0-9][a-z0-9.-]*",
                                                                        prefix)):
            yield Finding(cid, stack, bucket["name"],
                          f"bucketPrefix {prefix!r} must be at most 37 lowercase characters "
                          "(the provider appends 26)")
        name = bucket["inputs"].get("bucket") or bucket.get("outputs", {}).get("bucket")
        problem = _bucket_name_problem(str(name)) if name else None
        if problem:
            yield Finding(cid, stack, bucket["name"], f"bucket name {name!r} {problem}")


def _bucket(account: Account, stack: str, value: Any) -> tuple[str, Resource] | None:
    return account.find(stack, _bucket_name(value), BUCKET)


def _versioning_status(account: Account, stack: str, bucket: Resource) -> list[str]:
    name = state(bucket).get("bucket")
    return [str(v["inputs"].get("versioningConfiguration", {}).get("status"))
            for v in account.in_stack(stack, VERSIONING) if v["inputs"].get("bucket") == name]


def check_object_lock(cid: str, account: Account) -> Iterator[Finding]:
    for stack, lock in account.resources(OBJECT_LOCK):
        found = _bucket(account, stack, lock["inputs"].get("bucket"))
        if found is None or found[1]["inputs"].get("objectLockEnabled") is not True:
            yield Finding(cid, stack, lock["name"],
                          "the bucket must be created with objectLockEnabled=true")
        retention = lock["inputs"].get("rule", {}).get("defaultRetention")
        if retention is not None:
            periods = [k for k in ("days", "years") if retention.get(k) is not None]
            if retention.get("mode") not in ("GOVERNANCE", "COMPLIANCE") or len(periods) != 1 \
                    or int(retention[periods[0]]) <= 0:
                yield Finding(cid, stack, lock["name"],
                              "default retention needs a mode (GOVERNANCE or COMPLIANCE) and "
                              "either days or years (positive), not both")
    for stack, bucket in account.resources(BUCKET):
        if bucket["inputs"].get("objectLockEnabled") is True and any(
                status != "Enabled" for status in _versioning_status(account, stack, bucket)):
            yield Finding(cid, stack, bucket["name"],
                          "versioning of an Object Lock bucket cannot be suspended")


def _rules(replication: Resource) -> list[Mapping[str, Any]]:
    return list(replication["inputs"].get("rules") or [])


def _replication_buckets(account: Account, stack: str, replication: Resource,
                         rule: Mapping[str, Any]) -> tuple[tuple[str, Resource] | None, ...]:
    return (_bucket(account, stack, replication["inputs"].get("bucket")),
            _bucket(account, stack, rule.get("destination", {}).get("bucket")))


def check_replication_versioning(cid: str, account: Account) -> Iterator[Finding]:
    for stack, replication in account.resources(REPLICATION):
        for rule in _rules(replication):
            for role, found in zip(("source", "destination"),
                                   _replication_buckets(account, stack, replication, rule),
                                   strict=True):
                if found is None or "Enabled" not in _versioning_status(account, *found):
                    yield Finding(cid, stack, replication["name"],
                                  f"the {role} bucket needs versioning Enabled")


def check_replication_kms(cid: str, account: Account) -> Iterator[Finding]:
    for stack, replication in account.resources(REPLICATION):
        for rule in _rules(replication):
            destination = rule.get("destination", {})
            key = destination.get("encryptionConfiguration", {}).get("replicaKmsKeyId")
            if not key:
                continue
            selected = rule.get("sourceSelectionCriteria", {}).get(
                "sseKmsEncryptedObjects", {}).get("status")
            if selected != "Enabled":
                yield Finding(cid, stack, replication["name"],
                              "replicaKmsKeyId needs sourceSelectionCriteria."
                              "sseKmsEncryptedObjects Enabled")
            found = _bucket(account, stack, destination.get("bucket"))
            if found is not None:
                region = account.region(*found)
                if arn_region(key) not in (None, region):
                    yield Finding(cid, stack, replication["name"],
                                  f"replicaKmsKeyId is in {arn_region(key)}, the destination "
                                  f"bucket in {region}")


def check_replication_object_lock(cid: str, account: Account) -> Iterator[Finding]:
    for stack, replication in account.resources(REPLICATION):
        for rule in _rules(replication):
            source, destination = _replication_buckets(account, stack, replication, rule)
            if source is None or source[1]["inputs"].get("objectLockEnabled") is not True:
                continue
            if destination is None or \
                    destination[1]["inputs"].get("objectLockEnabled") is not True:
                yield Finding(cid, stack, replication["name"],
                              "the source has Object Lock, so the destination must too")
            role = account.find(stack, replication["inputs"].get("role"), ROLE)
            actions: set[str] = set()
            if role is not None:
                names = {state(role[1]).get("name"), role[1].get("id")}
                for policy in account.in_stack(role[0], ROLE_POLICY):
                    if policy["inputs"].get("role") in names:
                        actions |= _policy_actions(policy["inputs"].get("policy"))
            missing = [a for a in ("s3:GetObjectRetention", "s3:GetObjectLegalHold")
                       if not _allows(actions, a)]
            if missing:
                yield Finding(cid, stack, replication["name"],
                              f"the replication role lacks {', '.join(missing)}")


def check_replication_rule_shape(cid: str, account: Account) -> Iterator[Finding]:
    for stack, replication in account.resources(REPLICATION):
        for rule in _rules(replication):
            if "filter" in rule:
                for key in ("deleteMarkerReplication", "priority"):
                    if rule.get(key) is None:
                        yield Finding(cid, stack, replication["name"],
                                      f"a rule with a filter needs {key}")
            destination = rule.get("destination", {})
            rtc = destination.get("replicationTime")
            if rtc and rtc.get("status") == "Enabled":
                metrics = destination.get("metrics") or {}
                if metrics.get("status") != "Enabled":
                    yield Finding(cid, stack, replication["name"],
                                  "Replication Time Control needs metrics Enabled")
                for what, minutes in (("replicationTime.time", rtc.get("time", {})),
                                      ("metrics.eventThreshold",
                                       metrics.get("eventThreshold", {}))):
                    if minutes.get("minutes") != 15:
                        yield Finding(cid, stack, replication["name"],
                                      f"{what}.minutes must be 15")


# --------------------------------------------------------------------------- KMS

KEY_FIELDS: dict[str, tuple[str, ...]] = {
    DB: ("kmsKeyId", "performanceInsightsKmsKeyId", "masterUserSecretKmsKeyId"),
    CACHE: ("kmsKeyId",),
    SECRET: ("kmsKeyId",),
    EKS: ("encryptionConfig.provider.keyArn",),
    SSE: ("rules[].applyServerSideEncryptionByDefault.kmsMasterKeyId",),
    LOG_GROUP: ("kmsKeyId",),
}
"""Arguments that name a KMS key used by the resource itself (in the resource's region)."""


def check_key_region(cid: str, account: Account) -> Iterator[Finding]:
    for stack, resource in account.resources(*KEY_FIELDS):
        region = account.region(stack, resource)
        for path in KEY_FIELDS[resource["type"]]:
            for key in _values(resource["inputs"], path):
                if arn_region(key) not in (None, region):
                    yield Finding(cid, stack, resource["name"],
                                  f"{path} is a key in {arn_region(key)}; the resource is in "
                                  f"{region}")


def check_key_deletion_window(cid: str, account: Account) -> Iterator[Finding]:
    for stack, key in account.resources(KEY, REPLICA_KEY):
        days = key["inputs"].get("deletionWindowInDays")
        if days is not None and not 7 <= int(days) <= 30:
            yield Finding(cid, stack, key["name"],
                          f"deletionWindowInDays {days} is outside 7 to 30")


def check_replica_keys(cid: str, account: Account) -> Iterator[Finding]:
    seen: Counter[tuple[str, str]] = Counter()
    for stack, replica in account.resources(REPLICA_KEY):
        region = account.region(stack, replica)
        primary_arn = account.follow(stack, replica["inputs"].get("primaryKeyArn"))[1]
        primary = account.find(stack, replica["inputs"].get("primaryKeyArn"), KEY)
        if primary is not None:
            multi_region = primary[1]["inputs"].get("multiRegion") is True
            primary_region = account.region(*primary)
        else:
            multi_region = str(primary_arn).rsplit("/", 1)[-1].startswith("mrk-")
            primary_region = arn_region(primary_arn) or ""
        if not multi_region:
            yield Finding(cid, stack, replica["name"],
                          "only a multi-Region primary key can be replicated")
        if primary_region == region:
            yield Finding(cid, stack, replica["name"],
                          f"the replica is in its primary's region {region}")
        seen[(str(primary_arn).rsplit("/", 1)[-1], region)] += 1
    for (key_id, region), count in seen.items():
        if count > 1:
            yield Finding(cid, "*", key_id,
                          f"{count} replicas of {key_id} in {region}: one per region at most")


# --------------------------------------------------------------------------- Secrets Manager


def check_secret_recovery_window(cid: str, account: Account) -> Iterator[Finding]:
    for stack, secret in account.resources(SECRET):
        days = secret["inputs"].get("recoveryWindowInDays")
        if days is not None and int(days) != 0 and not 7 <= int(days) <= 30:
            yield Finding(cid, stack, secret["name"],
                          f"recoveryWindowInDays {days} is neither 0 nor 7 to 30")


# --------------------------------------------------------------------------- Route 53


def check_failover_records(cid: str, account: Account) -> Iterator[Finding]:
    groups: dict[tuple[str, str, str], list[tuple[str, Resource]]] = {}
    for stack, record in account.resources(RECORD):
        inputs = record["inputs"]
        key = (str(inputs.get("zoneId")), str(inputs.get("name")).rstrip("."),
               str(inputs.get("type")))
        groups.setdefault(key, []).append((stack, record))
    for (_, name, type_), records in groups.items():
        failover = [(s, r) for s, r in records if r["inputs"].get("failoverRoutingPolicies")]
        if not failover:
            continue
        if len(failover) != len(records):
            yield Finding(cid, failover[0][0], name,
                          f"{type_} {name} mixes failover and other records")
        kinds = Counter(str(r["inputs"]["failoverRoutingPolicies"][0].get("type"))
                        for _, r in failover)
        if kinds != Counter({"PRIMARY": 1, "SECONDARY": 1}):
            yield Finding(cid, failover[0][0], name,
                          f"{type_} {name} needs one PRIMARY and one SECONDARY, has "
                          f"{dict(kinds)}")
        identifiers = [r["inputs"].get("setIdentifier") for _, r in failover]
        if not all(identifiers) or len(set(identifiers)) != len(identifiers):
            yield Finding(cid, failover[0][0], name,
                          f"every failover record of {name} needs its own setIdentifier")
        for stack, record in failover:
            inputs = record["inputs"]
            primary = inputs["failoverRoutingPolicies"][0].get("type") == "PRIMARY"
            if primary and not inputs.get("aliases") and not inputs.get("healthCheckId"):
                yield Finding(cid, stack, record["name"],
                              "a PRIMARY record without a health check is always healthy: "
                              "it never fails over")


def check_recovery_control_health_checks(cid: str, account: Account) -> Iterator[Finding]:
    for stack, check in account.resources(HEALTH_CHECK):
        inputs = check["inputs"]
        if inputs.get("type") != "RECOVERY_CONTROL":
            continue
        if not inputs.get("routingControlArn"):
            yield Finding(cid, stack, check["name"],
                          "a RECOVERY_CONTROL health check needs routingControlArn")
        probing = [k for k in ("fqdn", "ipAddress", "port", "resourcePath", "searchString")
                   if inputs.get(k) is not None]
        if probing:
            yield Finding(cid, stack, check["name"],
                          f"a RECOVERY_CONTROL health check probes nothing; drop {probing}")


def check_failover_health_checks_exist(cid: str, account: Account) -> Iterator[Finding]:
    for stack, record in account.resources(RECORD):
        inputs = record["inputs"]
        policies = inputs.get("failoverRoutingPolicies") or []
        check_id = inputs.get("healthCheckId")
        if not policies or not check_id:
            continue
        if account.find(stack, check_id, HEALTH_CHECK) is None:
            yield Finding(cid, stack, record["name"],
                          f"healthCheckId {check_id} names no health check declared here")


def _provider_region(account: Account, stack: str, resource: Resource) -> str:
    """The region of the resource's explicit provider, else the resource's own region."""
    name = resource.get("provider_name")
    for provider in account.in_stack(stack, PROVIDER):
        if name and provider["name"] == name and provider["inputs"].get("region"):
            return str(provider["inputs"]["region"])
    return account.region(stack, resource)


def check_arc_config_region(cid: str, account: Account) -> Iterator[Finding]:
    for stack, resource in account.resources(*ARC_TYPES):
        region = _provider_region(account, stack, resource)
        if region != ARC_CONFIG_REGION:
            yield Finding(cid, stack, resource["name"],
                          f"ARC's configuration API is only in {ARC_CONFIG_REGION}; this is "
                          f"declared through {region}")


# --------------------------------------------------------------------------- EKS


def check_access_entries_mode(cid: str, account: Account) -> Iterator[Finding]:
    for stack, entry in account.resources(ACCESS_ENTRY):
        cluster = account.find(stack, entry["inputs"].get("clusterName"), EKS)
        if cluster is None:
            continue  # an existing cluster: its mode is not declared here
        mode = (cluster[1]["inputs"].get("accessConfig") or {}).get(
            "authenticationMode", "CONFIG_MAP")
        if mode not in ("API", "API_AND_CONFIG_MAP"):
            yield Finding(cid, stack, entry["name"],
                          f"cluster {cluster[1]['name']} has authenticationMode {mode}; access "
                          "entries need API or API_AND_CONFIG_MAP")


# --------------------------------------------------------------------------- examples

_ACCOUNT = "111122223333"


def res(type_: str, name: str, /, *, outputs: Mapping[str, Any] | None = None,
        id_: str | None = None, **inputs: Any) -> dict[str, Any]:
    """A hand-written recorded resource (the shape ``conftest.py`` records)."""
    return {"type": type_, "name": name, "id": id_ or name, "inputs": dict(inputs),
            "outputs": dict(outputs or {}), "secret_inputs": []}


def account(stacks: Mapping[str, tuple[str, Iterable[Resource]]],
            outputs: Mapping[str, Mapping[str, Any]] | None = None) -> Account:
    """An `Account` of hand-written stacks: name -> (region, resources)."""
    return Account({
        name: {"config": {"aws:region": region}, "resources": list(found),
               "outputs": {k: {"value": v, "secret": False}
                           for k, v in (outputs or {}).get(name, {}).items()}}
        for name, (region, found) in stacks.items()})


def _key_arn(region: str, key_id: str) -> str:
    return f"arn:aws:kms:{region}:{_ACCOUNT}:key/{key_id}"


def _db_arn(region: str, name: str) -> str:
    return f"arn:aws:rds:{region}:{_ACCOUNT}:db:{name}"


def _primary_db(**overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = dict(engine="postgres", engineVersion="16", allocatedStorage=100,
                                  maxAllocatedStorage=1000, storageEncrypted=True,
                                  backupRetentionPeriod=7, parameterGroupName="params-1",
                                  kmsKeyId=_key_arn("us-east-1", "mrk-db"),
                                  skipFinalSnapshot=False,
                                  finalSnapshotIdentifier="audit-kit-final")
    inputs.update(overrides)
    return res(DB, "db", outputs={"arn": _db_arn("us-east-1", "db-1"), "identifier": "db-1"},
               **{k: v for k, v in inputs.items() if v is not None})


def _params(family: str = "postgres16", region: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"region": region} if region else {}
    return res(PARAMETER_GROUP, "params", outputs={"name": "params-1"}, family=family, **extra)


def _replica(**overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = dict(replicateSourceDb="arn:aws:rds:us-east-1:1:db:canned",
                                  storageEncrypted=True, parameterGroupName="params-1",
                                  kmsKeyId=_key_arn("us-west-2", "mrk-db"),
                                  skipFinalSnapshot=True, maxAllocatedStorage=1000)
    inputs.update(overrides)
    return res(DB, "replica", outputs={"identifier": "replica-1"},
               **{k: v for k, v in inputs.items() if v is not None})


def _dr_pair(replica: dict[str, Any], primary: dict[str, Any] | None = None) -> Account:
    """prod (us-east-1) with its instance, and dr (us-west-2) whose replica names the
    instance through a StackReference, as the DR stack does."""
    reference = res(STACK_REFERENCE, "org/audit-kit/prod", name="org/audit-kit/prod",
                    outputs={"outputs": {"dbInstanceArn": "arn:aws:rds:us-east-1:1:db:canned"}})
    return account({"prod": ("us-east-1", [primary or _primary_db(), _params()]),
                    "dr": ("us-west-2", [reference, replica, _params()])},
                   outputs={"prod": {"dbInstanceArn": _db_arn("us-east-1", "db-1")}})


def _redis(**overrides: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = dict(authToken="generated-token-value", transitEncryptionEnabled=True,
                                  multiAzEnabled=True, automaticFailoverEnabled=True,
                                  numCacheClusters=2)
    inputs.update(overrides)
    return res(CACHE, "redis", **{k: v for k, v in inputs.items() if v is not None})


def _token(**inputs: Any) -> dict[str, Any]:
    return res(PASSWORD, "token", outputs={"result": "generated-token-value"}, **inputs)


def _one(region: str, *found: Resource) -> Account:
    return account({"unit": (region, list(found))})


def _bucket_res(name: str, region: str | None = None, lock: bool = True) -> dict[str, Any]:
    extra: dict[str, Any] = {"region": region} if region else {}
    return res(BUCKET, name, outputs={"bucket": name, "arn": f"arn:aws:s3:::{name}"},
               objectLockEnabled=lock, **extra)


def _versioning(bucket: str, status: str = "Enabled", region: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"region": region} if region else {}
    return res(VERSIONING, f"{bucket}-versioning", bucket=bucket,
               versioningConfiguration={"status": status}, **extra)


def _lock(bucket: str, **retention: Any) -> dict[str, Any]:
    return res(OBJECT_LOCK, f"{bucket}-lock", bucket=bucket,
               rule={"defaultRetention": retention or {"mode": "COMPLIANCE", "years": 6}})


def _replication_set(*, rule: Mapping[str, Any] | None = None, destination_lock: bool = True,
                     destination_versioning: str = "Enabled",
                     actions: Sequence[str] = ("s3:GetObjectRetention",
                                               "s3:GetObjectLegalHold")) -> Account:
    base_rule: dict[str, Any] = {
        "id": "to-dr", "status": "Enabled", "priority": 1, "filter": {"prefix": ""},
        "deleteMarkerReplication": {"status": "Disabled"},
        "sourceSelectionCriteria": {"sseKmsEncryptedObjects": {"status": "Enabled"}},
        "destination": {
            "bucket": "arn:aws:s3:::archive-replica",
            "encryptionConfiguration": {"replicaKmsKeyId": _key_arn("us-west-2", "mrk-a")},
            "replicationTime": {"status": "Enabled", "time": {"minutes": 15}},
            "metrics": {"status": "Enabled", "eventThreshold": {"minutes": 15}},
        },
    }
    base_rule.update(rule or {})
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": list(actions), "Resource": "*"}]})
    return _one("us-east-1",
                _bucket_res("archive"), _versioning("archive"),
                _bucket_res("archive-replica", "us-west-2", lock=destination_lock),
                _versioning("archive-replica", destination_versioning, "us-west-2"),
                res(ROLE, "replication-role", id_="role-1",
                    outputs={"arn": f"arn:aws:iam::{_ACCOUNT}:role/role-1", "name": "role-1"}),
                res(ROLE_POLICY, "replication-policy", role="role-1", policy=policy),
                res(REPLICATION, "replication", bucket="archive",
                    role=f"arn:aws:iam::{_ACCOUNT}:role/role-1", rules=[base_rule]))


def _replica_keys(*, multi_region: bool = True, region: str = "us-west-2",
                  twice: bool = False) -> Account:
    primary_arn = _key_arn("us-east-1", "mrk-k" if multi_region else "k")
    replica = res(REPLICA_KEY, "key-replica", primaryKeyArn="arn:canned", region=region)
    reference = res(STACK_REFERENCE, "org/audit-kit/prod", name="org/audit-kit/prod",
                    outputs={"outputs": {"keyArns": {"data": "arn:canned"}}})
    prod = [res(KEY, "key", outputs={"arn": primary_arn}, multiRegion=multi_region)]
    if twice:
        prod.append(res(REPLICA_KEY, "prod-replica", primaryKeyArn=primary_arn,
                        region="us-west-2"))
    return account({"prod": ("us-east-1", prod), "dr": ("us-west-2", [reference, replica])},
                   outputs={"prod": {"keyArns": {"data": primary_arn}}})


def _records(*, primary_check: bool = True, identifiers: tuple[str, str] = ("prod", "dr"),
             kinds: tuple[str, str] = ("PRIMARY", "SECONDARY")) -> Account:
    found = []
    for i, (kind, identifier) in enumerate(zip(kinds, identifiers, strict=True)):
        checked = kind == "PRIMARY" and primary_check
        extra: dict[str, Any] = {"healthCheckId": "hc-1"} if checked else {}
        found.append(res(RECORD, f"record-{i}", zoneId="Z1", name="db.example.org",
                         type="CNAME", records=[f"target-{i}.example.org"],
                         setIdentifier=identifier,
                         failoverRoutingPolicies=[{"type": kind}], **extra))
    return _one("us-west-2", *found)


def _recovery_checks(*, arn: bool = True) -> Account:
    extra = {"routingControlArn": "arn:aws:route53-recovery-control::1:controlpanel/p/"
             "routingcontrol/r"} if arn else {}
    return _one("us-west-2", res(HEALTH_CHECK, "prod-health", type="RECOVERY_CONTROL",
                                 referenceName="audit-dr-prod", **extra))


def _checked_records(*, declared: bool = True) -> Account:
    found = [res(RECORD, f"record-{i}", zoneId="Z1", name="db.example.org", type="TXT",
                 records=[f"target-{i}.example.org"], setIdentifier=ident,
                 failoverRoutingPolicies=[{"type": kind}], healthCheckId=f"hc-{ident}")
             for i, (kind, ident) in enumerate((("PRIMARY", "prod"), ("SECONDARY", "dr")))]
    checks = [res(HEALTH_CHECK, f"{ident}-health", id_=f"hc-{ident}", type="RECOVERY_CONTROL")
              for ident in (("prod", "dr") if declared else ("dr",))]
    return _one("us-west-2", *found, *checks)


def _arc(region: str) -> Account:
    provider = res(PROVIDER, "arc", region=region)
    cluster = {**res(ARC_TYPES[0], "cluster", name="audit-kit-dr"), "provider_name": "arc"}
    return _one("eu-west-1", provider, cluster)


def _eks(mode: str | None) -> Account:
    access: dict[str, Any] = {"accessConfig": {"authenticationMode": mode}} if mode else {}
    return _one("us-east-1",
                res(EKS, "eks", outputs={"name": "eks-1"}, **access),
                res(ACCESS_ENTRY, "ci-access", clusterName="eks-1",
                    principalArn=f"arn:aws:iam::{_ACCOUNT}:role/ci"))


# --------------------------------------------------------------------------- the table

CONSTRAINTS: tuple[Constraint, ...] = (
    Constraint(
        "rds-cross-region-replica-kms", "RDS",
        "An encrypted read replica in another region than its source must name a KMS key of "
        "the replica's region (KmsKeyId): keys do not cross regions, and RDS refuses the replica "
        "without one.",
        "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/"
        "API_CreateDBInstanceReadReplica.html",
        (DB,), check_cross_region_replica_key,
        lambda: _dr_pair(_replica(kmsKeyId=None)),
        lambda: _dr_pair(_replica())),
    Constraint(
        "rds-replica-no-final-snapshot", "RDS",
        "A read replica cannot take a final snapshot: deleting it with FinalDBSnapshotIdentifier "
        "fails, and SkipFinalSnapshot must be true, so a replica that Pulumi replaces or "
        "destroys must not ask for one.",
        "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_DeleteDBInstance.html",
        (DB,), check_replica_final_snapshot,
        lambda: _dr_pair(_replica(skipFinalSnapshot=False,
                                  finalSnapshotIdentifier="audit-kit-dr-final")),
        lambda: _dr_pair(_replica())),
    Constraint(
        "rds-replica-source-backups", "RDS",
        "The source of a read replica must keep automated backups (backup retention of at "
        "least 1 day); 0 is refused while it has replicas.",
        "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_CreateDBInstance.html",
        (DB,), check_replica_source_backups,
        lambda: _dr_pair(_replica(), _primary_db(backupRetentionPeriod=0)),
        lambda: _dr_pair(_replica())),
    Constraint(
        "rds-parameter-group-family", "RDS",
        "An instance's DB parameter group must be of the family of its engine's major version "
        "(PostgreSQL 16: postgres16; a replica runs its source's version) and be in the "
        "instance's region.",
        "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/"
        "API_CreateDBParameterGroup.html",
        (DB, PARAMETER_GROUP), check_parameter_group_family,
        lambda: _one("us-east-1", _primary_db(engineVersion="16.4"), _params("postgres15")),
        lambda: _one("us-east-1", _primary_db(engineVersion="16.4"), _params())),
    Constraint(
        "rds-max-allocated-storage", "RDS",
        "The storage autoscaling ceiling (MaxAllocatedStorage) must be at least 10% above the "
        "allocated storage (a replica's is its source's).",
        "https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/USER_PIOPS.Autoscaling.html",
        (DB,), check_max_allocated_storage,
        lambda: _one("us-east-1", _primary_db(allocatedStorage=100, maxAllocatedStorage=105),
                     _params()),
        lambda: _one("us-east-1", _primary_db(allocatedStorage=100, maxAllocatedStorage=110),
                     _params())),
    Constraint(
        "rds-identifiers", "RDS",
        "DB instance identifiers are 1 to 63 letters, digits and hyphens, start with a letter, "
        "and have no double or trailing hyphen; final snapshot identifiers follow the same "
        "rules up to 255 characters.",
        "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_DeleteDBInstance.html",
        (DB,), check_rds_identifiers,
        lambda: _one("us-east-1", _primary_db(finalSnapshotIdentifier="audit--kit-final-"),
                     _params()),
        lambda: _one("us-east-1", _primary_db(), _params())),
    Constraint(
        "elasticache-auth-needs-tls", "ElastiCache",
        "An AUTH token can be set only on a replication group with in-transit encryption "
        "enabled.",
        "https://docs.aws.amazon.com/AmazonElastiCache/latest/dg/auth.html",
        (CACHE,), check_auth_needs_transit_encryption,
        lambda: _one("us-east-1", _redis(transitEncryptionEnabled=False)),
        lambda: _one("us-east-1", _redis())),
    Constraint(
        "elasticache-auth-token-format", "ElastiCache",
        "An AUTH token is 16 to 128 printable ASCII characters whose only non-alphanumeric "
        "characters are ! & # $ ^ < > -. A generated token is checked through its "
        "RandomPassword: length, and no special character outside that set (the provider's "
        "default special set includes @ and others).",
        "https://docs.aws.amazon.com/AmazonElastiCache/latest/APIReference/"
        "API_CreateReplicationGroup.html",
        (CACHE, PASSWORD), check_auth_token_format,
        lambda: _one("us-east-1", _redis(), _token(length=64)),
        lambda: _one("us-east-1", _redis(), _token(length=64, special=False))),
    Constraint(
        "elasticache-multi-az-failover", "ElastiCache",
        "Multi-AZ needs automatic failover, and automatic failover needs at least 2 cache "
        "clusters (a primary and a replica).",
        "https://docs.aws.amazon.com/AmazonElastiCache/latest/APIReference/"
        "API_CreateReplicationGroup.html",
        (CACHE,), check_multi_az_failover,
        lambda: _one("us-east-1", _redis(numCacheClusters=1)),
        lambda: _one("us-east-1", _redis())),
    Constraint(
        "s3-bucket-names", "S3",
        "Bucket names are 3 to 63 lowercase letters, digits, dots and hyphens, begin and end "
        "with a letter or digit, and avoid reserved forms; a bucketPrefix is at most 37 "
        "characters (the provider appends a 26-character suffix).",
        "https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html",
        (BUCKET,), check_bucket_names,
        lambda: _one("us-east-1",
                     res(BUCKET, "b", bucketPrefix="audit-kit-Staging-archive-")),
        lambda: _one("us-east-1",
                     res(BUCKET, "b", bucketPrefix="audit-kit-staging-archive-"))),
    Constraint(
        "s3-object-lock", "S3",
        "An Object Lock configuration needs a bucket with Object Lock enabled and versioning "
        "that is never suspended; the kit enables it when the bucket is created "
        "(objectLockEnabled). A default retention has a mode and either days or years.",
        "https://docs.aws.amazon.com/AmazonS3/latest/userguide/object-lock-configure.html",
        (BUCKET, VERSIONING, OBJECT_LOCK), check_object_lock,
        lambda: _one("us-east-1", _bucket_res("archive", lock=False),
                     _versioning("archive"), _lock("archive")),
        lambda: _one("us-east-1", _bucket_res("archive"), _versioning("archive"),
                     _lock("archive"))),
    Constraint(
        "s3-replication-versioning", "S3",
        "Replication needs versioning enabled on both the source and the destination bucket "
        "(DstBucketUnversioned otherwise).",
        "https://docs.amazonaws.cn/en_us/AmazonS3/latest/user-guide/replication-failure-codes.html",
        (REPLICATION, VERSIONING), check_replication_versioning,
        lambda: _replication_set(destination_versioning="Suspended"),
        lambda: _replication_set()),
    Constraint(
        "s3-replication-sse-kms", "S3",
        "Replicating SSE-KMS objects needs sourceSelectionCriteria.sseKmsEncryptedObjects "
        "Enabled and a replica key (ReplicaKmsKeyID) in the destination bucket's region.",
        "https://docs.aws.amazon.com/AmazonS3/latest/userguide/replication-config-for-kms-objects.html",
        (REPLICATION,), check_replication_kms,
        lambda: _replication_set(rule={"sourceSelectionCriteria": {}}),
        lambda: _replication_set()),
    Constraint(
        "s3-replication-object-lock", "S3",
        "Replicating from an Object Lock bucket needs Object Lock on the destination, and the "
        "replication role needs s3:GetObjectRetention and s3:GetObjectLegalHold on the source.",
        "https://docs.aws.amazon.com/AmazonS3/latest/userguide/object-lock-managing.html",
        (REPLICATION, BUCKET, ROLE_POLICY), check_replication_object_lock,
        lambda: _replication_set(actions=("s3:GetObjectVersionForReplication",)),
        lambda: _replication_set()),
    Constraint(
        "s3-replication-rule-shape", "S3",
        "A rule with a Filter (the current schema) needs DeleteMarkerReplication and Priority; "
        "Replication Time Control needs metrics enabled, and both times are 15 minutes (the "
        "only valid value).",
        "https://docs.aws.amazon.com/AmazonS3/latest/API/API_ReplicationTimeValue.html",
        (REPLICATION,), check_replication_rule_shape,
        lambda: _replication_set(rule={"priority": None}),
        lambda: _replication_set()),
    Constraint(
        "kms-key-in-resource-region", "KMS",
        "KMS keys are regional: a key named by RDS, ElastiCache, Secrets Manager, EKS, "
        "CloudWatch Logs or S3 default encryption must be a key of the resource's own region "
        "(a multi-Region replica there, in DR).",
        "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/"
        "API_CreateDBInstanceReadReplica.html",
        tuple(KEY_FIELDS), check_key_region,
        lambda: _one("us-west-2",
                     res(SECRET, "s", kmsKeyId=_key_arn("us-east-1", "mrk-s"))),
        lambda: _one("us-west-2",
                     res(SECRET, "s", kmsKeyId=_key_arn("us-west-2", "mrk-s")))),
    Constraint(
        "kms-deletion-window", "KMS",
        "A key's deletion waiting period is 7 to 30 days.",
        "https://docs.aws.amazon.com/kms/latest/APIReference/API_ScheduleKeyDeletion.html",
        (KEY, REPLICA_KEY), check_key_deletion_window,
        lambda: _one("us-east-1", res(KEY, "k", deletionWindowInDays=5)),
        lambda: _one("us-east-1", res(KEY, "k", deletionWindowInDays=7))),
    Constraint(
        "kms-replica-keys", "KMS",
        "Only a multi-Region primary key can be replicated, into another region than its own, "
        "and each primary has at most one replica per region (so prod's archive-key replica and "
        "the DR stack's replicas must not overlap).",
        "https://docs.aws.amazon.com/kms/latest/APIReference/API_ReplicateKey.html",
        (REPLICA_KEY, KEY), check_replica_keys,
        lambda: _replica_keys(twice=True),
        lambda: _replica_keys()),
    Constraint(
        "secrets-recovery-window", "Secrets Manager",
        "A secret's recovery window is 7 to 30 days (0 in the provider means deleting without "
        "recovery).",
        "https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_DeleteSecret.html",
        (SECRET,), check_secret_recovery_window,
        lambda: _one("us-east-1", res(SECRET, "s", recoveryWindowInDays=3)),
        lambda: _one("us-east-1", res(SECRET, "s", recoveryWindowInDays=7))),
    Constraint(
        "route53-failover-records", "Route 53",
        "Failover records of one name and type are one PRIMARY and one SECONDARY, each with "
        "its own SetIdentifier, with no other records of that name and type; a non-alias "
        "PRIMARY needs a health check, else Route 53 treats it as healthy and never fails over.",
        "https://docs.aws.amazon.com/Route53/latest/APIReference/API_ResourceRecordSet.html",
        (RECORD,), check_failover_records,
        lambda: _records(primary_check=False),
        lambda: _records()),
    Constraint(
        "route53-recovery-control-health-check", "Route 53",
        "A health check of type RECOVERY_CONTROL reflects one ARC routing control (On is "
        "healthy) and must name it (RoutingControlArn); it probes no endpoint, so it takes "
        "no FQDN, IP address, port or path.",
        "https://docs.aws.amazon.com/Route53/latest/APIReference/API_HealthCheckConfig.html",
        (HEALTH_CHECK,), check_recovery_control_health_checks,
        lambda: _recovery_checks(arn=False),
        lambda: _recovery_checks()),
    Constraint(
        "route53-failover-health-check-exists", "Route 53",
        "A failover record's HealthCheckId must name an existing health check (Route 53 "
        "refuses the change with NoSuchHealthCheck); the PRIMARY's decides when it fails "
        "over, so it must be the one the stack declares.",
        "https://docs.aws.amazon.com/Route53/latest/APIReference/API_ResourceRecordSet.html",
        (RECORD, HEALTH_CHECK), check_failover_health_checks_exist,
        lambda: _checked_records(declared=False),
        lambda: _checked_records()),
    Constraint(
        "arc-config-in-us-west-2", "Route 53 ARC",
        "ARC's recovery control configuration API (clusters, control panels, routing "
        "controls, safety rules) is served only in US West (Oregon): declare them through a "
        "us-west-2 provider, whatever the stack's region. Routing control states are changed "
        "on the cluster's regional endpoints instead.",
        "https://docs.aws.amazon.com/recovery-cluster/latest/api/what-is-recovery-control.html",
        ARC_TYPES, check_arc_config_region,
        lambda: _arc("us-east-1"),
        lambda: _arc("us-west-2")),
    Constraint(
        "eks-access-entries-mode", "EKS",
        "Access entries exist only on a cluster whose authentication mode is API or "
        "API_AND_CONFIG_MAP (the API default is CONFIG_MAP).",
        "https://docs.aws.amazon.com/eks/latest/userguide/access-entries.html",
        (ACCESS_ENTRY, EKS), check_access_entries_mode,
        lambda: _eks("CONFIG_MAP"),
        lambda: _eks("API")),
)


def findings(summaries: Mapping[str, Mapping[str, Any]]) -> list[Finding]:
    """Every constraint's findings over these stacks' recorded resources."""
    found = Account(summaries)
    return [f for c in CONSTRAINTS for f in c.findings(found)]
