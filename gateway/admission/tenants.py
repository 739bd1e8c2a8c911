"""Tenants: who a request belongs to, and what that tenant may ask for.

A tenant is named by the client's API key when the gateway checks keys (each configured key maps to
one tenant; a valid key mapped to none belongs to the default tenant), else by the `x-kvgate-tenant`
header. A name that is not configured folds into the default tenant, so metric labels stay bounded
by the config. A tenant listing `models` may use only those models and LoRA adapters, each with its
conditions (a maximum prompt length); anything else is refused with 403 before it is queued.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from gateway.admission.rate_limit import RateLimit
from gateway.config import Admission, TenantSpec

TENANT_HEADER = "x-kvgate-tenant"


@dataclass(slots=True, eq=False)
class Tenant:
    """A configured tenant at run time: its spec, its allowed models (None: any), its rate limit."""

    spec: TenantSpec
    models: dict[str, int | None] | None  # name -> max prompt tokens (None: no limit)
    rate: RateLimit | None

    @property
    def name(self) -> str:
        return self.spec.name

    def refusal(self, model: str, prompt_tokens: int) -> str | None:
        """Why this tenant may not send `model` with a prompt this long; None when it may."""
        if self.models is None:
            return None
        if model not in self.models:
            return f"Tenant `{self.name}` may not use model `{model}`."
        limit = self.models[model]
        if limit is not None and prompt_tokens > limit:
            return (f"Tenant `{self.name}` may send at most {limit} prompt tokens to `{model}`; "
                    f"this prompt has {prompt_tokens}.")
        return None

    def needs_exact_prompt(self, model: str) -> bool:
        """Whether deciding on this tenant's request needs its prompt tokens counted exactly."""
        if self.spec.tokens_per_minute is not None:
            return True
        return self.models is not None and self.models.get(model) is not None


class Tenants:
    """The configured tenants, by name and by API key, and the default one."""

    def __init__(self, admission: Admission, now: float) -> None:
        specs = {t.name: t for t in admission.tenants}
        if admission.default_tenant not in specs:
            specs[admission.default_tenant] = TenantSpec(name=admission.default_tenant)
        self.by_name = {name: _tenant(spec, now) for name, spec in specs.items()}
        self.default = self.by_name[admission.default_tenant]
        self.by_key = {key: self.by_name[t.name] for t in admission.tenants for key in t.api_keys}

    def __iter__(self) -> Iterator[Tenant]:
        return iter(self.by_name.values())

    def resolve(self, headers: Mapping[str, str], keys_checked: bool) -> Tenant:
        if keys_checked:
            scheme, _, token = headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                return self.by_key.get(token.strip(), self.default)
            return self.default
        name = headers.get(TENANT_HEADER)
        return self.default if name is None else self.by_name.get(name.strip(), self.default)


def tenant_api_keys(admission: Admission | None) -> tuple[bytes, ...]:
    """The tenants' API keys: the gateway accepts them beside those of `auth`."""
    if admission is None:
        return ()
    return tuple(key.encode() for t in admission.tenants for key in t.api_keys)


def _tenant(spec: TenantSpec, now: float) -> Tenant:
    models = None if spec.models is None else {m.name: m.max_prompt_tokens for m in spec.models}
    return Tenant(spec, models, RateLimit.of(spec.requests_per_minute, spec.tokens_per_minute, now))
