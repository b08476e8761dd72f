"""Subject-fidelity evaluation as in the DreamBooth paper: DINO, CLIP-I, CLIP-T.

`prompts` (the paper's prompt sets), `encoders` (DINO and CLIP by raybooth's model rules, with
preprocessing), `metrics` (the numbers from embeddings, bootstrap intervals), `actor`/`pool`
(generate and embed on the class-image actor pool), `report` (evaluation.json), `job` (the driver),
`command` (`raybooth evaluate`), `config` (its schema).
"""
