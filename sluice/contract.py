"""Names the contract fixes beyond the ``.proto`` files, shared by the SDK and every service.

The workload classes with their priority order, the metadata keys a call carries, and the etcd
key prefixes under which nodes and schedulers register.
"""

from __future__ import annotations

import enum

from sluice.v1 import common_pb2


class WorkloadClass(enum.IntEnum):
    """A request's workload class, in priority order: REALTIME before BATCH before FINETUNE.

    An ``IntEnum`` whose values are the wire values of ``sluice.v1.WorkloadClass``, so a member
    goes into a protobuf field as it is. The wire's ``UNSPECIFIED`` (0) means REALTIME.
    """

    REALTIME = common_pb2.WORKLOAD_CLASS_REALTIME
    BATCH = common_pb2.WORKLOAD_CLASS_BATCH
    FINETUNE = common_pb2.WORKLOAD_CLASS_FINETUNE

    @property
    def rank(self) -> int:
        """Priority rank: 0 is served first."""
        return _RANKS[self]

    @property
    def is_top(self) -> bool:
        """True for the class no other class goes before (REALTIME)."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """Lower-case name, as in metrics labels, tenant files and scenarios: ``realtime``."""
        return self.name.lower()

    @classmethod
    def from_wire(cls, value: int) -> WorkloadClass:
        """The class of a wire value; 0 (unspecified) is REALTIME. Raises ``ValueError`` for a
        value the contract does not define."""
        return cls.REALTIME if value == common_pb2.WORKLOAD_CLASS_UNSPECIFIED else cls(value)

    @classmethod
    def from_label(cls, label: str) -> WorkloadClass:
        """The class named ``label`` (``realtime``, ``batch``, ``finetune``; any case)."""
        try:
            return cls[label.upper()]
        except KeyError:
            names = ", ".join(c.label for c in cls)
            raise ValueError(f"unknown workload class {label!r}; use one of {names}") from None


_RANKS = {cls: rank for rank, cls in enumerate(WorkloadClass)}

REQUEST_ID_METADATA = "x-request-id"
"""Metadata key carrying the request id across hops."""
AUTHORIZATION_METADATA = "authorization"
"""Metadata key of the API key, as ``Bearer <key>``."""

NODES_PREFIX = "/sluice/nodes/"
"""etcd prefix of inference node registrations (``<prefix><node-id>`` → ``NodeInfo``)."""
SCHEDULERS_PREFIX = "/sluice/schedulers/"
"""etcd prefix of scheduler registrations, read by SDK discovery."""
ADAPTERS_PREFIX = "/sluice/adapters/"
"""etcd prefix of the fine-tuned adapters the fleet serves (``<tenant>/<base>/<name>``)."""
