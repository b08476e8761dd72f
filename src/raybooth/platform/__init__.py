"""The shared core: configuration, model references and loading, images, pipelines.

Imports none of `jobs`, `tune`, `serve_apps` (they depend on this, never the reverse).
"""
