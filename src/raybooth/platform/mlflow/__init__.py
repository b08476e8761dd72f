"""MLflow in raybooth: where runs go and how they get there, and the model registry.

- `store`    the tracking URI (config, $MLFLOW_TRACKING_URI, else SQLite under $RAYBOOTH_HOME),
             a client for it, whether it answers
- `sender`   a generic buffered sender: put / flush / close, background delivery with back-off
- `runs`     one MLflow run logged from a driver and its workers through the sender
- `refs`     `models:/NAME@ALIAS` references: parse, download, resolve to local files
- `registry` log a model on a run, register a version, aliases, list, promote
- `pyfunc`   a registered raybooth model as an MLflow pyfunc model
- `commands` `raybooth models …` and `raybooth mlflow-ui`

What a training run logs (params from its config, version tags from its summary) belongs to the
training job: raybooth.jobs.train.tracking and raybooth.jobs.train.register.

The package is named after the library it wraps; inside it `import mlflow` (absolute) still
reaches the library.
"""
