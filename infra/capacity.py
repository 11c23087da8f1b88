"""Node capacity of a new cluster: do the worker's pods fit the managed node group?

The kit declares no cluster autoscaler. The nodes that run are the node group's size, so
settings validation (`infra.settings`) checks, before anything is declared:

- **at rest** (``node_min_size`` nodes, always there): a release at the configured replica
  count, i.e. both blue-green slots at ``worker.replicas`` plus each slot's rolling-update
  surge, plus the migration Job's pod;
- **at the peak** (``node_max_size`` nodes, what the group can grow to): both slots at
  ``worker.max_replicas`` (HPA scale-out) plus surge, plus the migration Job's pod.

Growing from the floor to the peak needs someone to raise the node group's desired size (or an
autoscaler installed on the platform); that is why ``desired_size`` is under ``ignore_changes``
in `infra.cluster`: a change made there is not undone by the next ``pulumi up``.

Per node, what a pod can use is the node's *allocatable* capacity, computed the way the EKS
AL2023 AMI (``nodeadm``, awslabs/amazon-eks-ami ``nodeadm/internal/kubelet``) configures the
kubelet, minus the add-on DaemonSets every node runs. Every worker pod (and the migration
Job's) gets its own branch network interface (security groups for pods), so the instance type's
branch-interface limit caps the worker pods per node as well. All sizes are in MiB and
millicores.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "COREDNS_POD",
    "DAEMONSET_CPU_M",
    "DAEMONSET_PODS",
    "EVICTION_HARD_MIB",
    "INSTANCE_TYPES",
    "MIGRATION_POD",
    "SURGE_PERCENT",
    "VM_MEMORY_OVERHEAD",
    "InstanceType",
    "NodeFit",
    "PodSize",
    "cpu_millicores",
    "memory_mib",
    "nodes_needed",
    "surge",
    "worker_pods",
]

SURGE_PERCENT = 25
"""``maxSurge`` of each slot's Deployment (charts/audit-worker/templates/deployments.yaml);
Kubernetes rounds a percentage surge up."""

EVICTION_HARD_MIB = 100
"""The kubelet's default hard eviction threshold ``memory.available<100Mi``."""

VM_MEMORY_OVERHEAD = 0.075
"""Share of an instance's advertised memory that the kernel and hypervisor keep (the node's
memory capacity is below the EC2 figure); Karpenter's default ``vmMemoryOverheadPercent``."""

DAEMONSET_CPU_M = 25 + 100
"""CPU requests of the DaemonSets on every node: ``aws-node`` (vpc-cni, 25m) and
``kube-proxy`` (100m), as the EKS add-ons ship them."""

DAEMONSET_PODS = 2
"""``aws-node`` and ``kube-proxy``: they count against each node's max pods."""


@dataclass(frozen=True)
class PodSize:
    cpu_m: int
    memory_mib: float


COREDNS_POD = PodSize(cpu_m=100, memory_mib=70)
"""One CoreDNS replica (the EKS add-on runs two), requests as the add-on ships them."""

MIGRATION_POD = PodSize(cpu_m=100, memory_mib=128)
"""The migration Job's pod: ``migration.resources.requests`` in charts/audit-worker/values.yaml
(a test keeps the two in step)."""


@dataclass(frozen=True)
class InstanceType:
    """What the capacity check needs to know about an EC2 instance type.

    ``enis``, ``ipv4_per_eni`` and ``branch_enis`` are the VPC limits in
    aws/amazon-vpc-resource-controller-k8s ``pkg/aws/vpc/limits.go`` (the list that the EKS
    "security groups for Pods" page points to); ``branch_enis == 0`` means the type is not
    trunking compatible and cannot give pods their own security groups.
    """

    vcpus: int
    memory_mib: int
    enis: int
    ipv4_per_eni: int
    branch_enis: int

    @property
    def max_pods(self) -> int:
        """The EKS AMI's max pods without prefix delegation: ENIs x (IPv4 per ENI - 1) + 2."""
        return self.enis * (self.ipv4_per_eni - 1) + 2

    @property
    def kube_reserved_cpu_m(self) -> int:
        """6% of the first core, 1% of the second, 0.5% of cores 3-4, 0.25% of the rest."""
        total = self.vcpus * 1000
        reserved = 0.0
        for start, end, share in ((0, 1000, 0.06), (1000, 2000, 0.01), (2000, 4000, 0.005),
                                  (4000, total, 0.0025)):
            if total > start:
                reserved += (min(total, end) - start) * share
        return int(reserved)

    @property
    def kube_reserved_memory_mib(self) -> int:
        """11 MiB per pod the node may run, plus 255 MiB."""
        return 11 * self.max_pods + 255

    @property
    def allocatable_cpu_m(self) -> int:
        return self.vcpus * 1000 - self.kube_reserved_cpu_m

    @property
    def allocatable_memory_mib(self) -> int:
        capacity = math.floor(self.memory_mib * (1 - VM_MEMORY_OVERHEAD))
        return capacity - self.kube_reserved_memory_mib - EVICTION_HARD_MIB

    @property
    def security_groups_for_pods(self) -> bool:
        return self.branch_enis > 0


