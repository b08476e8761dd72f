"""`make demo` (`python -m raybooth.demo`): the whole platform on the toy world, a few minutes on
two CPU cores.

`run` (the stages in order and the command line), `report` (what a stage shows: images with
captions, lines on the console, `index.html`), `state` (the typed results stages hand on),
`world` (the toy-world stages: the base model, inpainting, DreamBooth, before/after). The MLflow
and Serve stages live with their parts (`raybooth.jobs.train.demo_mlflow`,
`raybooth.serve_apps.demo_stage`).
"""
