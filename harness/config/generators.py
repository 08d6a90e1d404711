"""`load.generators` and `load.client_placement`: an open loop (Poisson or a replayed trace) split across Ray actors (harness/run/generators.py),
when one machine's client cannot offer the rate a big server takes (docs/scale-out.md)."""

from __future__ import annotations

from pydantic import Field, model_validator

from harness.core.spec import Placement, Strict


class Generators(Strict):
    """Mixed into the loads that can be split across Ray actors."""
    generators: int | None = Field(None, gt=1, description="load generators sharing the load over a Ray cluster: "
                                   "the cell's worker and generators - 1 Ray actors placed by client_placement, "
                                   "each sending every N-th request of the one schedule, stamping with its own "
                                   "clock (offsets measured at start-up); backends served over HTTP only")
    client_placement: Placement = Field(default_factory=Placement, description="with generators: the resources "
                                        "each generator actor needs of a node, e.g. {resources: {client: 1}}")

    @model_validator(mode="after")
    def _one_way_to_split(self) -> Generators:
        if self.generators is not None and getattr(self, "clients", 1) > 1:
            raise ValueError("give clients (processes on the worker's machine) or generators (Ray actors), not both")
        # Compared with the default, not looked up in model_fields_set: a CellPlan carries its load re-dumped whole.
        if self.generators is None and self.client_placement != Placement():
            raise ValueError("client_placement places generators: it needs generators")
        return self


def senders(load) -> int:
    """How many share the load's schedule: its generators, else its client processes (1: the worker alone)."""
    return getattr(load, "generators", None) or getattr(load, "clients", 1)
