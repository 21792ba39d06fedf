"""The kube-scheduler extender: filter and prioritize verbs by the JouleSched placement cost.

See :mod:`joulepool.extender.app` for the HTTP surface and
:mod:`joulepool.extender.settings` for flags, environment and config file. The
request routing service is :mod:`joulepool.router`; what both know of the
cluster is :mod:`joulepool.kube`.
"""
