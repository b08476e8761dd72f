"""Class images for prior preservation, made by a pool of Ray actors.

`job` (ensure_class_images, the driver), `spec` (what a set is: its identity and seeds), `store`
(where a set lives, its manifest), `actor` (one loaded pipeline), `pool` (actors kept busy).
"""
