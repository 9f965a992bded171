"""How DSL jobs reach a real Ray cluster: submitted through the Ray Jobs API, now or on a schedule.

The cluster only launches: a job is a ``dsl`` command line (``dsl pretrain --config ...``)
run on the cluster's head with this repository as its working directory.
"""
