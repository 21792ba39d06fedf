"""What the scheduler extender and the routing service both know of the cluster.

The watched cache of Nodes, Pods and the plan ConfigMap (:mod:`.state`,
:mod:`.watch`), their file stand-ins (:mod:`.files`), the engines' scraped queue
depth (:mod:`.scrape`), the pools as core router state (:mod:`.pools`) and the
metrics both services export (:mod:`.metrics`). Neither service imports the
other; both import this package, which imports neither.
"""
