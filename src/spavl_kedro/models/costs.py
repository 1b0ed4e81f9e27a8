"""What API calls cost: tokens counted per stage and model, priced from configuration, held to a budget.

`OpenAIVLM` counts every answered call into a `UsageMeter`: the `usage.prompt_tokens` and
`usage.completion_tokens` the server reports (OpenAI's chat-completions response; vLLM, SGLang, TGI and
Gemini's OpenAI-compatible endpoint report the same fields). A call whose server reports no usage, whose
answer cannot be read, or that timed out after it was sent is counted as a call whose tokens are unknown:
nothing is estimated in their place. A refused connection or an HTTP error status is not counted (nothing was
generated, and providers do not bill it).

The counts live in a `SpendLedger`, keyed by (stage, backend name, served model). Dollars are never stored:
they are derived from the tokens and the price table (`costs.prices`, USD per 1M tokens) when needed, so a
corrected price corrects every estimate. A model without a price is counted in tokens and left out of dollars.

`StageSpend` is one stage's view of the ledger: the meter its backends count into and its budget
(`costs.budget_usd.<stage>`). Sharded stages check the budget before each shard and persist the ledger after
it, so a stage stops between shards once its spend reaches the budget, keeps every shard it finished, and a
rerun resumes with the spend so far (the ledger is a catalog dataset, `api_spend`), not with a fresh budget.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

# The stages that call APIs; each may have a budget (`costs.budget_usd.<stage>`).
STAGES = ("generate", "judge", "evaluate")


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="the `model` an `openai` backend sends, spelled as in its spec (`gpt-4o`); every "
        "backend that sends it is priced by this row"
    )
    input_usd_per_1m: float = Field(
        ge=0,
        description="USD per 1,000,000 input (prompt) tokens, images included as the "
        "provider counts them, from the provider's pricing page",
    )
    output_usd_per_1m: float = Field(ge=0, description="USD per 1,000,000 output (completion) tokens")


class BudgetExceeded(RuntimeError):
    """A stage's API spend reached its budget; the message names the stage, the spend and the budget."""


@dataclass
class Usage:
    """Calls of one backend in one stage: how many, how many without usage reported, and their tokens."""

    calls: int = 0
    calls_without_usage: int = 0
    input_tokens: int = 0  # over the calls with usage only
    output_tokens: int = 0

    def usd(self, price: ModelPrice | None) -> float | None:
        """The estimated dollars of the calls with usage; None when the model has no price.

        >>> Usage(3, 0, 2_000, 100).usd(ModelPrice(model="m", input_usd_per_1m=2.5, output_usd_per_1m=10.0))
        0.006
        """
        if price is None:
            return None
        return (self.input_tokens * price.input_usd_per_1m + self.output_tokens * price.output_usd_per_1m) / 1e6


class SpendLedger:
    """Usage per (stage, backend name, served model), persisted by its catalog dataset.

    `persist` (given by `datasets/spend.py`) writes the rows; `flush` calls it when something was recorded
    since the last write. A ledger without one (a test, a notebook) lives in memory.

    >>> ledger = SpendLedger()
    >>> ledger.record("judge", "gpt-4o", "gpt-4o", (1200, 40))
    ... ledger.record("judge", "gpt-4o", "gpt-4o", None)
    >>> ledger.rows()
    [{'stage': 'judge', 'name': 'gpt-4o', 'model': 'gpt-4o', 'calls': 2, 'calls_without_usage': 1, 'input_tokens': 1200, 'output_tokens': 40}]
    """

    KEY = ("stage", "name", "model")

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]] = (),
        persist: Callable[[list[dict]], None] | None = None,
        where: str = "in memory",
    ) -> None:
        self._usage: dict[tuple[str, str, str], Usage] = {}
        for row in rows:
            self._usage[tuple(row[k] for k in self.KEY)] = Usage(
                **{k: int(v) for k, v in row.items() if k not in self.KEY}
            )
        self._persist, self.where = persist, where
        # Backends count from worker threads (shard lanes, OpenAIVLM under Jupyter); writes keep their order.
        self._lock, self._write_lock = threading.Lock(), threading.Lock()
        self._dirty = False

    def __deepcopy__(self, memo: dict) -> SpendLedger:
        """The ledger itself: a run has one, shared by every stage (Kedro's MemoryDataset deep-copies what it
        holds, and a copy would count apart from the one the run logs)."""
        return self

    def record(self, stage: str, name: str, model: str, tokens: tuple[int, int] | None) -> None:
        """One answered call: (input, output) tokens as the server reported them, or None when it did not."""
        with self._lock:
            usage = self._usage.setdefault((stage, name, model), Usage())
            usage.calls += 1
            if tokens is None:
                usage.calls_without_usage += 1
            else:
                usage.input_tokens += tokens[0]
                usage.output_tokens += tokens[1]
            self._dirty = True

    def meter(self, stage: str) -> UsageMeter:
        return UsageMeter(self, stage)

    def usage(self, stage: str | None = None) -> dict[tuple[str, str, str], Usage]:
        """A copy of the counts, of one stage or all."""
        with self._lock:
            return {
                key: Usage(**asdict(u)) for key, u in sorted(self._usage.items()) if stage is None or key[0] == stage
            }

    def rows(self) -> list[dict[str, Any]]:
        return [{**dict(zip(self.KEY, key)), **asdict(u)} for key, u in self.usage().items()]

    def flush(self) -> None:
        """Write the ledger through its dataset, if anything was recorded since the last write."""
        with self._write_lock:  # a later snapshot is never overwritten by an earlier one
            with self._lock:
                dirty, self._dirty = self._dirty, False
            if dirty and self._persist is not None:
                self._persist(self.rows())


