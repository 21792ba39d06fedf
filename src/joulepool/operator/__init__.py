"""``joulepool operator``: kopf reconciles InferencePools into jointly planned GPU pools.

A thin shell around :mod:`joulepool.pooling` / :mod:`joulepool.core.planner`:
kopf handlers keep in-memory indexes of InferencePools, GPU Nodes,
GPUProfiles, the EnergyPolicy and the operator's own Deployments, and trigger
ONE debounced planning loop (:mod:`.planning`) that plans every pool jointly,
then writes statuses, the versioned plan ConfigMap ``joulepool-plan`` and the
serving Deployments.

Exactly one replica, kopf in standalone mode (no peering):
kopf has no leader election.  Two replicas would each plan the same pools
from their own memory and publish competing plans (ConfigMap versions, status
and Deployment replicas flapping between them, GPUs double-booked across the
two plans).  kopf's peering only pauses the lower-priority operator when it
notices another one, which is a best-effort mutual exclusion with a window
where both act, and it needs cluster-wide write access to
KopfPeering objects.  So the Deployment runs ``replicas: 1`` with
``strategy: Recreate`` (the old pod is gone before the new one starts), and
peering is disabled (``standalone=True``) so no peering RBAC is needed.  A
crash costs the time to restart: all state is rebuilt from the API server
(kopf lists everything before the first handler runs; the plan version
continues from the published ConfigMap).

Modules: :mod:`.rbac` (the RBAC rules, one place), :mod:`.config`,
:mod:`.kube` (client for the operator's own writes, with retries and
server-side apply), :mod:`.resources` (pure translations), :mod:`.deployments`
(which Deployments to apply, delete or scale to 0), :mod:`.listings` (objects
deleted while a watch was down), :mod:`.planning` (the loop), :mod:`.handlers`
(kopf, module-level, typed memo), :mod:`.app` (assembly), :mod:`.cli`.
"""
