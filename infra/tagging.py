"""Tag every taggable AWS resource with the stack's environment.

The policy pack reads the ``environment`` tag to apply per-environment rules (35-day backups
and deletion protection in prod). Provider ``default_tags`` would not do: they are applied by
the provider and are invisible in the resource inputs that policies see. A resource transform
puts the tags into the inputs themselves.

The transform is registered with the engine (`pulumi.runtime.register_resource_transform`),
not as the deprecated client-side stack *transformation*: the engine calls it for every
resource it registers, including the children of packaged components such as
``awsx.ec2.Vpc`` (its VPC, subnets, NAT gateways and route tables are registered by the awsx
provider process, where a Python stack transformation never runs).

Because the engine hands the transform only the properties that were set, "has a ``tags``
argument" cannot be read from the properties; it is read from the installed provider SDK
instead (`taggable`): a type is tagged when its Python resource class takes ``tags``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Mapping
from typing import Any

import pulumi

__all__ = ["base_tags", "register_tagging", "tag_transform", "taggable"]

# "aws:kms/key:Key" -> package "aws", module "kms", class "Key" ("index" is the package root).
_TOKEN = re.compile(r"^(?P<package>aws|awsx):(?P<module>[A-Za-z0-9]+)(/[A-Za-z0-9]+)?:"
                    r"(?P<cls>[A-Za-z0-9]+)$")
_PACKAGES = {"aws": "pulumi_aws", "awsx": "pulumi_awsx"}


def base_tags(environment: str) -> dict[str, str]:
    """The tags every AWS resource of the stack carries."""
    return {
        "environment": environment,
        "project": "audit-kit",
        "managed-by": "pulumi",
        "data-classification": "phi",
    }


@functools.cache
def taggable(type_: str) -> bool:
    """Whether resources of ``type_`` (a Pulumi type token) take a ``tags`` input.

    Read from the installed pulumi-aws / pulumi-awsx SDK, so that a type that takes no tags
    (an alias, a role policy, a bucket's versioning) is never sent one: the provider would
    reject the unknown input.
    """
    match = _TOKEN.match(type_)
    if match is None:
        return False
    module_name = _PACKAGES[match["package"]]
    if match["module"] != "index":
        module_name += f".{match['module']}"
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    cls = getattr(module, match["cls"], None)
    init = getattr(cls, "_internal_init", None)
    if init is None:
        return False
    return "tags" in inspect.signature(init).parameters


def _merge(defaults: Mapping[str, str], explicit: object) -> dict[str, str]:
    merged = dict(defaults)
    if isinstance(explicit, Mapping):
        merged.update({str(k): str(v) for k, v in explicit.items()})
    return merged


def tag_transform(environment: str) -> pulumi.ResourceTransform:
    """The transform that adds `base_tags` to every taggable AWS resource (explicit tags win)."""
    defaults = base_tags(environment)

    def add_tags(args: pulumi.ResourceTransformArgs) -> pulumi.ResourceTransformResult | None:
        if not args.custom and not args.type_.startswith("awsx:"):
            return None  # our own components; awsx components pass tags on to their children
        if not taggable(args.type_):
            return None
        props: dict[str, Any] = dict(args.props)
        explicit = props.get("tags")
        if explicit is None or isinstance(explicit, Mapping):
            props["tags"] = _merge(defaults, explicit)
        else:  # an Output (a program-side call): merge once it resolves
            props["tags"] = pulumi.Output.from_input(explicit).apply(
                lambda value: _merge(defaults, value))
        return pulumi.ResourceTransformResult(props, args.opts)

    return add_tags


def register_tagging(environment: str) -> None:
    """Register the tag transform with the engine; call before declaring any resource."""
    pulumi.runtime.register_resource_transform(tag_transform(environment))
