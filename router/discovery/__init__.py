"""Endpoint discovery: the pods of a pool found and followed at run time instead of listed in the config.

`config.KubernetesDiscovery` is the typed config of `discovery: kubernetes` (decoded by gateway.config),
`pods` turns a Kubernetes Pod object into the endpoint it serves (pure functions), and `kubernetes`
lists and watches the pods with `kubernetes_asyncio` (the `kubernetes` extra, imported only there) and
hands every change to the pool as `update(added, removed)`.
"""
