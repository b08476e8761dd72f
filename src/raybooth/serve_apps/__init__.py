"""The Ray Serve application: `app` (the builder Serve configs name), `ingress` (HTTP), `deployments`
(the model replicas), `batching` (work items and how a batch becomes pipeline calls), `catalog`
(public model and subject names), `settings` (the config's `args:`), `deploy` and `command`
(`raybooth serve`).

Depends only on `raybooth.platform`; `tests/test_architecture.py` checks it.
"""
