"""Per-token prices of external endpoints beside the replica-time prices of the fleet's own."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gpufleet.policies.pricing import FLOOR_TOKENS_PER_S, Pricing
from gpufleet.spec import ModelSpec, load_text

HOSTED = load_text(
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: hosted}\n"
    "spec: {engine: external, endpoints: [{url: 'https://api.example.com/v1'}],"
    " pricing: {perMillionInputTokens: 3, perMillionOutputTokens: 15}}\n"
)[0].spec
OWN = load_text(
    "apiVersion: gpufleet.io/v1alpha1\nkind: Model\nmetadata: {name: own}\n"
    "spec: {source: 'hf://org/name', engine: vllm, resources: {gpus: 1, gpuTypes: [H100]}}\n"
)[0].spec


@dataclass
class Entry:
    name: str
    spec: ModelSpec


def test_an_external_model_is_charged_by_its_tokens() -> None:
    pricing = Pricing()
    assert pricing.charge(HOSTED, 1000, 200) == pytest.approx(1000 * 3e-6 + 200 * 15e-6)
    # A budget's reservation: every token at the dearer price, whatever was measured.
    pricing.observe(Entry("hosted", HOSTED), 0.0, 500)
    assert pricing.estimate(Entry("hosted", HOSTED), 1000) == pytest.approx(1000 * 15e-6)
    assert pricing.per_token(Entry("hosted", HOSTED)) == pytest.approx(9e-6)
    assert Pricing.per_second_of(HOSTED) == 0.0  # no replica time to price


def test_the_fleets_own_model_is_charged_by_replica_time() -> None:
    pricing = Pricing()
    assert pricing.charge(OWN, 1000, 200) is None
    own = Entry("own", OWN)
    assert pricing.per_token(own) == pytest.approx(Pricing.per_second_of(OWN) / FLOOR_TOKENS_PER_S)
    assert Pricing.per_second_of(OWN) > 0
