"""Give the suite's etcd one user per certificate and turn authentication on (a Kubernetes Job).

The users and what each may touch are ``sluice.local.lockdown.etcd_grants``, the same as
`sluice up` creates: ``root``, ``scheduler``, ``client`` and ``node.<id>`` for every node id,
each node's user allowed to write only its own ``/sluice/nodes/<id>``. Node ids are the pods of
the node StatefulSets: ``SLUICE_NODE_POOLS`` lists ``<statefulset>=<most replicas>`` pairs, so a
pool that scales to N pods finds users for ordinals 0 to N-1. Idempotent: run again after raising
a pool's most replicas (delete the finished Job, apply again).

Environment: ``SLUICE_ETCD_ENDPOINT`` (``host:port``), ``SLUICE_ROOT_PKI`` (a directory holding
``ca.pem``, ``root.pem`` and ``root-key.pem``: the root certificate's Secret mounted under those
names), ``SLUICE_NODE_POOLS``.
"""

from __future__ import annotations

import os
from pathlib import Path

from sluice.local.lockdown import Lockdown, enable_etcd_auth
from sluice.local.pki import Pki


def node_ids(pools: str) -> list[str]:
    """``"sluice-node-realtime=8 sluice-node-shared=2"`` → the pod names of those ordinals."""
    ids: list[str] = []
    for entry in pools.split():
        name, _, count = entry.partition("=")
        ids += [f"{name}-{ordinal}" for ordinal in range(int(count))]
    return ids


def main() -> None:
    """Create the users and roles (what exists already is kept), then enable auth."""
    lockdown = Lockdown(Pki(Path(os.environ["SLUICE_ROOT_PKI"])), Path(os.devnull), {})
    ids = node_ids(os.environ["SLUICE_NODE_POOLS"])
    enable_etcd_auth(os.environ["SLUICE_ETCD_ENDPOINT"], lockdown, ids)
    print(f"etcd users ready: root, scheduler, client and {len(ids)} nodes")  # noqa: T201


if __name__ == "__main__":
    main()