INSTANCE_TYPES: dict[str, InstanceType] = {
    # name: vCPUs, memory (EC2), ENIs, IPv4 per ENI, branch ENIs (limits.go)
    "m6i.large": InstanceType(2, 8 * 1024, 3, 10, 9),
    "m6i.xlarge": InstanceType(4, 16 * 1024, 4, 15, 18),
    "m6i.2xlarge": InstanceType(8, 32 * 1024, 4, 15, 38),
    "m6i.4xlarge": InstanceType(16, 64 * 1024, 8, 30, 54),
    # Not trunking compatible ("No instance types in the t family are supported"): listed so
    # that the error names the reason instead of "unknown type".
    "t3.large": InstanceType(2, 8 * 1024, 3, 12, 0),
}
"""The instance types the kit knows the limits of. Add a type with its limits.go entry."""

_CPU = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m?)")
_MEMORY = re.compile(r"([0-9]+)(Ki|Mi|Gi|Ti|K|M|G|T)?")
_MEMORY_FACTOR = {None: 1 / 2**20, "Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024**2,
                  "K": 1e3 / 2**20, "M": 1e6 / 2**20, "G": 1e9 / 2**20, "T": 1e12 / 2**20}


def cpu_millicores(quantity: str) -> int:
    """``"250m"`` -> 250, ``"1"`` -> 1000, ``"0.5"`` -> 500 (rounded up, as a request is)."""
    match = _CPU.fullmatch(quantity)
    if match is None:
        raise ValueError(f"not a CPU quantity: {quantity!r}")
    number, milli = float(match.group(1)), match.group(2)
    return math.ceil(number if milli else number * 1000)


def memory_mib(quantity: str) -> float:
    """``"256Mi"`` -> 256, ``"1Gi"`` -> 1024, ``"512M"`` -> 488.3 (MiB)."""
    match = _MEMORY.fullmatch(quantity)
    if match is None:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return int(match.group(1)) * _MEMORY_FACTOR[match.group(2)]


def surge(replicas: int) -> int:
    """Extra pods one slot's rolling update may start: ``maxSurge`` rounded up."""
    return math.ceil(replicas * SURGE_PERCENT / 100)


def worker_pods(replicas: int) -> int:
    """Pods with both slots at ``replicas`` and rolling, plus the migration Job's pod."""
    return 2 * (replicas + surge(replicas)) + 1


@dataclass(frozen=True)
class NodeFit:
    nodes: int
    """Nodes needed for the worker pods and CoreDNS."""
    per_node: int
    """Worker-sized pods one node holds."""
    limit: str
    """What caps ``per_node``: cpu, memory, pods or branch interfaces."""


def nodes_needed(instance: InstanceType, pod: PodSize, pods: int, *,
                 branch_interfaces: bool = True) -> NodeFit:
    """Nodes of ``instance`` that hold ``pods`` pods of ``pod`` size and the two CoreDNS pods.

    Every pod is counted at the larger of the worker's and the migration pod's requests
    (conservative: the migration Job's pod is one of them). ``per_node`` is 0 when a single
    pod does not fit a node. ``branch_interfaces``: the pods have their own security group,
    so each takes one of the node's branch interfaces.
    """
    size = PodSize(cpu_m=max(pod.cpu_m, MIGRATION_POD.cpu_m),
                   memory_mib=max(pod.memory_mib, MIGRATION_POD.memory_mib))
    cpu_free = instance.allocatable_cpu_m - DAEMONSET_CPU_M
    memory_free = instance.allocatable_memory_mib
    pods_free = instance.max_pods - DAEMONSET_PODS
    limits = {
        "cpu": cpu_free // size.cpu_m,
        "memory": int(memory_free // size.memory_mib),
        "pods": pods_free,
    }
    if branch_interfaces:
        limits["branch interfaces"] = instance.branch_enis
    limit = min(limits, key=lambda k: limits[k])
    per_node = max(0, limits[limit])
    if per_node == 0:
        return NodeFit(nodes=0, per_node=0, limit=limit)
    # Fill nodes with worker pods, then place the CoreDNS pods where room is left.
    counts = [per_node] * (pods // per_node) + ([pods % per_node] if pods % per_node else [])
    room = [(cpu_free - n * size.cpu_m, memory_free - n * size.memory_mib, pods_free - n)
            for n in counts]
    for _ in range(2):
        for i, (cpu, memory, slots) in enumerate(room):
            if cpu >= COREDNS_POD.cpu_m and memory >= COREDNS_POD.memory_mib and slots >= 1:
                room[i] = (cpu - COREDNS_POD.cpu_m, memory - COREDNS_POD.memory_mib, slots - 1)
                break
        else:
            room.append((cpu_free - COREDNS_POD.cpu_m, memory_free - COREDNS_POD.memory_mib,
                         pods_free - 1))
    return NodeFit(nodes=len(room), per_node=per_node, limit=limit)