@dataclass(frozen=True)
class UsageMeter:
    """What a backend counts into: the ledger, under one stage."""

    ledger: SpendLedger
    stage: str

    def record(self, name: str, model: str, tokens: tuple[int, int] | None) -> None:
        self.ledger.record(self.stage, name, model, tokens)


def price_of(prices: Sequence[ModelPrice], model: str) -> ModelPrice | None:
    return next((p for p in prices if p.model == model), None)


def money(usd: float) -> str:
    """Dollars as the messages write them: four decimals, since one call can cost a fraction of a cent."""
    return f"${usd:,.4f}"


class StageSpend:
    """One stage's spend: the meter its backends count into, and its budget (None: no budget)."""

    def __init__(
        self, ledger: SpendLedger, stage: str, prices: Sequence[ModelPrice] = (), budget_usd: float | None = None
    ) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.ledger, self.stage, self.prices, self.budget_usd = ledger, stage, list(prices), budget_usd
        self.meter = ledger.meter(stage)
        self._warned: set[str] = set()

    def spent_usd(self) -> float:
        """Dollars spent in this stage so far, on priced models, over every run the ledger has seen."""
        return sum(
            u.usd(price_of(self.prices, model)) or 0.0 for (_, _, model), u in self.ledger.usage(self.stage).items()
        )

    def check(self) -> None:
        """Raise `BudgetExceeded` when the stage's spend has reached its budget."""
        if self.budget_usd is None:
            return
        self._warn_uncounted()
        spent = self.spent_usd()
        if spent >= self.budget_usd:
            raise BudgetExceeded(
                f"{self.stage}: API spend {money(spent)} has reached its budget costs.budget_usd.{self.stage} = "
                f"{money(self.budget_usd)} (ledger: {self.ledger.where}). The finished shards are kept; raise the "
                f"budget (--params costs.budget_usd.{self.stage}=<USD>) and run again to resume from them"
            )

    @contextlib.contextmanager
    def metered(self, paid: bool = True) -> Iterator[None]:
        """Around one batch of calls: the budget is checked before (when they go to an API, `paid`) and the
        ledger written after, also when a call raises, so spend is never lost."""
        if paid:
            self.check()
        try:
            yield
        finally:
            self.ledger.flush()

    def guard(self, work: Mapping[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
        """Shard functions (`pipelines/sharding.py`) that each check the budget before they start and write the
        ledger after they end. A stage already over its budget with work left stops here, before any shard."""
        if work:
            self.check()
        return {shard_id: functools.partial(self._shard, fn) for shard_id, fn in work.items()}

    def _shard(self, fn: Callable[[], Any]) -> Any:
        with self.metered():
            return fn()

    def _warn_uncounted(self) -> None:
        """Say once what a budget cannot see: unpriced models and calls without usage."""
        usage = self.ledger.usage(self.stage)
        unpriced = sorted(
            {model for (_, _, model), u in usage.items() if u.calls and price_of(self.prices, model) is None}
        )
        unknown = sum(u.calls_without_usage for u in usage.values())
        notes = []
        if unpriced:
            notes.append(f"models without a price in costs.prices: {unpriced}")
        if unknown:
            notes.append(f"{unknown} call(s) whose server reported no usage")
        note = "; ".join(notes)
        if note and note not in self._warned:
            self._warned.add(note)
            log.warning("%s budget counts priced tokens only; not counted: %s", self.stage, note)


def cost_metrics(ledger: SpendLedger, prices: Sequence[ModelPrice]) -> dict[str, float]:
    """The parent MLflow run's cost metrics, from the ledger (every run it has seen, so a resumed stage shows
    what its data cost in all): `cost/<stage>/<name>/input_tokens` and `/output_tokens` per backend that made
    calls, `/usd` where its model is priced, `/calls_without_usage` where there were any, and
    `cost/<stage>/usd` per stage with a priced model. Nothing for a ledger without calls (the embedded default).

    >>> ledger = SpendLedger(
    ...     [
    ...         {
    ...             "stage": "judge",
    ...             "name": "gpt-4o",
    ...             "model": "gpt-4o",
    ...             "calls": 3,
    ...             "calls_without_usage": 0,
    ...             "input_tokens": 2000,
    ...             "output_tokens": 100,
    ...         }
    ...     ]
    ... )
    >>> cost_metrics(ledger, [ModelPrice(model="gpt-4o", input_usd_per_1m=2.5, output_usd_per_1m=10.0)])
    {'cost/judge/gpt-4o/input_tokens': 2000.0, 'cost/judge/gpt-4o/output_tokens': 100.0, 'cost/judge/gpt-4o/usd': 0.006, 'cost/judge/usd': 0.006}
    """
    by_name: dict[tuple[str, str], list[tuple[str, Usage]]] = {}
    for (stage, name, model), usage in ledger.usage().items():
        by_name.setdefault((stage, name), []).append((model, usage))
    metrics: dict[str, float] = {}
    stage_usd: dict[str, float] = {}
    for (stage, name), entries in by_name.items():
        prefix = f"cost/{stage}/{name}"
        metrics[f"{prefix}/input_tokens"] = float(sum(u.input_tokens for _, u in entries))
        metrics[f"{prefix}/output_tokens"] = float(sum(u.output_tokens for _, u in entries))
        dollars = [u.usd(price_of(prices, model)) for model, u in entries]
        if all(d is not None for d in dollars):  # every model this backend sent is priced
            metrics[f"{prefix}/usd"] = sum(dollars)
            stage_usd[stage] = stage_usd.get(stage, 0.0) + sum(dollars)
        unknown = sum(u.calls_without_usage for _, u in entries)
        if unknown:
            metrics[f"{prefix}/calls_without_usage"] = float(unknown)
    metrics.update({f"cost/{stage}/usd": usd for stage, usd in stage_usd.items()})
    return metrics
