"""Teacher prices per token: litellm's bundled price map read as a file (offline, litellm never imported),
overridden by config. A model with no known price costs `None` (unknown), never 0.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import PricingConfig

log = logging.getLogger("apprentice.pricing")
_PRICE_MAP = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True, slots=True)
class Price:
    input_per_token: float
    output_per_token: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.input_per_token + completion_tokens * self.output_per_token


def bundled_price_map_path() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _PRICE_MAP
    return path if path.is_file() else None


def _load_bundled() -> dict[str, Price]:
    path = bundled_price_map_path()
    if path is None:
        log.info("litellm's price map is not installed; only prices from config are known")
        return {}
    prices: dict[str, Price] = {}
    for name, entry in json.loads(path.read_bytes()).items():
        if not isinstance(entry, dict):
            continue
        inp, out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
        if isinstance(inp, int | float) and isinstance(out, int | float):
            prices[name] = Price(float(inp), float(out))
    return prices


class PriceBook:
    """Looks up a model's price: config first, then the bundled map (also without a provider prefix)."""

    def __init__(self, config: PricingConfig, *, bundled: dict[str, Price] | None = None) -> None:
        self._bundled = _load_bundled() if bundled is None else bundled
        self._config = {
            name: Price(p.input_per_mtok / 1e6, p.output_per_mtok / 1e6) for name, p in config.models.items()
        }
        self._aliases = dict(config.aliases)
        self.cpu_second_usd = config.cpu_second_usd

    def price(self, model: str) -> Price | None:
        model = self._aliases.get(model, model)
        found = self._config.get(model) or self._bundled.get(model)
        if found is None and "/" in model:
            found = self._bundled.get(model.split("/", 1)[1])
        return found

    def cost(self, model: str, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        price = self.price(model)
        if price is None or prompt_tokens is None or completion_tokens is None:
            return None
        return price.cost(prompt_tokens, completion_tokens)
