"""Tag every taggable AWS resource with the stack's environment.

The policy pack reads the ``environment`` tag to apply per-environment rules (35-day backups
and deletion protection in prod). Provider ``default_tags`` would not do: they are applied by
the provider and are invisible in the resource inputs that policies see. A stack
transformation puts the tags into the inputs themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

import pulumi

__all__ = ["base_tags", "register_tagging"]


def base_tags(environment: str) -> dict[str, str]:
    """The tags every AWS resource of the stack carries."""
    return {
        "environment": environment,
        "project": "audit-kit",
        "managed-by": "pulumi",
        "data-classification": "phi",
    }


def _merge(defaults: Mapping[str, str], explicit: object) -> dict[str, str]:
    merged = dict(defaults)
    if isinstance(explicit, Mapping):
        merged.update({str(k): str(v) for k, v in explicit.items()})
    return merged


def register_tagging(environment: str) -> None:
    """Register the stack transformation; call before declaring any resource."""
    defaults = base_tags(environment)

    def add_tags(
        args: pulumi.ResourceTransformationArgs,
    ) -> pulumi.ResourceTransformationResult | None:
        # Only AWS resources (and awsx components, which pass tags on) whose args have `tags`.
        if not args.type_.startswith(("aws:", "awsx:")) or "tags" not in args.props:
            return None
        props = dict(args.props)
        props["tags"] = pulumi.Output.from_input(props.get("tags")).apply(
            lambda explicit: _merge(defaults, explicit)
        )
        return pulumi.ResourceTransformationResult(props, args.opts)

    pulumi.runtime.register_stack_transformation(add_tags)
