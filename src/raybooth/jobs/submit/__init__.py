"""Submitting raybooth commands to a Ray cluster as Ray jobs (`raybooth submit`, `raybooth jobs`).

    client.py       the cluster's address, its token, and a JobSubmissionClient with clear errors
    versions.py     Ray and raybooth on the cluster against this client's: a mismatch is refused
    runtime_env.py  what travels with a job: the working directory (configs, photos) and env vars
    follow.py       streaming a job's logs, its outcome and the summary path it printed
    command.py      the two commands' parsers and functions

The cluster runs raybooth from its image (docker/Dockerfile); only the working directory (configs,
instance photos) is uploaded with the job, never the package itself.
"""
