"""The request routing service (``joulepool router``): one core router per pool, three ways in.

* the OpenAI-compatible proxy (:mod:`.proxy`, :mod:`.requests`, :mod:`.admission`):
  ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``; it picks, forwards,
  streams the answer back and learns from it;
* the low-level pair (:mod:`.app`, :mod:`.models`): ``/v1/route`` asks where to send a
  request, ``/v1/complete`` reports its outcome; ``/v1/pools`` shows the pools;
* with ``--epp-port``, the GIE endpoint picker over Envoy's ext_proc (:mod:`.epp`,
  grpcio's front end; :mod:`.epp_native`, the compiled one from ``native/``).

Every path decides and learns through the same :class:`joulepool.core.router.PoolRouter`
of each pool, kept by :class:`joulepool.kube.pools.Router`; replicas share their
completion counts (:mod:`.replicas`). docs/routing.md and docs/gateway.md say more.
"""
