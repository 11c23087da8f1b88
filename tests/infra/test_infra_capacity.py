"""Node capacity maths (``infra/capacity.py``): pure functions, no cluster and no servers.

The max-pods figures follow the EKS formula ENIs x (IPv4 addresses per ENI - 1) + 2 (the
EKS AMI's ``eni-max-pods.txt``; https://docs.aws.amazon.com/eks/latest/userguide/
choosing-instance-type.html): m6i.large has 3 ENIs of 10 addresses, 3 x 9 + 2 = 29.
"""

from __future__ import annotations

import pytest
import stackkit
import yaml

from infra import capacity
from infra.capacity import INSTANCE_TYPES, PodSize, nodes_needed

pytestmark = pytest.mark.infra

PROD_POD = PodSize(cpu_m=1000, memory_mib=1024)


@pytest.mark.parametrize(("instance", "max_pods"), [
    ("m6i.large", 29), ("m6i.xlarge", 58), ("m6i.2xlarge", 58), ("m6i.4xlarge", 234),
    ("t3.large", 35)])
def test_max_pods_is_the_eks_eni_formula(instance: str, max_pods: int) -> None:
    assert INSTANCE_TYPES[instance].max_pods == max_pods


def test_kube_reserved_cpu_follows_the_ami_steps() -> None:
    # 60m (first core) + 10m (second) = 70m on 2 vCPUs; + 2 x 5m on 4 vCPUs.
    assert INSTANCE_TYPES["m6i.large"].kube_reserved_cpu_m == 70
    assert INSTANCE_TYPES["m6i.xlarge"].kube_reserved_cpu_m == 80
    assert INSTANCE_TYPES["m6i.2xlarge"].kube_reserved_cpu_m == 90


def test_allocatable_memory_subtracts_overhead_kube_reserved_and_eviction() -> None:
    large = INSTANCE_TYPES["m6i.large"]
    # floor(8192 x 0.925) = 7577; kube-reserved 11 x 29 + 255 = 574; eviction 100.
    assert large.kube_reserved_memory_mib == 574
    assert large.allocatable_memory_mib == 7577 - 574 - 100


def test_only_trunking_types_support_pod_security_groups() -> None:
    assert not INSTANCE_TYPES["t3.large"].security_groups_for_pods
    assert all(INSTANCE_TYPES[t].security_groups_for_pods
               for t in ("m6i.large", "m6i.xlarge", "m6i.2xlarge", "m6i.4xlarge"))


@pytest.mark.parametrize(("quantity", "millicores"), [
    ("250m", 250), ("1", 1000), ("0.5", 500), ("1.0005", 1001)])
def test_cpu_quantities_round_up_to_millicores(quantity: str, millicores: int) -> None:
    assert capacity.cpu_millicores(quantity) == millicores


@pytest.mark.parametrize(("quantity", "mib"), [
    ("256Mi", 256), ("1Gi", 1024), ("1048576", 1), ("2Ki", 2 / 1024)])
def test_memory_quantities_in_mib(quantity: str, mib: float) -> None:
    assert capacity.memory_mib(quantity) == mib


@pytest.mark.parametrize("bad", ["1x", "", "m", ".5"])
def test_a_bad_cpu_quantity_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a CPU quantity"):
        capacity.cpu_millicores(bad)


@pytest.mark.parametrize("bad", ["1 Gi", "", "Gi", "1Mb"])
def test_a_bad_memory_quantity_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a memory quantity"):
        capacity.memory_mib(bad)


@pytest.mark.parametrize(("replicas", "pods"), [(1, 5), (3, 9), (4, 11), (10, 27)])
def test_worker_pods_are_two_slots_with_surge_and_the_migration_pod(
        replicas: int, pods: int) -> None:
    # maxSurge 25% rounds up: 1 -> 1, 3 -> 1, 4 -> 1, 10 -> 3.
    assert capacity.worker_pods(replicas) == pods


def test_prods_draft_nodes_cannot_hold_the_peak() -> None:
    # 1 CPU workers on m6i.large: 1930m allocatable - 125m DaemonSets leaves room for one.
    fit = nodes_needed(INSTANCE_TYPES["m6i.large"], PROD_POD, capacity.worker_pods(10))
    assert (fit.per_node, fit.limit) == (1, "cpu")
    assert fit.nodes == 27 > 9


def test_prods_nodes_hold_the_peak_and_a_release_at_rest() -> None:
    xlarge = INSTANCE_TYPES["m6i.xlarge"]
    peak = nodes_needed(xlarge, PROD_POD, capacity.worker_pods(10))
    rest = nodes_needed(xlarge, PROD_POD, capacity.worker_pods(3))
    assert (peak.per_node, peak.limit, peak.nodes) == (3, "cpu", 9)
    assert rest.nodes == 3
    prod = yaml.safe_load((stackkit.ROOT / "environments" / "prod.yaml").read_text())
    assert prod["cluster"]["node_instance_types"] == ["m6i.xlarge"]
    assert prod["cluster"]["node_min_size"] >= rest.nodes
    assert prod["cluster"]["node_max_size"] >= peak.nodes


def test_coredns_takes_a_node_of_its_own_when_the_workers_fill_theirs() -> None:
    # Dev's peak: 7 pods of 250m fill one m6i.large (7 x 250m of 1805m); CoreDNS needs 100m.
    fit = nodes_needed(INSTANCE_TYPES["m6i.large"], PodSize(250, 256), 7)
    assert (fit.per_node, fit.nodes) == (7, 2)
    assert nodes_needed(INSTANCE_TYPES["m6i.large"], PodSize(250, 256), 6).nodes == 1


def test_branch_interfaces_cap_pods_with_their_own_security_group() -> None:
    small = PodSize(cpu_m=100, memory_mib=128)
    large = INSTANCE_TYPES["m6i.large"]
    with_groups = nodes_needed(large, small, 30)
    without = nodes_needed(large, small, 30, branch_interfaces=False)
    assert (with_groups.per_node, with_groups.limit) == (9, "branch interfaces")
    assert (without.per_node, without.limit) == (18, "cpu")  # 1805m // 100m
    assert with_groups.nodes > without.nodes


def test_a_pod_larger_than_a_node_fits_nowhere() -> None:
    fit = nodes_needed(INSTANCE_TYPES["m6i.large"], PodSize(cpu_m=4000, memory_mib=256), 1)
    assert (fit.nodes, fit.per_node, fit.limit) == (0, 0, "cpu")


def test_migration_pod_size_matches_the_chart() -> None:
    values = yaml.safe_load(
        (stackkit.ROOT / "charts" / "audit-worker" / "values.yaml").read_text())
    requests = values["migration"]["resources"]["requests"]
    assert capacity.cpu_millicores(str(requests["cpu"])) == capacity.MIGRATION_POD.cpu_m
    assert capacity.memory_mib(str(requests["memory"])) == capacity.MIGRATION_POD.memory_mib
