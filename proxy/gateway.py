"""The gateway's runtime state, built once per server from a deployment directory.

`Gateway.load()` does all the blocking work (reading settings, policy, prices, the control
snapshot) before the server accepts a request; `start()`/`stop()` own the async and threaded
resources. Nothing here is a module global.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

from yarl import URL

from policy.engine import Policy
from policy.files import RouteRule, load_policy_files
from proxy.auth import ControlView
from proxy.control import ControlStore, ProviderKey
from proxy.crypto import Keyring, load_master_key
from proxy.errors import NoRoute, StartupError
from proxy.events import Pseudonymizer
from proxy.metering import PriceBook, load_pricebook
from proxy.providers.base import Adapter
from proxy.providers.registry import adapter_for
from proxy.recorder import EventRecorder, open_events_db
from proxy.settings import ProviderSettings, Settings
from proxy.upstream import Upstream

log = logging.getLogger("tollway.gateway")


@dataclass(frozen=True, slots=True)
class ProviderRoute:
    name: str
    settings: ProviderSettings
    adapter: Adapter
    base_url: URL

    @property
    def credential_hint(self) -> str:
        where = " or ".join(f"`{h}`" for h in self.adapter.credential_headers)
        return f"Send your Tollway token (tw_...) in {where}."


class Gateway:
    def __init__(self, settings: Settings, keyring: Keyring, control: ControlView, policy: Policy,
                 prices: PriceBook) -> None:
        self.settings = settings
        self.control = control
        self.policy = policy
        self.prices = prices
        self.pseudonymize = Pseudonymizer(keyring.pseudonym_key())
        self.routes = {
            name: ProviderRoute(name, p, adapter_for(p.style), URL(p.base_url))
            for name, p in settings.providers.items()
        }
        self.upstream = Upstream()
        self.recorder: EventRecorder | None = None
        self._events_db = None

    @classmethod
    def load(cls, settings: Settings) -> Gateway:
        """Read and validate everything; raise `StartupError` naming the first problems."""
        keyring = Keyring(load_master_key(settings.data_dir))
        store = ControlStore(settings.control_db, keyring, actor="gateway")
        control = ControlView(store, keyring)
        files = load_policy_files(settings.data_dir)
        prices, price_problems = load_pricebook(settings.data_dir / "pricing.csv")
        errors = files.errors + [p for p in price_problems if p.severity == "error"]
        if errors:
            listing = "\n".join(f"  {p}" for p in errors[:20])
            raise StartupError(f"the policy files have errors; fix them (see `tollway policy check`):\n{listing}")
        for problem in files.problems + price_problems:
            log.warning("%s", problem)
        policy = Policy(files, settings.policy_dir / "model.conf")
        return cls(settings, keyring, control, policy, prices)

    async def start(self) -> None:
        self._events_db = open_events_db(self.settings.events_db)
        self.recorder = EventRecorder(self._events_db, flush_interval_ms=self.settings.events.flush_interval_ms,
                                      batch_size=self.settings.events.batch_size)
        await self.upstream.start()
        # Everything loaded so far lives as long as the server: keep it out of the collector's
        # way, and collect young objects less often (fewer pauses under load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 20, 50)

    async def stop(self) -> None:
        """After in-flight requests finished: close upstream connections, flush every event."""
        await self.upstream.close()
        if self.recorder:
            self.recorder.close()
        if self._events_db is not None:
            self._events_db.close()

    def resolve_key(self, route: RouteRule | None, tenant: str, provider: str, model: str) -> ProviderKey:
        """The first usable key of the route: exists, active, this provider's, owned by tenant or operator."""
        if route is None:
            raise NoRoute(f"No key route for tenant {tenant!r} and model {model!r}. "
                          "Ask your governance lead to add one to policy/routes.csv.")
        for key_id in route.key_ids:
            key = self.control.keys.get(key_id)
            if (key and key.status == "active" and key.provider == provider
                    and key.owner_tenant in (None, tenant)):
                return key
        raise NoRoute(f"The key route for tenant {tenant!r} and model {model!r} (routes.csv line {route.line}) "
                      "names no usable key: each is missing, revoked, for another provider or another tenant's. "
                      "Ask your operator to check `tollway keys list`.")
