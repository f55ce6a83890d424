"""Object names as a Kubernetes API server judges them, so `kubetune apply` (the local backend)
and the operator's admission give the same manifest the same verdict.

Custom resources are named by DNS-1123 subdomains (at most 253 characters of lowercase letters,
digits, '-' and '.', starting and ending with a letter or digit), namespaces by DNS-1123 labels
(at most 63, no '.'). No kubetune kind needs more of its own name: every child object that must
be a DNS-1035 label (Services, pod hostnames, the Jobs/JobSets whose names make them) is named by
`planner.base_name`, which cuts and hashes any valid CR name into one (tests/reliability check
every planned child of the longest and oddest valid names).
"""
from __future__ import annotations

import re
from typing import Optional

MAX_SUBDOMAIN = 253
MAX_LABEL = 63
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(rf"^{_LABEL}$")
DNS1123_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")


def suggest(name: str, limit: int = MAX_SUBDOMAIN, dots: bool = True) -> str:
    """A valid name close to `name` (lowercased, other characters made '-'), for the message."""
    allowed = "a-z0-9.-" if dots else "a-z0-9-"
    clean = re.sub(rf"[^{allowed}]+", "-", name.lower())
    clean = re.sub(r"-*\.-*", ".", re.sub(r"\.+", ".", clean)) if dots else clean
    clean = clean[:limit].strip("-.")
    return clean or "my-job"


def object_name_error(name: object) -> Optional[str]:
    """Why the API server would refuse `name` as a custom resource's metadata.name; None if it is fine."""
    if not isinstance(name, str) or not name:
        return "a name is required"
    if len(name) > MAX_SUBDOMAIN:
        return f"{name[:20]!r}... is {len(name)} characters; a Kubernetes name has at most {MAX_SUBDOMAIN}"
    if not DNS1123_SUBDOMAIN.match(name):
        return (
            f"{name!r} is not a valid Kubernetes name: a DNS-1123 subdomain is lowercase letters, digits, '-' "
            f"and '.', starting and ending with a letter or digit (the API server refuses it too); "
            f"use e.g. {suggest(name)!r}"
        )
    return None


def namespace_error(namespace: object) -> Optional[str]:
    """Why `namespace` is not a valid namespace (a DNS-1123 label); None if it is fine."""
    if not isinstance(namespace, str) or not namespace:
        return "a namespace is required"
    if len(namespace) > MAX_LABEL or not DNS1123_LABEL.match(namespace):
        return (
            f"{namespace!r} is not a valid namespace: a DNS-1123 label is at most {MAX_LABEL} lowercase letters, "
            f"digits and '-', starting and ending with a letter or digit; use e.g. "
            f"{suggest(namespace, MAX_LABEL, dots=False)!r}"
        )
    return None
