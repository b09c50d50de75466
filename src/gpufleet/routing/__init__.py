"""Routing policies: which ready replica serves a request. Pure, named, registered plug-ins.

The default is ``prefix`` (prefix-cache-aware with a saturation rule), chosen by the routing
benchmark (bench/routing.py).
"""

from gpufleet.routing import chwbl, prefix, session, simple  # noqa: F401 - registers the policies
from gpufleet.routing.base import (
    POLICIES,
    Choice,
    Endpoint,
    RequestFeatures,
    RoutingPolicy,
    make_policy,
    register,
)
from gpufleet.routing.cost import CostOption, rank_by_cost
from gpufleet.routing.features import features_of, prompt_blocks, render
from gpufleet.routing.split import choose_split

__all__ = [
    "DEFAULT_POLICY",
    "POLICIES",
    "Choice",
    "CostOption",
    "Endpoint",
    "RequestFeatures",
    "RoutingPolicy",
    "choose_split",
    "features_of",
    "make_policy",
    "prompt_blocks",
    "rank_by_cost",
    "register",
    "render",
]

DEFAULT_POLICY = "prefix"
